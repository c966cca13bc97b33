"""The ``kvpolicy`` command: ``list``, ``generate`` and ``demo`` here, ``bench``, ``calibrate`` and
``eval`` in their own modules (:data:`SUBCOMMANDS`).

Preset settings are command-line options derived from the preset's fields, so a third-party preset
gets its options for free: ``--tsp-rate 0.2`` sets ``tsp_rate``, values parse as JSON (``256`` is a
token count, ``0.3`` a fraction, ``null`` unsets) and are validated by the preset itself. A policy name or setting that the kept listing can already tell is
wrong (:func:`kvpolicy.listing.check_policy`) is refused before torch is imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvpolicy.hookspecs import PluginWarning

#: Further subcommands: the module that adds each (``add_parser(sub, model_args)``, setting ``func``)
#: and its one-line help. A module is imported only when its command runs, so ``kvpolicy --help`` and
#: ``kvpolicy list`` load no torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("kvpolicy.bench.cli", "latency and memory of policies vs full KV, with the cost model's bound"),
    "calibrate": ("kvpolicy.calibrate", "choose TSP layer, TSP rate and KV budget for a model, measured"),
    "eval": (
        "kvpolicy.eval.cli",
        "accuracy under a policy: needle-in-a-haystack, RULER, LongBench; compare runs",
    ),
}

#: The errors that are the user's to fix (one line, exit 2), by module and name: a module that was
#: never imported cannot have raised its error, so none is imported to check.
_USER_ERRORS = (
    ("kvpolicy.registry", "RegistryError"),
    ("kvpolicy.models", "ModelLoadError"),
    ("kvpolicy.adapters.base", "AdapterError"),
)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        return True
    return any(
        isinstance(exc, cls)
        for module, name in _USER_ERRORS
        if (cls := getattr(sys.modules.get(module), name, None)) is not None
    )


#: What ``kvpolicy --help`` says above the commands.
DESCRIPTION = (
    "KV-cache compression policies for Hugging Face transformers models. Six commands: list, generate, "
    "demo, bench, calibrate and eval; kvpolicy COMMAND --help for each one's options."
)


class _HelpFormatter(argparse.HelpFormatter):
    """Help as plain text (no reST ``markup``), each option's default where its help does not give
    one already."""

    def _format_text(self, text: str) -> str:
        from kvpolicy.listing import plain

        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        from kvpolicy.listing import plain

        return plain(super()._expand_help(action))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, argparse.SUPPRESS, []) and "default" not in text.lower()
        if shown and (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)):
            return f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """``parser`` and every subcommand below it format their help with :class:`_HelpFormatter`
    (argparse gives a subcommand's parser the default formatter)."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _plain_help(child)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; of the further subcommands only ``command``'s module is imported (the others get
    their help line, enough for ``kvpolicy --help``)."""
    parser = argparse.ArgumentParser(prog="kvpolicy", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="registered policies, components and adapters, with their providers")
    p_list.add_argument(
        "name", nargs="?", help="a preset: print its settings with types, defaults and what they mean"
    )
    p_list.add_argument("--json", action="store_true", help="machine-readable output")

    p_gen = sub.add_parser(
        "generate",
        help="generate a continuation under a policy",
        description="Generate under a policy. Preset settings are options too: e.g. --tsp-rate 0.2 --kv-budget 256.",
    )
    p_gen.add_argument("--policy", default="fullkv", help="preset name (see kvpolicy list)")
    p_gen.add_argument("--policy-config", type=Path, help="JSON policy config (overrides --policy)")
    src = p_gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt (UTF-8 text)")
    src.add_argument(
        "--context-file",
        type=Path,
        help="compress this file's text once (query-agnostic), then answer each --question from that cache",
    )
    p_gen.add_argument(
        "--question", action="append", help="a question about --context-file's text (repeat for several)"
    )
    _model_args(p_gen)
    p_gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p_gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p_gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p_gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --sample)")
    p_gen.add_argument("--seed", type=int, help="random seed (with --sample)")
    p_gen.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    p_gen.add_argument(
        "--graphs",
        action="store_true",
        help="replay the decode step from recorded CUDA graphs (the fast path on a GPU; same tokens)",
    )
    p_gen.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p_gen.add_argument("--json", action="store_true", help="print text and stats as JSON")

    p_demo = sub.add_parser(
        "demo", help="needle-in-a-haystack: full KV vs SnapKV vs FastKV on the embedded model"
    )
    _model_args(p_demo)
    p_demo.add_argument("--length", type=int, default=2000, help="prompt length in tokens (default 2000)")
    p_demo.add_argument("--depths", type=int, default=5, help="needle depths from 0 to 100%% (default 5)")
    p_demo.add_argument(
        "--haystack-dir", type=Path, help="folder of .txt files (default: the Paul Graham essays)"
    )
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name == command:  # adds its subcommand and sets `func` (called with the parsed args)
            importlib.import_module(module).add_parser(sub, _model_args)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    _plain_help(parser)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--device", help="e.g. cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        help=(
            "CPU threads for torch (default: torch's, one per core). On a machine other jobs share, "
            "1 is often several times faster; the thread count and the load are printed beside timings"
        ),
    )


def parse_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """``["--kv-budget", "256", "--tsp-rate", "0.2"]`` -> ``{"kv_budget": 256, "tsp_rate": 0.2}``."""
    out: dict[str, Any] = {}
    items = list(extra)
    i = 0
    while i < len(items):
        flag = items[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ValueError(f"unexpected argument {flag!r}; policy settings look like --kv-budget 256")
        name, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ValueError(f"option {flag} needs a value")
            value = items[i + 1]
            i += 1
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[name.replace("-", "_")] = parsed
        i += 1
    return out


def read_prompt_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file not found: {path}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"prompt file {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        ) from None
    if "\x00" in text:
        raise ValueError(f"prompt file {path} contains NUL bytes; it looks binary, not text")
    if not text.strip():
        raise ValueError(f"prompt file {path} is empty")
    return text


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from the options ``_model_args`` added."""
    from kvpolicy.models import load_model
    from kvpolicy.threads import set_threads

    set_threads(getattr(args, "threads", None))
    return load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)


