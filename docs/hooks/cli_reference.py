"""mkdocs hook: render the CLI reference from the argparse parser itself at build time.

``docs/reference/cli.md`` holds a ``<!-- cli-reference -->`` marker; this hook replaces it with
``kvpolicy --help`` and every subcommand's help (recursively), so the page never drifts from the
code. Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"
WIDTH = "100"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def render(width: str = WIDTH) -> str:
    """Markdown for ``kvpolicy --help`` and each subcommand's ``--help``, one section each."""
    from kvpolicy.cli import _parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width  # argparse wraps to the terminal width; make it fixed
    try:
        parts: list[str] = []

        def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
            level = "#" * min(len(words) + 1, 4)
            parts.append(f"{level} `{' '.join(words)}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
            for name, sub in _subcommands(parser):
                walk(sub, [*words, name])

        walk(_parser(), ["kvpolicy"])
        return "\n".join(parts)
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
