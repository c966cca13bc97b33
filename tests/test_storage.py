"""Quantized KV storage (``kv_bits``): the quantizer, the paged layer that stores codes, the decode kernel
that reads them, the byte counts, and every built-in policy composed with 8- and 4-bit storage."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_OPTIONS
from test_batch import _options, _presets, _prompts

import kvpolicy
from kvpolicy.cache import PagedLayer, paged_attention, paged_layer
from kvpolicy.quant import QuantizedLayer
from kvpolicy.registry import PolicyConfigError
from kvpolicy.storage import KVStorage, _packed, _unpacked, dequantize, quantize

STORAGES = ["int8", "fp8", "int4", "int2"]


def test_parse_reads_what_users_write_and_names_a_bad_width():
    assert KVStorage.parse(None) == KVStorage.parse(16) == KVStorage() and not KVStorage().quantized
    assert KVStorage.parse(4) == KVStorage.parse("kivi4") == KVStorage(bits=4)  # KIVI's layout: the default
    assert (
        KVStorage.parse("int4") == KVStorage(bits=4, layout="token")
        and KVStorage.parse("int4").label == "int4"
    )
    assert KVStorage.parse("fp8") == KVStorage(bits=8, format="fp8")
    assert KVStorage.parse({"bits": 2, "group_size": 16}) == KVStorage(bits=2, group_size=16)
    for bad in (3, "int3", "fp4", True, 32):
        with pytest.raises(ValueError, match=rf"kv_bits={bad!r}.*16.*'fp8'.*'int4'"):
            KVStorage.parse(bad)
    with pytest.raises(ValueError, match=r"fp8.*bits=8"):
        KVStorage(bits=4, format="fp8")
    with pytest.raises(ValueError, match="power of two"):
        KVStorage(bits=4, group_size=24)
    with pytest.raises(ValueError, match="does not fit a 48-wide head"):
        KVStorage(bits=4).group(48)
    with pytest.raises(PolicyConfigError, match="invalid settings for snapkv: kv_bits=5"):
        kvpolicy.get_policy("snapkv", kv_bits=5)


def test_16_bits_is_the_policy_as_it_was():
    plain = kvpolicy.get_policy("snapkv", kv_budget=20)
    assert kvpolicy.get_policy("snapkv", kv_budget=20, kv_bits=16) == plain
    assert "storage" not in plain.to_dict()  # stored results keep their keys
    quantized = kvpolicy.get_policy("snapkv", kv_budget=20, kv_bits=4)
    assert quantized != plain and quantized.to_dict()["storage"]["bits"] == 4
    assert kvpolicy.policy_from_dict(quantized.to_dict()) == quantized
    assert quantized.describe().endswith("@ kivi4 KV")
    assert kvpolicy.compose(storage="fp8").storage == KVStorage(bits=8, format="fp8")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packing_round_trips(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 32), dtype=torch.uint8)
    packed = _packed(codes, bits)
    assert packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(_unpacked(packed, bits), codes)
    if bits == 4:  # code j of byte m is element m * 2 + j, in bits j * 4 (what the kernel unpacks)
        assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4


@pytest.mark.parametrize("name", STORAGES)
def test_quantization_error_is_within_half_a_step(name):
    storage = KVStorage.parse(name)
    x = torch.randn(4, 6, 64) * torch.linspace(0.1, 8, 64)  # channels of very different ranges
    x[0, 0] = 3.0  # a constant entry: a zero range is exact
    codes, scale, zero = quantize(x, storage)
    back = dequantize(codes, scale, zero, storage, torch.float32)
    g = storage.group(64)
    err = (back - x).abs().view(4, 6, 64 // g, g)
    if (
        storage.format == "fp8"
    ):  # 3 mantissa bits: half an ulp is 1/16 of the value, plus the scale's rounding
        amax = x.abs().view(4, 6, 64 // g, g).amax(-1, keepdim=True)
        assert bool((err <= x.abs().view_as(err) / 15 + amax * 2**-9).all())
        assert codes.dtype == torch.uint8 and zero is None
    else:
        step = scale.float()[..., None]
        assert bool((err <= step / 2 + 1e-3 * step + 1e-6).all())
        assert torch.allclose(back[0, 0], torch.full((64,), 3.0), atol=2e-3)  # float16 zero point


def _parts(lengths, d=16, dv=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for counts in lengths:
        n = max(counts)
        parts.append(
            (
                torch.randn(len(counts), n, d, generator=g),
                torch.randn(len(counts), n, dv, generator=g),
                torch.arange(n).expand(len(counts), -1),
                torch.tensor(counts),
            )
        )
    return parts


def _requantized(parts, storage):
    """The parts with their keys and values as ``storage`` keeps them (quantized, dequantized)."""
    out = []
    for k, v, p, c in parts:
        k2 = dequantize(*quantize(k, storage), storage, torch.float32)
        v2 = dequantize(*quantize(v, storage), storage, torch.float32)
        out.append((k2, v2, p, c))
    return out


@pytest.mark.parametrize("name", STORAGES)
def test_a_quantized_layer_is_a_layer_of_its_dequantized_entries(name):
    """Store, appends (growing pages), in-place evictions and compaction move codes and scales as they
    move entries: the quantized layer always equals a plain layer holding the dequantized entries."""
    storage = KVStorage.parse(name)
    parts = _parts([[9, 5], [12, 12]])
    quant, plain = paged_layer(4, storage), PagedLayer(4)
    assert isinstance(quant, QuantizedLayer)
    quant.store(parts, reserve=1)
    plain.store(_requantized(parts, storage), reserve=1)
    g = torch.Generator().manual_seed(5)

    def same() -> None:
        assert torch.equal(quant.lengths, plain.lengths)
        assert torch.equal(quant.slot_positions(), plain.slot_positions())
        valid = plain.valid()[..., None]
        for got, want in ((quant.k_pool, plain.k_pool), (quant.v_pool, plain.v_pool)):
            assert torch.equal(quant.dense(got) * valid, plain.dense(want) * valid)

    same()
    for step in range(6):  # appends past the reserve grow every row's pages
        key, value = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g)
        positions = torch.tensor([12 + step, 12 + step])
        quant.append(key, value, positions)
        k2 = dequantize(*quantize(key, storage), storage, torch.float32)
        v2 = dequantize(*quantize(value, storage), storage, torch.float32)
        plain.append(k2, v2, positions)
        same()
    slots = torch.tensor([[[0, 3], [2, -1]], [[5, 5], [1, 0]]])
    quant.evict(slots)
    plain.evict(slots)
    same()
    quant.keep(torch.tensor([[[0, 2, 4], [1, 3, 0]]]), seq=1)
    plain.keep(torch.tensor([[[0, 2, 4], [1, 3, 0]]]), seq=1)
    same()


def test_bytes_are_codes_plus_scales():
    """``nbytes`` (what ``stats.kv_bytes_per_layer`` reports) is entries x (codes + float16 scales and
    zero points); the pages allocated hold the same per slot."""
    parts = _parts([[9, 5]], d=64, dv=64)
    for name, per_element in (
        ("int8", 1 + 4 / 32),
        ("fp8", 1 + 2 / 32),
        ("int4", 0.5 + 4 / 32),
        ("int2", 0.25 + 4 / 32),
    ):
        layer = paged_layer(4, KVStorage.parse(name))
        layer.store(parts)
        assert layer.nbytes(0) == math.ceil(14 * 2 * 64 * per_element), name
        assert (
            layer.allocated_bytes() == (3 + 2 + 1) * 4 * 2 * 64 * per_element
        )  # rows of 3 and 2 pages, null page
    plain = PagedLayer(4)
    plain.store(parts)
    assert plain.nbytes(0) == 14 * 2 * 64 * 4  # float32


def test_generation_reports_the_bytes_kept(tiny_model, prompt_ids):
    full = kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, max_new_tokens=2)
    for name in STORAGES:
        storage = KVStorage.parse(name)
        out = kvpolicy.generate(
            tiny_model, None, input_ids=prompt_ids, policy=kvpolicy.compose(storage=storage), max_new_tokens=2
        )
        per_entry = 2 * 16 * storage.bytes_per_element(16)  # tiny heads: 16 wide, one group
        assert out.stats.kv_bytes_per_layer == [math.ceil(100 * 2 * per_entry)] * 4
        assert out.stats.kv_bytes < full.stats.kv_bytes


def test_policies_score_full_precision_entries(tiny_model, prompt_ids):
    """Quantization happens where entries are stored: the prefill's logits and every selection equal
    those of 16-bit storage exactly."""
    for preset in ("snapkv", "ada-snapkv", "fastkv"):
        plain = kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.get_policy(preset, **TINY_OPTIONS[preset]))
        quant = kvpolicy.prefill(
            tiny_model, prompt_ids, kvpolicy.get_policy(preset, **TINY_OPTIONS[preset], kv_bits=2)
        )
        assert torch.equal(plain.logits, quant.logits)
        for a, b in zip(plain.cache.layers, quant.cache.layers, strict=True):
            assert torch.equal(a.positions, b.positions)


def test_fewer_bits_err_more():
    """Decode attention over a quantized layer departs from full precision in the order of the widths."""
    parts = _parts([[40, 33]], d=32, dv=32, seed=2)
    query = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(3))
    plain = PagedLayer(8)
    plain.store(parts)
    want, _ = paged_attention(query, plain, 32**-0.5)
    errors = {}
    for name in ("int8", "int4", "int2"):
        layer = paged_layer(8, KVStorage.parse(name))
        layer.store(parts)
        got, _ = paged_attention(query, layer, 32**-0.5)
        errors[name] = float((got - want).abs().max())
    assert 0 < errors["int8"] < errors["int4"] < errors["int2"]
    assert errors["int8"] < 0.02


def test_latent_attention_is_refused_by_name():
    with pytest.raises(ValueError, match=r"int4 KV storage is not built for latent attention.*kv_bits=16"):
        QuantizedLayer(64, KVStorage.parse("int4"), shared_values=512)


@pytest.fixture
def kernel(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kvpolicy.kernels.paged_decode import paged_decode_attention

    return paged_decode_attention


@pytest.mark.parametrize("name", STORAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_reads_the_codes_as_fp64_reads_the_dequantized_cache(kernel, name, dtype):
    """The Triton kernel (interpreted) dequantizes in registers: it equals fp64 attention over the
    dequantized cache and the torch path, ragged rows, splits, soft-cap and group sizes included."""
    from test_paged_kernel import check

    storage = KVStorage.parse(name)
    parts = [(k.to(dtype), v.to(dtype), p, c) for k, v, p, c in _parts([[5, 9], [12, 3]], d=32, dv=16)]
    layer = paged_layer(4, KVStorage(bits=storage.bits, format=storage.format, group_size=16, layout="token"))
    layer.store(parts, reserve=2)
    check(kernel, layer, 2)
    check(kernel, layer, 3, splits=2, softcap=5.0)


def _composes(model, policy, plain, prompts, new_tokens: int = 8) -> None:
    """``policy`` (quantized) on ``model``: a batch of ``prompts`` decodes as each prompt alone (tokens,
    kept entries and bytes), graph-replayed decode equals eager, and against ``plain`` (the same policy
    at 16 bits) it keeps the same entries in fewer bytes."""
    alone = [
        kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=new_tokens) for p in prompts
    ]
    batch = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=new_tokens)
    for a, b in zip(alone, batch, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer
        assert b.stats.kv_bytes_per_layer == a.stats.kv_bytes_per_layer
    first = {"input_ids": prompts[0], "max_new_tokens": new_tokens}
    assert kvpolicy.generate(model, None, policy=policy, graphs=True, **first).token_ids == alone[0].token_ids
    full = kvpolicy.generate(model, None, policy=plain, **first)
    assert alone[0].stats.kv_tokens_per_layer == full.stats.kv_tokens_per_layer  # selections: full precision
    assert alone[0].stats.kv_bytes < full.stats.kv_bytes


@pytest.mark.parametrize("kv_bits", [8, "int4"])  # (KIVI's layout, the default at 4: test_kivi.py)
@pytest.mark.parametrize("preset", _presets())
def test_every_preset_composes_with_quantized_storage(model, preset, kv_bits):
    """Every registered preset at 8 and 4 bits, batched and graph-replayed (:func:`_composes`)."""
    options = _options(preset, TINY_OPTIONS)
    plain = kvpolicy.get_policy(preset, **options)
    _composes(model, plain.with_storage(kv_bits), plain, _prompts((90, 40, 7)))


@pytest.mark.parametrize(
    "model_type", ["gemma3_text", "phi3", "gpt2", "qwen3_next", "deepseek_v3"], ids=lambda t: t
)
def test_quantized_storage_on_other_architectures(model_type):
    """Sliding-window layers (Gemma 3), partial RoPE (Phi-3), learned positions (GPT-2) and a hybrid with
    recurrent layers (Qwen3-Next) store quantized as Llama does (:func:`_composes`), per token and in
    KIVI's layout. Latent attention
    (DeepSeek V3) is refused naming the setting."""
    from test_generic_adapter import FAMILIES, SLIDING, tiny_model

    from kvpolicy.coverage import _build

    if model_type == "qwen3_next":
        model = _build(model_type)
    else:
        model = tiny_model(model_type, {**FAMILIES.get(model_type, {}), **SLIDING.get(model_type, {})})
    plain = kvpolicy.get_policy("snapkv", kv_budget=24)
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 23)]
    if model_type == "deepseek_v3":
        with pytest.raises(ValueError, match="not built for latent attention"):
            kvpolicy.generate(
                model, None, input_ids=prompts[0], policy=plain.with_storage("int4"), max_new_tokens=2
            )
        return
    _composes(model, plain.with_storage("int4"), plain, prompts, new_tokens=6)
    kivi = KVStorage(bits=2, layout="kivi", group_size=8, residual=8)  # residuals flush within the run
    _composes(model, plain.with_storage(kivi), plain, prompts, new_tokens=12)


def test_compiled_decode_reads_the_quantized_cache(model, monkeypatch):
    """``compile=True`` traces the decode step whole (``fullgraph``) over a quantized cache (its
    dequantized pools are computed inside the step) and gives eager's tokens."""
    import kvpolicy.generation as generation

    monkeypatch.setattr(generation, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    ids = torch.tensor([_prompts((60,))[0]])
    policy = kvpolicy.get_policy("h2o", kv_budget=20, evict_during_decode=True, kv_bits=4)
    eager = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=12)
    compiled = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=12, compile=True)
    torch._dynamo.reset()
    assert compiled.token_ids == eager.token_ids
