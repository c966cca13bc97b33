"""``kvpolicy bench kernel``: the decode kernels compiled for H100/H200 without a GPU, read from their SASS.

The targets of the GPU decode issue are asserted on the compiled code itself: no spills, whole waves
(splits chosen from the compiled kernel's occupancy), and an issue ceiling of at least twice the card's
HBM bandwidth for every dense shape; latent attention falls back to the torch path by a stated rule.
Needs Triton with its nvidia backend (the ``dev`` extra's Linux wheel ships ptxas and cuobjdump).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpolicy.kernels import paged_decode as pd


def _tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


needs_tools = pytest.mark.skipif(
    not _tools(), reason="Triton's nvidia backend (ptxas, cuobjdump) is not installed"
)

#: The fields ``--json`` promises for every kernel row.
FIELDS = (
    "registers",
    "spills",
    "shared_bytes",
    "programs_per_sm",
    "waves",
    "instructions_per_byte",
    "issue_ceiling_tbps",
    "hbm_tbps",
)


def test_occupancy_follows_registers_and_shared_memory():
    h100 = pd.Card(sms=132)
    assert pd.occupancy(128, 9_216, 4, h100) == 4  # the previous kernel: 128 registers, 4 programs
    assert pd.occupancy(167, 9_216, 4, h100) == 3  # 7 query heads per KV head compiled to 167: 3, not 4
    assert pd.occupancy(64, 100_000, 4, h100) == 2  # shared memory bounds it
    assert pd.occupancy(32, 0, 4, h100) == 16  # 64 resident warps


def test_splits_fill_whole_waves():
    slots = 132 * 4
    for rows, width in ((8, 2049), (8, 129), (4, 2049), (512, 129), (256, 2049)):
        splits = pd.choose_splits(rows, width, slots)
        assert 1 <= splits <= width
        per = -(-width // splits)
        assert (splits - 1) * per < width  # every split starts on a page
        waves = rows * splits / slots
        assert waves <= 1 or waves / -(-waves // 1) >= 0.9, (rows, width, splits, waves)
    assert pd.choose_splits(8, 2049, slots) * 8 > 0.9 * slots  # batch 1 fills the card


def test_main_loop_is_the_backward_branch_holding_the_dots():
    from kvpolicy.bench.kernel import main_loop

    sass = "\n".join(
        [
            "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
            "        /*0010*/                   LDG.E R2, [R4.64] ;",
            "        /*0020*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;",
            "        /*0030*/                   MUFU.EX2 R3, R3 ;",
            "        /*0040*/               @P0 BRA 0x20 ;",
            "        /*0050*/                   IADD3 R5, R5, 0x1, RZ ;",
            "        /*0060*/               @P1 BRA 0x50 ;",
            "        /*0070*/                   EXIT ;",
        ]
    )
    assert main_loop(sass) == (3, 1)  # 0x20..0x40: three instructions, one dot
    assert main_loop("        /*0000*/                   EXIT ;") == (0, 0)


@needs_tools
def test_dense_shapes_meet_the_targets_on_h100_and_h200():
    from kvpolicy.bench.kernel import report

    rows = report(["llama-3.1-8b", "qwen2.5-7b"], ["h100", "h200"], [1, 64], [8192, 131072])
    splits = [r for r in rows if r.kernel.startswith("split")]
    assert len(splits) == 2 * 2 * 2 * 2 * 2  # shapes x cards x batches x contexts x variants
    for r in splits:
        assert r.spills == 0, r
        assert r.issue_ceiling_tbps >= 2 * r.hbm_tbps, r
        assert r.waves <= 1 or r.waves / -(-r.waves // 1) >= 0.9, r
        assert r.meets_targets, r
        assert r.instructions_per_byte < 0.1  # the broadcast-reduce kernel compiled to ~0.9
    merges = [r for r in rows if r.kernel == "merge"]
    assert merges and all(r.spills == 0 and r.merge_us < 10 for r in merges)
    # Qwen2.5-7B's 7 query heads per KV head: the occupancy that sets its splits is the compiled one
    qwen = next(r for r in splits if r.shape == "qwen2.5-7b" and r.batch == 1 and r.context == 131072)
    assert qwen.programs_per_sm == pd.occupancy(
        qwen.registers, qwen.shared_bytes, pd.NUM_WARPS, pd.Card(sms=132)
    )


@needs_tools
def test_latent_attention_takes_the_torch_path_by_the_stated_rule(capsys):
    from kvpolicy.cli import main

    assert (
        main(
            [
                "bench",
                "kernel",
                "--shape",
                "deepseek-v3-latent",
                "--gpu",
                "h200",
                "--lengths",
                "8192",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert {r["kernel"] for r in rows} == {"torch path"}
    assert all("576 pads past 256" in r["note"] for r in rows)
    assert pd.unserved(128, 576, 512) is not None and pd.unserved(4, 128, 128) is None


@needs_tools
def test_json_rows_carry_every_promised_field(capsys, tmp_path):
    from kvpolicy.cli import main

    out = tmp_path / "kernel.json"
    args = [
        "bench",
        "kernel",
        "--gpu",
        "h100",
        "--batch-sizes",
        "1",
        "--lengths",
        "32768",
        "--json",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == json.loads(out.read_text())
    kernels = [r for r in rows if r["kernel"].startswith("split")]
    assert {r["kernel"] for r in kernels} == {"split (plain)", "split (scores)"}
    for r in kernels:
        assert all(r[f] is not None for f in FIELDS), r


@needs_tools
def test_quantized_variants_compile_without_spills_and_count_their_bytes():
    """The quantized decode kernels (codes and float16 scales, dequantized in registers) compile for the
    H100 without spills; their bytes per tile are the stored ones (codes plus scales), so the report's
    instructions per byte and issue ceiling are those of the quantized traffic."""
    from kvpolicy.bench.kernel import report
    from kvpolicy.storage import KVStorage

    rows = report(
        ["llama-3.1-8b"],
        ["h100"],
        [64],
        [8192],
        storages=[KVStorage(), KVStorage.parse("int4"), KVStorage.parse("fp8"), KVStorage(bits=4)],
    )
    split = {r.kv: r for r in rows if r.kernel == "split (plain)"}
    assert set(split) == {"16-bit", "int4", "fp8", "kivi4"}
    for row in split.values():
        assert row.spills == 0 and row.registers and row.instructions_per_byte
    # same tile of 64 slots: int4 reads (0.5 + 4/32) / 2 of the 16-bit bytes, so per byte it issues more
    assert split["int4"].instructions_per_byte > split["16-bit"].instructions_per_byte
    # KIVI's layout gathers a scale per channel through each slot's record, and masks in its residual
    assert split["kivi4"].instructions_per_byte > split["int4"].instructions_per_byte
