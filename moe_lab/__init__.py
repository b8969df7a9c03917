"""moe-lab: Mixture-of-Experts language-model research on megatron-core.

Packages, in the direction of their imports: config -> routers -> model -> data -> train ->
tracking -> launch (compat is switched on by launch when there is no GPU).
"""

__version__ = "0.1.0"
