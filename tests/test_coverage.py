"""Which architectures kvpolicy drives (issue 13): every entry of transformers' causal-LM mapping,
checked on a tiny random model built offline, against the recorded results that docs/adapters.md's
table and ``kvpolicy list`` show. Runs on any transformers in the supported range (CI: the newest
release and the floor): a recorded-covered family that stops passing always fails; on the recorded
version any change fails until the results are re-recorded with ``python -m kvpolicy.coverage
--write``, elsewhere other changes are reported as warnings."""

from __future__ import annotations

import warnings

import pytest
import transformers

from kvpolicy import coverage

RECORDED = coverage.recorded()
RECORDED_WITH = (
    __import__("json").loads(coverage.RESULTS_PATH.read_text())["transformers"] if RECORDED else None
)
SAME_TRANSFORMERS = transformers.__version__ == RECORDED_WITH

#: The families issue 13 names: each must pass every check.
REQUIRED = (
    "gemma3_text", "gemma2", "phi3", "olmo2", "granite", "glm4", "cohere2", "smollm3", "qwen2_moe",
    "qwen3_moe", "mixtral", "gpt_oss", "llama", "mistral", "qwen2", "qwen3",
)  # fmt: skip


#: Refusals that say the installed transformers' modeling code of a family cannot be driven (its
#: attention is not routed through the interface, or its layers drop the keyword arguments): on a
#: version other than the recorded one, a covered family refused for one of these is reported.
UPSTREAM = (
    "does not go through transformers' AttentionInterface",
    "do not pass keyword arguments to the attention function",
)


class CoverageChange(UserWarning):
    """An architecture's outcome on this transformers differs from the record, and that is no failure
    (a new architecture, or a refusal worded otherwise): reported in the test summary."""


@pytest.mark.parametrize("model_type", sorted({*coverage.model_types(), *RECORDED}))
def test_architecture_outcome_is_the_recorded_one(model_type):
    """On any transformers in the supported range: every architecture recorded as covered that this
    version has is still covered (a failure otherwise; on another version, a refusal because that
    version's modeling code does not route attention through the interface is reported instead). On the recorded version every outcome is exactly
    the recorded one; on another, new architectures and changed refusals are reported, not failed."""
    want = RECORDED.get(model_type)
    if model_type not in coverage.model_types():
        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}")
    got = coverage.check(model_type)
    if want is not None and want.status == "covered":
        if not SAME_TRANSFORMERS and got.status == "refused" and any(r in got.detail for r in UPSTREAM):
            # an older transformers whose modeling code of this family does not attend through the
            # AttentionInterface yet (GPT-J and CodeGen before 5.2x): refused, which is the right answer
            warnings.warn(
                CoverageChange(
                    f"{model_type} on transformers {transformers.__version__}: refused ({got.detail}); "
                    f"covered with {RECORDED_WITH}"
                ),
                stacklevel=1,
            )
            return
        assert (got.status, got.adapter) == (want.status, want.adapter), (
            f"{model_type} was covered with transformers {RECORDED_WITH}, on {transformers.__version__}: "
            f"{got.status}: {got.detail}"
        )
        return
    if SAME_TRANSFORMERS:
        assert want is not None, f"{model_type} is not recorded: run python -m kvpolicy.coverage --write"
        assert (got.status, got.adapter) == (want.status, want.adapter), got.detail
        if got.status == "refused":  # the reason a user reads
            assert got.detail == want.detail
    elif want is None or (got.status, got.detail) != (want.status, want.detail):
        recorded = f"recorded {want.status}" if want else "not recorded"
        warnings.warn(
            CoverageChange(
                f"{model_type} on transformers {transformers.__version__}: {got.status} ({got.detail}); "
                f"{recorded} with {RECORDED_WITH}"
            ),
            stacklevel=1,
        )


def test_required_families_are_covered_and_the_docs_table_is_the_results():
    covered = {m for m, r in RECORDED.items() if r.status == "covered"}
    assert set(REQUIRED) <= covered
    assert len(covered) >= 15
    text = coverage.DOCS_PATH.read_text()
    table = text.split(coverage.BEGIN)[1].split(coverage.END)[0].strip()
    assert table == coverage.render(list(RECORDED.values()))


def test_refusals_name_the_architecture_and_why():
    import kvpolicy

    model = coverage._build("minimax")
    with pytest.raises(kvpolicy.RegistryError) as err:
        kvpolicy.get_adapter(model)
    assert "MiniMaxForCausalLM" in str(err.value)
    assert "own cache class (MiniMaxCache)" in str(err.value)
    assert "supported architectures" in str(err.value)
