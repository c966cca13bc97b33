"""Every ```python block in docs/ runs, so the docs cannot rot.

The convention (also on the docs' authoring pages):

* Each page is one test. Its Python blocks run in order in one namespace, like a doctest session:
  a later block may use what an earlier one defined (``from __future__ import annotations`` too).
* They run on a stand-in for the embedded model: ``kvpolicy.load_model()`` returns a tiny random
  Llama with SmolLM2-135M's layer and head counts (30 layers, 9 query / 3 KV heads) and a
  byte-level tokenizer, so the examples run in seconds and need no download. The working
  directory is a fresh temporary one.
* ``<!-- not-runnable: REASON -->`` right before a block (blank lines allowed) skips it; the
  reason is required.
* ``<!-- test-setup ... -->`` (an HTML comment, so not shown) runs the Python inside it at that
  point, for setup a reader does not need to see.
* Snippet includes inside a block (pymdownx.snippets, how pages show the real files) are expanded
  as mkdocs does: a ``--8<--`` line, one ``path`` per line, a ``--8<--`` line (the block form, which
  ``ruff format`` leaves alone), or one ``--8<-- "path"`` line. A path is a whole file,
  ``path:start:end`` for lines, or ``path:name`` for the lines between ``--8<-- [start:name]`` and
  ``--8<-- [end:name]``; paths are relative to the repository root.
* A page using ``kvpolicy_keynorm`` is skipped when that package is not installed
  (``pip install -e contrib/kvpolicy-keynorm``; ``make setup`` does).
"""

from __future__ import annotations
import __future__

import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import kvpolicy
from kvpolicy.testing import ByteTokenizer, one_thread, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")
NOT_RUNNABLE = re.compile(r"^\s*<!--\s*not-runnable\s*:(?P<reason>.*?)-->\s*$")
SETUP_START = re.compile(r"^\s*<!--\s*test-setup\b(?P<rest>.*)$")
SNIPPET = re.compile(r'^(?P<indent>[ \t]*)-{1,}8<-{1,}[ \t]+"(?P<target>[^"]+)"[ \t]*$')
SNIPPET_BLOCK = re.compile(r"^[ \t]*-{1,}8<-{1,}[ \t]*$")
SECTION = re.compile(r"-{1,}8<-{1,}\s*\[(?P<kind>start|end):(?P<name>[\w-]+)\]")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence (or of the setup comment)
    code: str
    skip: str | None = None  # the not-runnable reason
    setup: bool = False


def include(target: str) -> str:
    """The text a ``--8<-- "target"`` line stands for (whole file, line range or named section)."""
    path, _, spec = target.partition(":")
    text = (ROOT / path).read_text()
    lines = text.splitlines()
    if spec and all(part.isdigit() or part == "" for part in spec.split(":")):
        start, _, end = spec.partition(":")
        lines = lines[int(start or 1) - 1 : int(end) if end else None]
    elif spec:
        inside, picked = False, []
        for line in lines:
            marker = SECTION.search(line)
            if marker and marker["name"] == spec:
                inside = marker["kind"] == "start"
                continue
            if inside:
                picked.append(line)
        assert picked, f"section {spec!r} not found in {path}"
        lines = picked
    return "\n".join(line for line in lines if not SECTION.search(line))


def expand(code: str) -> str:
    """``code`` with its snippet includes replaced by the files' text."""
    out: list[str] = []
    block = False  # inside the block form: a --8<-- line, one target per line, a --8<-- line
    for line in code.splitlines():
        if SNIPPET_BLOCK.match(line):
            block = not block
        elif block:
            if line.strip():
                out.append(include(line.strip()))
        elif m := SNIPPET.match(line):
            out.append(include(m["target"]))
        else:
            out.append(line)
    return "\n".join(out)


