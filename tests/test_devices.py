"""Models under accelerate's ``device_map``: the adapter runs each layer where its hook says, including
layers offloaded to CPU or disk (weights on the meta device until the hook loads them), and every
policy gives the same tokens as on the undispatched model. A real cpu + cuda split runs where CUDA is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_llama
from torch import nn

import kvpolicy
from kvpolicy.devices import module_device
from kvpolicy.generation import generate

OPTIONS = TINY_OPTIONS


def _prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """The tiny Llama with layers 1 and 3 offloaded to disk and the rest on CPU, via accelerate."""
    from accelerate import dispatch_model

    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "lm_head": "disk",
    }
    model = dispatch_model(tiny_llama(), device_map, offload_dir=tmp_path_factory.mktemp("offload"))
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    return model


@pytest.mark.parametrize("preset", sorted(OPTIONS))
def test_offloaded_layers_give_the_same_tokens(offloaded, tiny_model, preset):
    policy = kvpolicy.get_policy(preset, **OPTIONS[preset])
    want = generate(tiny_model, None, input_ids=_prompt(), policy=policy, max_new_tokens=12)
    got = generate(offloaded, None, input_ids=_prompt(), policy=policy, max_new_tokens=12)
    assert got.token_ids == want.token_ids
    assert got.stats.kv_tokens_per_layer == want.stats.kv_tokens_per_layer


def test_module_device_reads_the_accelerate_hook():
    layer = nn.Linear(2, 2)
    assert module_device(layer) == torch.device("cpu")
    layer._hf_hook = SimpleNamespace(execution_device=1)  # accelerate stores GPU indices as ints
    assert module_device(layer) == torch.device("cuda:1")
    parent = nn.Sequential(nn.Linear(2, 2))
    parent[0]._hf_hook = SimpleNamespace(execution_device="cuda:0")  # hook on a child only
    assert module_device(parent) == torch.device("cuda:0")
    ghost = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match="only meta-device weights"):
        module_device(ghost)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", sorted(OPTIONS))
def test_cpu_cuda_split_gives_the_same_tokens(tiny_model, preset):
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": 0, "lm_head": 0}
    device_map |= {f"model.layers.{i}": ("cpu" if i < 2 else 0) for i in range(4)}
    split = dispatch_model(tiny_llama(), device_map)
    policy = kvpolicy.get_policy(preset, **OPTIONS[preset])
    want = generate(tiny_model, None, input_ids=_prompt(), policy=policy, max_new_tokens=12)
    got = generate(split, None, input_ids=_prompt(), policy=policy, max_new_tokens=12)
    assert got.token_ids == want.token_ids
