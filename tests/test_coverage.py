"""Which architectures kvpolicy drives (issue 13): every entry of transformers' causal-LM mapping,
checked on a tiny random model built offline, against the recorded results that docs/adapters.md's
table and ``kvpolicy list`` show. A family that starts (or stops) passing fails here until the results
are re-recorded with ``python -m kvpolicy.coverage --write``."""

from __future__ import annotations

import pytest
import transformers

from kvpolicy import coverage

RECORDED = coverage.recorded()
RECORDED_WITH = (
    __import__("json").loads(coverage.RESULTS_PATH.read_text())["transformers"] if RECORDED else None
)
same_transformers = pytest.mark.skipif(
    transformers.__version__ != RECORDED_WITH,
    reason=f"coverage recorded with transformers {RECORDED_WITH}, running {transformers.__version__}",
)

#: The families issue 13 names: each must pass every check.
REQUIRED = (
    "gemma3_text", "gemma2", "phi3", "olmo2", "granite", "glm4", "cohere2", "smollm3", "qwen2_moe",
    "qwen3_moe", "mixtral", "gpt_oss", "llama", "mistral", "qwen2", "qwen3",
)  # fmt: skip


@same_transformers
@pytest.mark.parametrize("model_type", coverage.model_types())
def test_architecture_outcome_is_the_recorded_one(model_type):
    got = coverage.check(model_type)
    want = RECORDED.get(model_type)
    assert want is not None, f"{model_type} is not recorded: run python -m kvpolicy.coverage --write"
    assert (got.status, got.adapter) == (want.status, want.adapter), got.detail
    if got.status == "refused":  # the reason a user reads
        assert got.detail == want.detail


def test_required_families_are_covered_and_the_docs_table_is_the_results():
    covered = {m for m, r in RECORDED.items() if r.status == "covered"}
    assert set(REQUIRED) <= covered
    assert len(covered) >= 15
    text = coverage.DOCS_PATH.read_text()
    table = text.split(coverage.BEGIN)[1].split(coverage.END)[0].strip()
    assert table == coverage.render(list(RECORDED.values()))


def test_refusals_name_the_architecture_and_why():
    import kvpolicy

    model = coverage._build("deepseek_v3")
    with pytest.raises(kvpolicy.RegistryError) as err:
        kvpolicy.get_adapter(model)
    assert "DeepseekV3ForCausalLM" in str(err.value)
    assert "latent (MLA) attention" in str(err.value)
    assert "supported architectures" in str(err.value)
