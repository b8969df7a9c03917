"""Training: the loop, one step, optimizer/scheduler wiring and checkpoints.

`train()` builds the model from a config, resumes or initialises it, and runs steps whose
metrics dicts go to the tracking sinks.
"""

from moe_lab.train.loop import train

__all__ = ["train"]