def cmd_list(args: argparse.Namespace) -> int:
    from kvpolicy.listing import listing

    with warnings.catch_warnings():
        if not args.json:  # the table lists the plugin problems itself: no second copy on stderr
            warnings.simplefilter("ignore", PluginWarning)
        data = listing()
    if args.name is not None:
        preset = data["presets"].get(args.name)
        if preset is None:
            from kvpolicy.listing import unknown

            raise unknown("policy", args.name, data["presets"])
        if args.json:
            record = {"name": args.name, "settings": preset["settings"], "measured": preset["measured"]}
            print(json.dumps(record, indent=2))
        else:
            print(preset["text"])
        return 0
    rows = data["entries"]
    covered, refused = data["architectures"]["covered"], data["architectures"]["refused"]
    problems = data["problems"]
    if args.json:
        architectures = {"covered": covered, "refused": refused}
        print(json.dumps({"entries": rows, "architectures": architectures, "problems": problems}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kvpolicy registry")
    for col in ("name", "category", "provider", "description"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["category"], row["provider"], row["description"])
    console = Console()
    if not console.is_terminal:
        console.width = 200  # scripts and logs: one line per entry
    console.print(table)
    if covered:
        console.print(
            f"architectures covered ({len(covered)}, each tested equal to transformers: docs/adapters.md): "
            + ", ".join(sorted(covered)),
            soft_wrap=not console.is_terminal,
        )
        console.print(
            f"refused with a reason: {', '.join(sorted(refused))}", soft_wrap=not console.is_terminal
        )
    if problems:
        console.print(f"plugin problems ({len(problems)}; every other entry above works):")
        for problem in problems:
            console.print(f"  - {problem}", soft_wrap=True, markup=False)
    return 0


def _policy_for(args: argparse.Namespace, extra: list[str], model: Any = None) -> Any:
    """The policy ``generate`` runs (:func:`kvpolicy.calibrated.resolve_policy`, as eval's): a preset
    name is built for ``model``, whose measured settings fill what the user did not set, and a line
    on stderr says so."""
    from kvpolicy.calibrated import resolve_policy

    policy, _, note, _ = resolve_policy(args.policy, parse_overrides(extra), args.policy_config, model)
    if model is not None and note:
        print(f"kvpolicy: note: {note}", file=sys.stderr)
    return policy


def check_model_source(args: argparse.Namespace) -> None:
    """A ``--model`` that is neither a local folder, a packaged model nor a hub id that can be fetched
    (no hub, not cached) is refused at once, before torch is imported (:func:`kvpolicy.models.check_source`)."""
    from kvpolicy.models import check_source

    check_source(args.model, args.gguf_file)


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    if (args.context_file is None) != (args.question is None):
        raise ValueError("--question needs --context-file, and --context-file needs at least one --question")
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "compile": args.compile,
        "graphs": args.graphs,
        "chat": False if args.no_chat else None,
    }
    text = read_prompt_file(args.context_file or args.prompt_file) if args.prompt is None else args.prompt
    check_model_source(args)
    _policy_for(args, extra)  # a bad setting the listing could not tell is reported before the model loads
    from kvpolicy.generation import generate
    from kvpolicy.threads import CpuLoad

    if args.context_file is not None:
        context = text
        model, tokenizer = load_from_args(args)
        policy = _policy_for(args, extra, model)
        outs = generate(model, tokenizer, policy=policy, context=context, questions=args.question, **sampling)
        return _print_answers(args, policy, outs)
    prompt = text
    model, tokenizer = load_from_args(args)
    policy = _policy_for(args, extra, model)
    out = generate(model, tokenizer, prompt, policy=policy, **sampling)
    s = out.stats
    if args.json:
        record = {"text": out.text, "policy": policy.to_dict(), "stats": {**vars(s)}}
        print(json.dumps(record, indent=2))
        return 0
    print(out.text)
    cpu = CpuLoad.now()
    print(
        f"\n[{policy.describe()}] prompt {s.prompt_tokens} tok, prefill {s.prefill_seconds:.3f}s, "
        f"decode {1000 * s.decode_seconds_per_token:.1f} ms/tok, KV {s.kv_bytes / 2**20:.2f} MiB, "
        f"tokens per layer {min(s.tokens_per_layer)}..{max(s.tokens_per_layer)}; {cpu.describe()}",
        file=sys.stderr,
    )
    if cpu.warning():
        print(f"kvpolicy: {cpu.warning()}", file=sys.stderr)
    return 0


def _print_answers(args: argparse.Namespace, policy: Any, outs: list[Any]) -> int:
    """Each question and its answer (``--json``: a list of records)."""
    if args.json:
        records = [
            {"question": q, "text": o.text, "stats": {**vars(o.stats)}}
            for q, o in zip(args.question, outs, strict=True)
        ]
        print(json.dumps({"policy": policy.to_dict(), "answers": records}, indent=2))
        return 0
    for i, (question, out) in enumerate(zip(args.question, outs, strict=True)):
        if i:
            print()
        print(f"Q: {question}")
        print(f"A: {out.text}")
    s = outs[0].stats
    print(
        f"\n[{policy.describe()}] {len(outs)} answers from one compressed context; answer 1: prompt "
        f"{s.prompt_tokens} tok (context + question), prefill {s.prefill_seconds:.3f}s, "
        f"KV {s.kv_bytes / 2**20:.2f} MiB",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_model_source(args)
    from kvpolicy.demo import run_demo

    model, tokenizer = load_from_args(args)
    return run_demo(
        model, tokenizer, length=args.length, n_depths=args.depths, haystack_dir=args.haystack_dir
    )


def _generate_help(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """``generate --policy NAME --help``: the command's help, then the preset's own settings (they are
    options too, but argparse cannot know them before the preset is chosen)."""
    from kvpolicy.listing import listing

    presets = listing()["presets"]
    name = argv[argv.index("--policy") + 1] if argv.index("--policy") + 1 < len(argv) else ""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["generate"].print_help()
    if name not in presets:
        from kvpolicy.listing import unknown

        print(f"\nkvpolicy: error: {unknown('policy', name, presets)}", file=sys.stderr)
        return 2
    print("\npreset " + presets[name]["text"])
    return 0


def _check_policy_fast(args: argparse.Namespace, extra: list[str]) -> None:
    """``generate`` and ``eval``: refuse a policy name or setting the kept listing can tell is wrong,
    before anything imports torch (:func:`kvpolicy.listing.check_policy`; the preset's own validators
    still run before the model loads)."""
    if args.command not in ("generate", "eval") or not isinstance(getattr(args, "policy", None), str):
        return
    if getattr(args, "policy_config", None) is not None:
        return  # the file's settings are checked when it is read
    from kvpolicy.listing import check_policy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # reported again where the registry is built
        check_policy(args.policy, parse_overrides(extra))


def _check_bench_policies(argv: list[str]) -> None:
    """``bench prefill|e2e --policy NAME:key=value,...``: the names and their own settings checked from
    the kept listing before the bench module (and torch) is imported. Settings given as separate
    options (``--kv-budget 0.1``) are told from the bench's own options only by its parser: the full
    validation checks those."""
    words = [a for a in argv if not a.startswith("-")]
    if words[:1] != ["bench"] or "kernel" in words or {"-h", "--help"} & set(argv):
        return
    specs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--policy"]
    specs += [a.split("=", 1)[1] for a in argv if a.startswith("--policy=")]
    if not specs:
        return
    from kvpolicy.listing import check_policy

    for spec in specs:
        name, _, rest = spec.partition(":")
        pairs = [item.split("=", 1) for item in rest.split(",")] if rest else []
        if any(len(pair) != 2 for pair in pairs):
            continue  # the bench says how a spec is written
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            check_policy(name, parse_overrides([f"--{k}={v}" for k, v in pairs]))


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A plugin's problem as one plain line (not Python's warning format with an internal path)."""
    if issubclass(category, PluginWarning):
        print(f"kvpolicy: warning: {message}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, *args, **kwargs)


_SHOW_WARNING = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_bench_policies(argv)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"kvpolicy: error: {exc}", file=sys.stderr)
        return 2
    parser = _parser(next((a for a in argv if not a.startswith("-")), None))
    if argv[:1] == ["generate"] and ({"-h", "--help"} & set(argv)) and "--policy" in argv:
        return _generate_help(parser, argv)
    args, extra = parser.parse_known_args(argv)
    # Policy settings arrive as unknown options (--kv-budget 256); commands that take them say so
    # with `accepts_policy_options` and find them in `args.policy_options`.
    if extra and args.command != "generate" and not getattr(args, "accepts_policy_options", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.policy_options = extra
    try:
        _check_policy_fast(args, extra)
        if args.command == "list":
            return cmd_list(args)
        if args.command == "generate":
            return cmd_generate(args, extra)
        if args.command == "demo":
            return cmd_demo(args)
        return int(args.func(args))
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"kvpolicy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
