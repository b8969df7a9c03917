"""Metric sinks: where the training loop's per-step metrics dicts go.

The loop calls `sink.log(step, metrics, split)` on rank 0 only. `ConsoleSink` prints a line,
`JsonlSink` appends to RUN_DIR/metrics.jsonl, `mlflow_sink.MlflowSink` logs the MLflow run (see
docs/tracking.md). The MLflow modules are imported on demand: `import mlflow` costs seconds.
"""

from moe_lab.tracking.sinks import ConsoleSink, JsonlSink, MetricSink, close_sinks, read_metrics

__all__ = ["ConsoleSink", "JsonlSink", "MetricSink", "close_sinks", "read_metrics"]
