"""The upcycling methods as pure state-dict functions: where every dense channel goes, what is
re-initialised, seeds, and the checks on bad settings. No model is built; channels are matched
to the dense FFN by value, so the tests do not trust the methods' own bookkeeping.

Run: pytest tests/upcycle/test_methods.py
"""

import math

import pytest
import torch

from moe_lab import config as C
from moe_lab.config import ConfigError
from moe_lab.upcycle import SwiGLU, make_plan, upcycle_state_dict

from ..conftest import TINY_DENSE

F, HIDDEN, LAYERS = 128, 64, 4  # tiny_dense.yaml


def plan_for(*overrides):
    cfg = C.load(TINY_DENSE, ["moe.num_experts=8", "moe.topk=2", "upcycle.source=x",
                              *overrides])
    return make_plan(cfg)


def dense_state(seed=0) -> dict:
    """A dense state dict shaped like tiny_dense's GPTModel (random values)."""
    gen = torch.Generator().manual_seed(seed)
    state = {"embedding.word_embeddings.weight": torch.randn(256, HIDDEN, generator=gen),
             "decoder.final_layernorm.weight": torch.randn(HIDDEN, generator=gen)}
    for i in range(LAYERS):
        state[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.randn(
            128, HIDDEN, generator=gen)
        state[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = torch.randn(HIDDEN, generator=gen)
        state[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.randn(2 * F, HIDDEN,
                                                                         generator=gen)
        state[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = torch.randn(HIDDEN, F,
                                                                         generator=gen)
    return state


def dense_ffn(state, layer) -> SwiGLU:
    p = f"decoder.layers.{layer}.mlp."
    return SwiGLU.from_megatron(state[p + "linear_fc1.weight"], state[p + "linear_fc2.weight"])


def expert(state, layer, index) -> SwiGLU:
    p = f"decoder.layers.{layer}.mlp.experts.local_experts.{index}."
    return SwiGLU.from_megatron(state[p + "linear_fc1.weight"], state[p + "linear_fc2.weight"])


def match_channels(dense: SwiGLU, ffn: SwiGLU) -> list:
    """For each channel of `ffn`: the dense channel with exactly the same gate row, up row and
    down column, or None (a re-initialised channel)."""
    by_gate = {tuple(row.tolist()): c for c, row in enumerate(dense.gate)}
    found = []
    for i in range(ffn.width):
        c = by_gate.get(tuple(ffn.gate[i].tolist()))
        same = (c is not None and torch.equal(dense.up[c], ffn.up[i])
                and torch.equal(dense.down[:, c], ffn.down[:, i]))
        found.append(c if same else None)
    return found


@pytest.mark.parametrize("expert_ffn", [32, 40, 48, 200], ids=lambda h: f"h_E={h}")
def test_qwen2_without_reinit_each_copy_is_a_permutation_of_the_dense_channels(expert_ffn):
    """40 and 48 do not divide 128 (experts span two copies; 40 leaves channels over), 200 is
    wider than the dense FFN."""
    plan = plan_for("upcycle.method=qwen2", f"moe.expert_ffn={expert_ffn}",
                    "upcycle.reinit_fraction=0")
    dense = dense_state()
    state, reports = upcycle_state_dict(dense, plan)
    total = 8 * expert_ffn
    copies = math.ceil(total / F)
    for layer in range(LAYERS):
        per_copy = [[] for _ in range(copies)]
        for j in range(8):
            channels = match_channels(dense_ffn(dense, layer), expert(state, layer, j))
            assert None not in channels  # every channel is a dense channel, exactly
            for i, c in enumerate(channels):
                per_copy[(j * expert_ffn + i) // F].append(c)  # position in the laid-out copies
        for copy, channels in enumerate(per_copy):
            if copy < copies - 1 or total % F == 0:
                assert sorted(channels) == list(range(F)), (layer, copy)
            else:  # the last copy: a part of it, each channel once; the rest is discarded
                assert len(set(channels)) == len(channels) == total - (copies - 1) * F
        assert reports[layer]["copies"] == copies
    # The report says the same thing as the tensors.
    segments = reports[0]["experts"][3]["segments"]
    from_report = [c for s in segments for c in s["dense_channels"]]
    assert from_report == match_channels(dense_ffn(dense, 0), expert(state, 0, 3))


def test_qwen2_permutations_differ_between_copies_and_layers():
    plan = plan_for("upcycle.method=qwen2", "moe.expert_ffn=64", "upcycle.reinit_fraction=0")
    _, reports = upcycle_state_dict(dense_state(), plan)
    first = [r["experts"][0]["segments"][0]["dense_channels"] for r in reports]
    second_copy = reports[0]["experts"][2]["segments"][0]["dense_channels"]
    assert first[0] != first[1] and first[0] != second_copy


def test_reinit_half_by_channel_is_exactly_half_of_every_expert():
    dense = dense_state()
    kept, _ = upcycle_state_dict(dense, plan_for("upcycle.method=qwen2", "moe.expert_ffn=40",
                                                 "upcycle.reinit_fraction=0"))
    plan = plan_for("upcycle.method=qwen2", "moe.expert_ffn=40", "upcycle.reinit_fraction=0.5",
                    "upcycle.reinit_granularity=channel")
    state, reports = upcycle_state_dict(dense, plan)
    fresh_in, fresh_out = [], []
    for layer in range(LAYERS):
        for j in range(8):
            new, old = expert(state, layer, j), expert(kept, layer, j)
            channels = match_channels(dense_ffn(dense, layer), new)
            fresh = [i for i, c in enumerate(channels) if c is None]
            assert len(fresh) == 20  # exactly 0.5 of 40
            assert reports[layer]["experts"][j]["reinit_fraction"] == 0.5
            assert reports[layer]["experts"][j]["reinit_channels"] == fresh
            kept_channels = [i for i in range(40) if i not in fresh]
            # The other channels are where re-init 0 put them: the streams are independent.
            assert channels == [c if i in kept_channels else None
                                for i, c in enumerate(match_channels(dense_ffn(dense, layer), old))]
            fresh_in.append(new.gate[fresh].flatten())
            fresh_out.append(new.down[:, fresh].flatten())
    # Fresh values follow megatron's init: N(0, 0.02) in, N(0, 0.02 / sqrt(2 * 4 layers)) out.
    assert torch.cat(fresh_in).std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.cat(fresh_out).std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


def test_reinit_by_element_replaces_about_the_fraction_and_reports_it_exactly():
    dense = dense_state()
    common = ["upcycle.method=qwen2", "moe.expert_ffn=40"]
    kept, _ = upcycle_state_dict(dense, plan_for(*common, "upcycle.reinit_fraction=0"))
    state, reports = upcycle_state_dict(dense, plan_for(
        *common, "upcycle.reinit_fraction=0.5", "upcycle.reinit_granularity=element"))
    for j in range(8):
        new, old = expert(state, 2, j), expert(kept, 2, j)
        changed = sum(int((a != b).sum()) for a, b in
                      ((new.gate, old.gate), (new.up, old.up), (new.down, old.down)))
        fraction = changed / new.numel()
        assert fraction == pytest.approx(reports[2]["experts"][j]["reinit_fraction"], abs=1e-12)
        assert abs(fraction - 0.5) < 0.03  # 7680 elements: 5 standard deviations


def test_same_seed_same_tensors_other_seed_other_tensors():
    dense = dense_state()
    settings = ["upcycle.method=qwen2", "moe.expert_ffn=48", "moe.shared_expert_ffn=64"]
    a, _ = upcycle_state_dict(dense, plan_for(*settings, "upcycle.seed=7"))
    b, _ = upcycle_state_dict(dense, plan_for(*settings, "upcycle.seed=7"))
    c, _ = upcycle_state_dict(dense, plan_for(*settings, "upcycle.seed=8"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    expert_keys = [k for k in a if "local_experts" in k]
    assert not any(torch.equal(a[k], c[k]) for k in expert_keys)


def test_granular_layout_scale_and_virtual_group_router():
    plan = plan_for("upcycle.method=granular", "moe.expert_ffn=32", "moe.topk=4")
    assert plan.granularity == 4 and plan.router_init == "virtual-group"
    assert plan.weight_scale == pytest.approx(2.0)  # cbrt(8 * 4 / 4), softmax before top-k
    dense = dense_state()
    state, reports = upcycle_state_dict(dense, plan)
    ffn = dense_ffn(dense, 1)
    for i in range(8):
        copy, shard = divmod(i, 4)
        rows = torch.arange(shard * 32, (shard + 1) * 32)
        got = expert(state, 1, i)
        assert torch.equal(got.gate, ffn.gate[rows] * plan.weight_scale)
        assert torch.equal(got.down, ffn.down[:, rows] * plan.weight_scale)
        assert reports[1]["experts"][i]["shard"] == shard
        assert reports[1]["experts"][i]["segments"][0]["copy"] == copy
    router = state["decoder.layers.1.mlp.router.weight"]
    assert all(torch.equal(router[i], router[4 * (i // 4)]) for i in range(8))
    assert not torch.equal(router[0], router[4])


def test_renormalised_routing_scales_granular_by_cbrt_g_and_sparse_by_one():
    granular = plan_for("upcycle.method=granular", "moe.expert_ffn=32", "moe.topk=4",
                        "moe.router.norm_topk_prob=true")
    assert granular.weight_scale == pytest.approx(4 ** (1 / 3))
    sparse = plan_for("upcycle.method=sparse", "moe.expert_ffn=128",
                      "moe.router.norm_topk_prob=true")
    assert sparse.weight_scale == 1.0 and sparse.granularity == 1
    assert plan_for("upcycle.method=qwen2", "moe.expert_ffn=32").weight_scale == 1.0
    assert plan_for("upcycle.method=granular", "moe.expert_ffn=32", "moe.topk=4",
                    "upcycle.weight_scale=1.5").weight_scale == 1.5


def test_sparse_experts_are_full_copies_and_the_rest_passes_through():
    dense = dense_state()
    state, _ = upcycle_state_dict(dense, plan_for("upcycle.method=sparse", "moe.expert_ffn=128",
                                                  "moe.router.norm_topk_prob=true",
                                                  "moe.layer_freq=2"))
    ffn = dense_ffn(dense, 1)
    for j in range(8):
        got = expert(state, 1, j)
        assert torch.equal(got.gate, ffn.gate) and torch.equal(got.down, ffn.down)
    # Layer 0 is dense in this MoE (layer_freq 2): its FFN and everything else is unchanged.
    for key in ("decoder.layers.0.mlp.linear_fc1.weight", "embedding.word_embeddings.weight",
                "decoder.layers.1.self_attention.linear_qkv.weight"):
        assert state[key] is dense[key]
    assert "decoder.layers.1.mlp.linear_fc1.weight" not in state


@pytest.mark.parametrize("shared_ffn", [128, 64, 200])
def test_shared_expert_comes_from_the_dense_ffn_and_its_gate_starts_at_half(shared_ffn):
    dense = dense_state()
    state, reports = upcycle_state_dict(dense, plan_for(
        "upcycle.method=qwen2", "moe.expert_ffn=32", f"moe.shared_expert_ffn={shared_ffn}"))
    p = "decoder.layers.2.mlp.shared_experts."
    shared = SwiGLU.from_megatron(state[p + "linear_fc1.weight"], state[p + "linear_fc2.weight"])
    channels = match_channels(dense_ffn(dense, 2), shared)
    if shared_ffn == F:
        assert channels == list(range(F))  # an exact copy
    else:  # permuted copies, cut: every dense channel at most once per copy
        assert None not in channels
        assert len(set(channels[:F])) == min(F, shared_ffn)
    assert torch.equal(torch.sigmoid(state[p + "gate_weight"] @ torch.randn(HIDDEN)),
                       torch.tensor([0.5]))
    assert "shared_expert" in reports[2]


@pytest.mark.parametrize("overrides, key", [
    (["upcycle.method=granular", "moe.expert_ffn=48"], "moe.expert_ffn"),  # G not an integer
    (["upcycle.method=granular", "moe.expert_ffn=32", "moe.num_experts=6"], "moe.num_experts"),
    (["upcycle.method=granular", "moe.expert_ffn=32", "moe.topk=2"], "moe.topk"),
    (["upcycle.method=sparse", "moe.expert_ffn=64"], "moe.expert_ffn"),
    (["upcycle.method=qwen2", "moe.expert_ffn=32", "upcycle.router_init=virtual-group"],
     "upcycle.router_init"),
    (["upcycle.method=mixtral", "moe.expert_ffn=32"], "upcycle.method"),
    (["upcycle.method=qwen2", "moe.expert_ffn=32", "upcycle.reinit_fraction=1.5"],
     "upcycle.reinit_fraction"),
    (["upcycle.method=qwen2", "moe.num_experts=0"], "moe.num_experts"),
])
def test_settings_that_do_not_fit_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        plan_for(*overrides)
    assert err.value.key == key
    assert key in str(err.value)
