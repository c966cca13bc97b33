"""Half (0) of the kvpress-quantized comparison, run by the main venv (``.venv/bin/python``).

Writes ``OUT/prompts.json``: the converted embedded model's folder (transformers 5.2 reads it as it is),
the needle prompts' token ids built by kvpolicy (chat template included; one tokenization for both
sides) and the needle, so the kvpress side never imports kvpolicy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LENGTHS = (1024, 2048)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from kvpolicy.eval import needle
    from kvpolicy.models import embedded_model_dir

    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    haystack = needle.load_haystack(needle.find_haystack_dir())
    prompts = [
        {"length": n, "depth": d, "ids": needle.build_sample(tokenizer, n, d, haystack).input_ids}
        for n in LENGTHS
        for d in DEPTHS
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"model_dir": str(model_dir), "needle": needle.NEEDLE, "prompts": prompts}
    (args.out / "prompts.json").write_text(json.dumps(data))
    print(f"{len(prompts)} prompts ({[len(p['ids']) for p in prompts]} tokens), model {model_dir}")


if __name__ == "__main__":
    main()
