"""Metric sinks: where the training loop's per-step metrics dicts go.

The loop calls `sink.log(step, metrics, split)` on rank 0 only. `ConsoleSink` prints a line,
`JsonlSink` appends to RUN_DIR/metrics.jsonl. MLflow arrives as another sink.
"""

from moe_lab.tracking.sinks import ConsoleSink, JsonlSink, MetricSink, read_metrics

__all__ = ["ConsoleSink", "JsonlSink", "MetricSink", "read_metrics"]
