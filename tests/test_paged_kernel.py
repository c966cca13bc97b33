"""The Triton split-K decode kernel (kvpolicy.kernels.paged_decode) against the torch paged path and fp64.

Runs on a CPU through Triton's interpreter (tiny shapes: it is slow), so the kernels' indexing, masking,
online softmax, split merge, soft-capping, sinks and probabilities are checked everywhere Triton is
installed. The compiled kernels are checked only where CUDA is (``test_compiled_kernels_on_cuda``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch

from kvpolicy.cache import PagedLayer, paged_attention

TRITON_ABSENT = (
    "Triton is not installed: `pip install triton` (it ships with torch's CUDA wheels); with "
    "TRITON_INTERPRET=1 these tests run its interpreter on a CPU"
)

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    """The kernel entry point, with Triton's interpreter opted into for CPU tensors.

    Only for the test: the variable is read at each call on CPU tensors (kvpolicy wraps its kernels for
    the interpreter itself, whenever Triton was imported: the conftest's transformers imports pull it
    in before this module). Left set, it would also turn every Triton kernel that torch.compile
    generates on a GPU later in the session into interpreted ones.
    """
    pytest.importorskip("triton", reason=TRITON_ABSENT)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kvpolicy.kernels.paged_decode import paged_decode_attention

    return paged_decode_attention


def build(
    lengths: list[list[int]],
    *,
    block: int = 4,
    d: int = 8,
    dv: int = 8,
    reserve: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedLayer:
    """A layer of ``B = len(lengths)`` sequences with ``lengths[b][h]`` entries per KV head (uneven heads
    go through ``store``'s counts), random keys/values, and ``reserve`` spare slots per row."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for counts in lengths:
        h, n = len(counts), max(max(counts), 1)
        key = torch.randn(h, n, d, generator=g).to(dtype)
        value = torch.randn(h, n, dv, generator=g).to(dtype)
        same = len(set(counts)) == 1 and counts[0] == n
        parts.append((key, value, torch.arange(n).expand(h, -1), None if same else torch.tensor(counts)))
    layer = PagedLayer(block_size=block)
    layer.store(parts, reserve=reserve)
    return layer


def query_for(layer: PagedLayer, n_rep: int, seed: int = 1) -> torch.Tensor:
    """``(B, H_q, 1, d)`` queries in the pool's dtype, laid out non-contiguously (as a model's are after
    its head transpose)."""
    g = torch.Generator().manual_seed(seed)
    b, h_q, d = layer.num_seqs, layer.num_heads * n_rep, layer.k_pool.shape[-1]
    return torch.randn(b, 1, h_q, d, generator=g).to(layer.k_pool.dtype).transpose(1, 2)


def reference(
    query: torch.Tensor,
    layer: PagedLayer,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 attention over each row's slots ``0..length-1`` (dense, no pages): ``(B, 1, H_q * d_v)`` and
    ``(B, H_kv, n_rep, slots)`` probabilities, zero beyond each row's length."""
    b, h_q, _, d = query.shape
    h = layer.num_heads
    valid = layer.valid()  # (B, H, slots)
    keys = layer.dense(layer.k_pool).double().where(valid[..., None], 0.0)  # empty slots may hold anything
    values = layer.dense(layer.v_pool).double().where(valid[..., None], 0.0)
    q = query.double().reshape(b, h, h_q // h, d)
    scores = torch.einsum("bhrd,bhsd->bhrs", q, keys) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, h, -1, 1).expand(b, -1, -1, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1).nan_to_num(0.0)  # a row without entries: all -inf, no sink
    out = torch.einsum("bhrs,bhsv->bhrv", probs, values)
    return out.reshape(b, 1, -1), probs


def check(
    kernel: Kernel,
    layer: PagedLayer,
    n_rep: int,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    splits: int | None = None,
    torch_path: bool = True,
) -> None:
    """The kernel equals fp64 (fp32: 1e-5; fp16: the output's rounding) and, with ``torch_path``, the
    torch paged path (which reads whole pages, so it cannot run on a pool with poisoned empty slots)."""
    query = query_for(layer, n_rep)
    scaling = layer.k_pool.shape[-1] ** -0.5
    out, probs = kernel(query, layer, scaling, want_probs=True, softcap=softcap, sinks=sinks, splits=splits)
    plain, none = kernel(query, layer, scaling, softcap=softcap, sinks=sinks, splits=splits)
    assert none is None
    torch.testing.assert_close(plain, out, rtol=0, atol=0)  # probabilities change nothing else
    b, h_q = query.shape[:2]
    assert out.shape == (b, 1, h_q * layer.v_pool.shape[-1]) and out.dtype == query.dtype
    assert probs is not None and probs.shape == (b, layer.num_heads, n_rep, layer.slots)
    assert probs.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    want_out, want_probs = reference(query, layer, scaling, softcap, sinks)
    fp32 = query.dtype == torch.float32
    torch.testing.assert_close(probs.double(), want_probs, rtol=1e-5, atol=1e-7)
    tol = {"rtol": 1e-5, "atol": 1e-6} if fp32 else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(out.double(), want_out, **tol)
    beyond = ~layer.valid()[:, :, None, :].expand_as(probs)
    assert float(probs[beyond].abs().sum()) == 0.0
    if not torch_path:
        return
    torch_out, torch_probs = paged_attention(
        query, layer, scaling, want_probs=True, softcap=softcap, sinks=sinks
    )
    torch.testing.assert_close(out, torch_out, **tol)
    torch.testing.assert_close(probs, torch_probs, **({"rtol": 1e-5, "atol": 1e-6} if fp32 else tol))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_ragged_batch_matches_fp64_and_the_torch_path(kernel, dtype, splits):
    # two sequences of different lengths, uneven heads, rows over several pages, spare pages (reserve)
    layer = build([[13, 5], [2, 9]], reserve=6, dtype=dtype)
    assert layer.block_table.shape[1] == 5  # 19 slots reserved for the longest row: 5 pages of 4
    check(kernel, layer, n_rep=2, splits=splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_softcap_and_sinks(kernel, dtype):
    layer = build([[11, 7], [3, 10]], reserve=2, dtype=dtype, seed=2)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    check(kernel, layer, n_rep=2, softcap=0.7, splits=2)  # scores beyond the cap: tanh saturates
    check(kernel, layer, n_rep=2, softcap=30.0)  # scores well inside it: tanh(x) ~ x
    check(kernel, layer, n_rep=2, sinks=sinks, splits=3)
    check(kernel, layer, n_rep=2, softcap=5.0, sinks=sinks)


def test_padded_shapes_group_of_three_and_other_value_width(kernel):
    # n_rep, d, d_v and the page size not powers of two: every block dimension is padded and masked
    layer = build([[7, 1, 12]], block=3, d=6, dv=5, reserve=1, seed=3)
    check(kernel, layer, n_rep=3, splits=2)
    check(kernel, layer, n_rep=3, sinks=torch.linspace(-1, 1, 9), softcap=2.0)


def test_after_eviction_and_appends(kernel):
    layer = build([[9, 6], [12, 12]], reserve=1, seed=4)
    layer.evict(torch.tensor([[[0, 4], [-1, -1]], [[11, 3], [5, 5]]]))  # incl. the last slot, a repeat
    assert [layer.row_lengths(0), layer.row_lengths(1)] == [[7, 6], [10, 11]]
    check(kernel, layer, n_rep=2, splits=2)
    g = torch.Generator().manual_seed(5)
    width = layer.block_table.shape[1]
    for step in range(3):  # past the reserve: the cache grows (more block-table columns, new pages)
        key, value = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
        layer.append(key, value, torch.tensor([20 + step, 20 + step]))
    assert layer.block_table.shape[1] > width
    check(kernel, layer, n_rep=2)


def test_slots_beyond_length_are_never_used(kernel):
    layer = build([[5, 2]], reserve=7, seed=6)  # rows hold 5 and 2 of their 12 slots
    # poison every slot at or beyond each row's length: a read of any of them would show up as NaN
    dense_slots = torch.arange(layer.slots)[None, None, :] >= layer.lengths[..., None]  # (B, H, slots)
    flat = layer._slot_flat.view(1, 2, layer.slots)[dense_slots]
    layer.k_pool.view(-1, 8)[flat] = float("nan")
    layer.v_pool.view(-1, 8)[flat] = float("nan")
    check(kernel, layer, n_rep=2, splits=3, torch_path=False)
    check(kernel, layer, n_rep=2, softcap=1.0, sinks=torch.zeros(4), torch_path=False)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_rows_without_entries_give_zeros(kernel, with_sinks):
    layer = build([[0, 6], [3, 0]], seed=7)
    layer.evict(torch.tensor([[[-1], [-1]], [[0], [-1]]]))  # one more entry gone: lengths 0,6 / 2,0
    sinks = torch.tensor([1.0, 0.0, -2.0, 3.0]) if with_sinks else None
    out, probs = kernel(query_for(layer, 2), layer, 0.5, want_probs=True, sinks=sinks, splits=2)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    out = out.view(2, 2, 2, 8)  # (B, H_kv, n_rep, d_v)
    assert float(out[0, 0].abs().sum()) == 0.0 and float(out[1, 1].abs().sum()) == 0.0
    assert float(probs[0, 0].abs().sum()) == 0.0 and float(probs[1, 1].abs().sum()) == 0.0
    check(kernel, layer, n_rep=2, sinks=sinks, splits=2)


def test_splits_come_from_static_shapes_only():
    from kvpolicy.kernels.paged_decode import num_splits

    cpu = torch.device("cpu")
    for rows in (1, 2, 8, 64):
        for width in (1, 2, 5, 33, 2049):
            splits = num_splits(rows, width, cpu)
            assert 1 <= splits <= width
            per = -(-width // splits)
            assert (splits - 1) * per < width  # every split starts on a page of the block table


def test_package_imports_and_reports_unavailable_without_triton():
    # kvpolicy.kernels must import (and say "unavailable") where Triton cannot be imported at all
    code = textwrap.dedent(
        """
        import sys

        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("no triton here")

        sys.meta_path.insert(0, NoTriton())
        import kvpolicy.kernels as kernels

        assert kernels.available() is False
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_available_only_where_it_can_run(kernel, monkeypatch):
    import kvpolicy.kernels

    assert kvpolicy.kernels.available()  # TRITON_INTERPRET=1 here
    assert kvpolicy.kernels.paged_decode_attention is kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kvpolicy.kernels.available() == torch.cuda.is_available()
    layer = build([[3, 2]])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # CPU tensors without the opt-in
        kernel(query_for(layer, 1), layer, 1.0)


#: The compiled kernels on a GPU (a fresh process: the interpreter flag is read when kernels are built).
#: Larger shapes, bf16, a CUDA-graph capture replayed after appends, and no NaN on empty rows.
CUDA_SCRIPT = """
import torch
from kvpolicy.cache import PagedLayer, paged_attention
from kvpolicy.kernels import available, paged_decode_attention

assert available()
g = torch.Generator().manual_seed(0)
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    h, n_rep, d, blk = 4, 4, 128, 64
    parts = []
    for b, n in enumerate((3000, 700)):
        k, v = torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g)
        counts = torch.tensor([n, n // 3, 0 if b else 1, n - 5])
        parts.append((k.to(dtype).cuda(), v.to(dtype).cuda(), torch.arange(n).expand(h, -1).cuda(), counts))
    layer = PagedLayer(block_size=blk)
    layer.store(parts, reserve=100)
    q = torch.randn(2, h * n_rep, 1, d, generator=g).to(dtype).cuda()
    sinks = torch.randn(h * n_rep, generator=g).cuda()
    for softcap, sk in ((None, None), (20.0, sinks)):
        out, probs = paged_decode_attention(q, layer, d**-0.5, True, softcap, sk)
        f32 = PagedLayer(block_size=blk)
        f32.store([(k.float(), v.float(), p, c) for k, v, p, c in parts], reserve=100)
        ref, ref_probs = paged_attention(q.float(), f32, d**-0.5, True, softcap, sk)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-3, atol=1e-5)
        assert torch.isfinite(out).all()
    # a decode step captured once and replayed after appends (lengths change on the device only)
    static_q = q.clone()
    paged_decode_attention(static_q, layer, d**-0.5)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, _ = paged_decode_attention(static_q, layer, d**-0.5)
    for step in range(3):
        layer.append(torch.randn(2, h, 1, d, device="cuda").to(dtype),
                     torch.randn(2, h, 1, d, device="cuda").to(dtype), torch.full((2,), 5000 + step).cuda())
        graph.replay()
        want, _ = paged_decode_attention(static_q, layer, d**-0.5)
        torch.testing.assert_close(static_out, want, rtol=0, atol=0)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA device")
def test_compiled_kernels_on_cuda(kernel):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", CUDA_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]


# -- through the engine ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["h2o-evicting", "duoattention-rolling"])
def test_generation_through_the_kernel_equals_the_torch_path(
    kernel, monkeypatch, tiny_model, prompt_ids, name
):
    """The engine's decode attention picked by ``KVPOLICY_DECODE_ATTENTION`` (the default on CUDA is the
    kernel): greedy tokens equal the torch path's, decode-time eviction (slot probabilities) included,
    eager and graph-replayed."""
    from conftest import TINY_OPTIONS, tiny_policy

    import kvpolicy

    options = {
        "h2o-evicting": {"kv_budget": 20, "evict_during_decode": True},
        "duoattention-rolling": {**TINY_OPTIONS["duoattention"], "rolling": True},
    }[name]
    policy = tiny_policy(name, options)
    ids = prompt_ids[0, :40].tolist()

    def tokens(choice: str, graphs: bool = False) -> list[int]:
        monkeypatch.setenv("KVPOLICY_DECODE_ATTENTION", choice)
        kvpolicy.get_adapter(tiny_model)._attention_fns.clear()  # chosen once per device: choose again
        out = kvpolicy.generate(
            tiny_model, None, input_ids=ids, policy=policy, max_new_tokens=6, graphs=graphs
        )
        return out.token_ids

    torch_path = tokens("torch")
    assert tokens("triton") == torch_path
    # the kernel is one opaque operator (torch.library), so a recorded step replays it too
    assert tokens("triton", graphs=True) == torch_path
    kvpolicy.get_adapter(tiny_model)._attention_fns.clear()


def test_a_bad_decode_attention_choice_is_named(monkeypatch):
    from kvpolicy.kernels import decode_attention_for

    monkeypatch.setenv("KVPOLICY_DECODE_ATTENTION", "flash")
    with pytest.raises(ValueError, match="KVPOLICY_DECODE_ATTENTION='flash': use 'torch' or 'triton'"):
        decode_attention_for(torch.device("cpu"))


def test_a_pool_whose_values_are_its_keys_first_columns(kernel):
    """Latent attention's layout (``shared_values``): the value pool is a view of the key pool's first
    columns (not contiguous). The kernel and the torch path read it as they read a pool of its own,
    through appends and evictions."""
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(1, n, 12, generator=g), None, torch.arange(n)[None], None) for n in (9, 5)]
    parts = [(k, k[..., :8], p, c) for k, _, p, c in parts]
    layer = PagedLayer(block_size=4, shared_values=8)
    layer.store(parts, reserve=3)
    assert layer.v_pool.shape[-1] == 8 and layer.v_pool.data_ptr() == layer.k_pool.data_ptr()
    new = torch.randn(2, 1, 1, 12, generator=g)
    layer.append(new, new[..., :8], torch.tensor([9, 5]))
    layer.evict(torch.tensor([[[2]], [[-1]]]))
    check(kernel, layer, n_rep=3)
    assert layer.nbytes(0) == 9 * 12 * 4  # keys only: the values are inside them


def test_many_splits_merge_in_chunks_of_value_columns(kernel):
    """65 splits (the merge's split axis padded to 128) over 40 value columns (padded to 64, merged 32 at a
    time), one query head per KV head (the dot's 16 rows mostly padding)."""
    from kvpolicy.kernels.paged_decode import merge_chunk

    assert merge_chunk(128, 64) == 32  # so the merge's column chunks are exercised below
    layer = build([[259, 3]], block=4, d=8, dv=40, seed=8)
    assert layer.block_table.shape[1] == 65
    check(kernel, layer, n_rep=1, splits=65)
    check(kernel, layer, n_rep=1, splits=65, sinks=torch.tensor([0.3, -0.2]))
