"""Launching: the `moe-lab` command line, process-group start-up from torchrun/srun variables,
and the device choice (GPU with NCCL, or the CPU compatibility layer with gloo).

The only package that imports everything else, and the only reader of environment variables.
"""
