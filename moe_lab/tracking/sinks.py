"""Console and metrics.jsonl sinks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    """One line per logged step: the headline numbers first."""

    _SHOWN = ("loss", "loss/lm", "loss/aux", "grad_norm", "lr", "throughput/tokens_per_s",
              "valid/loss")

    def __init__(self, max_steps: int, stream=sys.stdout):
        self.max_steps = max_steps
        self.stream = stream

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        parts = [f"step {step}/{self.max_steps}"]
        for key in self._SHOWN:
            if key in metrics:
                value = metrics[key]
                parts.append(f"{key} {value:.4g}" if key != "throughput/tokens_per_s"
                             else f"tokens/s {value:,.0f}")
        if "eta_s" in metrics:
            parts.append(f"eta {format_duration(metrics['eta_s'])}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class JsonlSink:
    """RUN_DIR/metrics.jsonl: one JSON object per logged step, with `step` and `split`."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if resume_step and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """Steps past the checkpoint we resume from are about to be trained again."""
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        self._file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def close_sinks(sinks: list, error: BaseException | None = None) -> None:
    """Close every sink; after a failed training, sinks that record an outcome hear why first."""
    for sink in sinks:
        if error is not None and hasattr(sink, "fail"):
            sink.fail(error)
        sink.close()


def read_metrics(path: Path, split: str = "train") -> list[dict]:
    """The logged rows of one split, in order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def format_duration(seconds: float) -> str:
    """H:MM:SS, for ETAs."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
