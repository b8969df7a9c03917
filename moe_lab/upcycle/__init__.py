"""Dense -> MoE initialisation ("upcycling"): pure state-dict -> state-dict functions, one method
per file, and the writer of an upcycled moe-lab checkpoint.

- base.py: what a method is (it places dense channels into experts) and the registry by name;
  sparse.py, granular.py, qwen2.py: the methods.
- swiglu.py (channels of an FFN), reinit.py, router_init.py, shared.py, rng.py: shared steps.
- plan.py: the config resolved and checked; layer.py: one MoE layer from one dense FFN;
  state_dict.py: the whole state dict, layer by layer.
- source.py: the dense model (moe-lab checkpoint; hook for Hugging Face directories);
  template.py, writer.py: the single-process GPTModel and the checkpoint + report.

See docs/upcycling.md.
"""

from moe_lab.upcycle import granular, qwen2, sparse  # noqa: F401  (register the methods)
from moe_lab.upcycle.base import MoEShape, Placement, get_method, method_names
from moe_lab.upcycle.plan import UpcyclePlan, make_plan
from moe_lab.upcycle.state_dict import upcycle_parts, upcycle_state_dict
from moe_lab.upcycle.swiglu import SwiGLU

__all__ = ["MoEShape", "Placement", "SwiGLU", "UpcyclePlan", "get_method", "make_plan",
           "method_names", "upcycle_parts", "upcycle_state_dict"]