def python_blocks(text: str) -> list[Block]:
    """The page's Python blocks and setup comments, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: str | None = None  # not-runnable reason waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := NOT_RUNNABLE.match(line):
            pending = m["reason"].strip()
            assert pending, f"line {i + 1}: <!-- not-runnable: ... --> needs a reason"
            i += 1
            continue
        if m := SETUP_START.match(line):
            body, j = [m["rest"]], i
            while "-->" not in body[-1]:
                j += 1
                body.append(lines[j])
            body[-1] = body[-1].split("-->")[0]
            blocks.append(Block(i + 1, "\n".join(body).strip("\n"), setup=True))
            i = j + 1
            continue
        if m := FENCE.match(line):
            indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
            j, body = i + 1, []
            while j < len(lines) and not lines[j].strip().startswith(fence):
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            if lang in ("python", "py", "python3"):
                blocks.append(Block(i + 1, expand("\n".join(body)), skip=pending))
            pending = None
            i = j + 1
            continue
        if line.strip():
            pending = None  # a marker applies only to the block right after it
        i += 1
    return blocks


PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p.read_text()))


def stand_in_model(*args, **kwargs):
    """What ``kvpolicy.load_model`` returns while the docs run: SmolLM2-135M's shape, random, tiny."""
    return tiny_llama(layers=30, heads=9, kv_heads=3, hidden=72, vocab=256), ByteTokenizer()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    text = page.read_text()
    if "kvpolicy_keynorm" in text and importlib.util.find_spec("kvpolicy_keynorm") is None:
        pytest.skip("needs the contrib package: pip install -e contrib/kvpolicy-keynorm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kvpolicy, "load_model", stand_in_model)
    monkeypatch.setattr("kvpolicy.models.load_model", stand_in_model)
    # Pages show conftest.py files asking pytest to rewrite kvpolicy.testing's asserts; it is already
    # imported here, so that would only warn.
    monkeypatch.setattr(pytest, "register_assert_rewrite", lambda *names: None)
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(DOCS)))
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)  # pydantic resolves annotations through it
    flags = 0  # __future__ imports carry over to later blocks, as in doctest
    for block in python_blocks(text):
        if block.skip is not None:
            continue
        try:
            code = compile(block.code, f"{page.relative_to(ROOT)}:{block.line}", "exec", flags=flags)
            flags |= code.co_flags & __future__.annotations.compiler_flag
            with one_thread():  # the stand-in model is tiny: threads only add overhead
                exec(code, module.__dict__)
        except Exception as exc:
            kind = "test-setup comment" if block.setup else "python block"
            raise AssertionError(
                f"the {kind} at {page.relative_to(ROOT)}:{block.line} failed: {type(exc).__name__}: {exc}"
            ) from exc


def test_not_runnable_blocks_give_a_reason():
    for page in DOCS.rglob("*.md"):
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if "not-runnable" in line:
                m = NOT_RUNNABLE.match(line)
                assert m and m["reason"].strip(), f"{page}:{n}: write <!-- not-runnable: REASON -->"


def test_harness_reads_markers_snippets_and_setup():
    text = """
<!-- test-setup
x = 1
-->
```python
y = x + 1
```

<!-- not-runnable: needs the real model -->

```python
kvpolicy.load_model("big")
```
<!-- not-runnable: only for the next block -->
Some prose.
```python
--8<-- "contrib/kvpolicy-keynorm/src/kvpolicy_keynorm/policy.py:scoring"
```
```python
--8<--
contrib/kvpolicy-keynorm/src/kvpolicy_keynorm/plugin.py
--8<--
```
```bash
not python
```
"""
    blocks = python_blocks(text)
    assert [(b.setup, b.skip) for b in blocks] == [
        (True, None),
        (False, None),
        (False, "needs the real model"),
        (False, None),
        (False, None),
    ]
    assert blocks[0].code == "x = 1" and blocks[1].code == "y = x + 1"
    assert blocks[3].code.startswith("def keynorm_scores(") and "--8<--" not in blocks[3].code
    assert "def kvpolicy_register_presets()" in blocks[4].code and "--8<--" not in blocks[4].code


def test_cli_reference_covers_every_subcommand():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = (DOCS / "reference" / "cli.md").read_text()
    assert hook.MARKER in page
    rendered = hook.on_page_markdown(page, None, None, None)
    assert hook.MARKER not in rendered
    from kvpolicy.cli import _parser

    for name, _ in hook._subcommands(_parser()):
        assert f"`kvpolicy {name}`" in rendered and f"usage: kvpolicy {name}" in rendered
