"""`moe-lab bench`: training-step speed of moe-lab's backends side by side with transformers'
Qwen2MoeForCausalLM, in one process under identical conditions (same shape, tokens, optimizer).

`timing.py` measures a step function, `hf.py` builds the transformers baselines, `mcore.py`
builds moe-lab models, `report.py` prints the table with ratios to each baseline.
"""
