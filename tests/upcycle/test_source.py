"""Which dense sources `upcycle.source` accepts, checked from their configs alone (no weights
read), and the hook through which Hugging Face directories will be read once the conversion
package provides it (a stand-in converter module here: the converter is another issue's).

Run: pytest tests/upcycle/test_source.py
"""

import sys
import types

import pytest
import torch

from moe_lab import config as C
from moe_lab.config import ConfigError
from moe_lab.upcycle.source import HF_HOOK, open_dense

from ..conftest import TINY_DENSE, TINY_MOE


def fake_run(root, config_file):
    """A run directory layout: config.yaml and checkpoints/latest -> step_0000001."""
    (root / "checkpoints" / "step_0000001").mkdir(parents=True)
    (root / "checkpoints" / "step_0000001" / "metadata.json").write_text("{}")
    (root / "checkpoints" / "latest").write_text("step_0000001\n")
    (root / "config.yaml").write_text(C.dump(C.load(config_file)))
    return root


def test_run_directory_and_checkpoint_directory_are_accepted(tmp_path):
    run = fake_run(tmp_path / "run", TINY_DENSE)
    for path in (run, run / "checkpoints" / "step_0000001"):
        source = open_dense(path)
        assert source.checkpoint == run / "checkpoints" / "step_0000001"
        assert source.config_file == run / "config.yaml"
        assert source.config.model.ffn_hidden_size == 128 and not source.config.moe.enabled


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("moe", "holds a MoE model (moe.num_experts 8"),
    ("no_checkpoint", "has no checkpoint"),
    ("other", "is neither a moe-lab run directory"),
])
def test_unusable_sources_are_refused_naming_the_key(case, message, tmp_path):
    path = tmp_path / case
    if case == "moe":
        fake_run(path, TINY_MOE)
    elif case == "no_checkpoint":
        path.mkdir()
        (path / "config.yaml").write_text(C.dump(C.load(TINY_DENSE)))
    elif case == "other":
        path.mkdir()
    with pytest.raises(ConfigError) as err:
        open_dense(path)
    assert err.value.key == "upcycle.source" and message in str(err.value)


def test_hugging_face_directory_goes_through_the_conversion_hook(tmp_path, monkeypatch):
    hf_dir = tmp_path / "qwen2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "qwen2"}')
    monkeypatch.setitem(sys.modules, HF_HOOK[0], types.ModuleType(HF_HOOK[0]))
    with pytest.raises(ConfigError, match="is a Hugging Face directory; reading it needs "
                                          "moe_lab.convert.read_dense_config"):
        open_dense(hf_dir)
    dense = C.load(TINY_DENSE)
    tensors = {"embedding.word_embeddings.weight": torch.zeros(256, 64)}
    converter = types.ModuleType(HF_HOOK[0])
    converter.read_dense_config = lambda path: dense if path == hf_dir else None
    converter.read_dense_tensors = lambda path: tensors if path == hf_dir else None
    monkeypatch.setitem(sys.modules, HF_HOOK[0], converter)
    source = open_dense(hf_dir)
    assert source.config is dense and source.config_file is None
    assert source.read() is tensors
