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

The built site is checked too (one ``mkdocs build --strict`` per session, into a temporary folder):
it loads nothing from another host (it must work offline), every page it builds can be reached from
the home page by links, and nothing cites the developers' ``../shared/`` notes, which users do not have.
"""

from __future__ import annotations
import __future__

import importlib.util
import os
import posixpath
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

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


#: The README's Python blocks run too (on the stand-in; tests/test_real_model.py checks the first one's
#: printed output on the real model).
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if python_blocks(p.read_text()))]


def stand_in_model(*args, **kwargs):
    """What ``kvpolicy.load_model`` returns while the docs run: SmolLM2-135M's shape, random, tiny."""
    return tiny_llama(layers=30, heads=9, kv_heads=3, hidden=72, vocab=256), ByteTokenizer()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
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
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(ROOT)))
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


# --- The built site -----------------------------------------------------------------------------------

#: Attributes through which a page makes the browser fetch something, by tag (``<a href>`` only links).
ASSET_ATTRS = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "iframe": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "input": ("src",),
    "image": ("href", "xlink:href"),  # inside inline SVG
    "use": ("href", "xlink:href"),
}
#: ``<link rel=...>`` values that only name a URL (the canonical address is site_url's); any other rel
#: (stylesheet, icon, preconnect, preload, ...) fetches or connects.
LINK_NAMES_ONLY = {"canonical", "alternate", "prev", "next", "author", "license", "help"}
EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # http://, https://, //host
CSS_EXTERNAL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.IGNORECASE)
SVG_EXTERNAL = re.compile(r"""\b(?:xlink:)?href\s*=\s*["']\s*(?:[a-z][a-z0-9+.-]*:)?//""", re.IGNORECASE)
#: Developer-only notes (``../shared/`` beside a checkout) that users do not have.
PRIVATE_NOTES = re.compile(r"\.\./shared/|shared/reference/")
PRIVATE_NOTE_NAMES = re.compile(r"\bmethods\.md\b|design-notes|gpu-decode\.md")


class _Page(HTMLParser):
    """The tags of one built page: assets fetched, links followed, Mermaid diagrams, inline CSS."""

    def __init__(self) -> None:
        super().__init__()
        self.assets: list[tuple[str, str]] = []  # ("<tag attr>", URL) of everything the page fetches
        self.links: list[str] = []
        self.mermaid = False
        self.css: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        for name in ASSET_ATTRS.get(tag, ()):
            if name in values:
                urls = (
                    [u.strip().split(" ")[0] for u in values[name].split(",")]
                    if name == "srcset"
                    else [values[name]]
                )
                self.assets += [(f"<{tag} {name}>", url) for url in urls]
        if tag == "link" and not set(values.get("rel", "").lower().split()) <= LINK_NAMES_ONLY:
            self.assets.append((f"<link rel={values.get('rel')}>", values.get("href", "")))
        if tag == "a" and "href" in values:
            self.links.append(values["href"])
        if "mermaid" in values.get("class", "").split():
            self.mermaid = True
        if "style" in values:
            self.css.append(values["style"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.css.append(data)


@dataclass
class Site:
    root: Path
    log: str  # mkdocs' output (its INFO and WARNING lines)

    @cached_property
    def pages(self) -> dict[str, _Page]:
        """Every built HTML page, parsed, by its path relative to the site root."""
        out = {}
        for path in sorted(self.root.rglob("*.html")):
            page = _Page()
            page.feed(path.read_text(encoding="utf-8"))
            out[path.relative_to(self.root).as_posix()] = page
        return out


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Site:
    """The documentation site, built once per session as ``make docs`` builds it (``--strict``)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("needs the docs tools: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}{proc.stderr}"
    return Site(out, proc.stdout + proc.stderr)


def test_site_loads_nothing_from_other_hosts(site):
    bad = []
    for name, page in site.pages.items():
        bad += [f"{name}: {tag} {url}" for tag, url in page.assets if EXTERNAL.match(url)]
        bad += [f"{name}: inline CSS {css.strip()[:80]!r}" for css in page.css if CSS_EXTERNAL.search(css)]
        if page.mermaid:  # Material loads mermaid.js from a CDN for these
            bad.append(f"{name}: a Mermaid diagram (its script comes from a CDN)")
    for path in site.root.rglob("*.css"):
        if CSS_EXTERNAL.search(path.read_text(encoding="utf-8")):
            bad.append(f"{path.relative_to(site.root)}: url() or @import of another host")
    for path in site.root.rglob("*.svg"):
        if SVG_EXTERNAL.search(path.read_text(encoding="utf-8")):
            bad.append(f"{path.relative_to(site.root)}: href to another host")
    assert not bad, "the site must work offline; loaded from another host:\n" + "\n".join(bad)


def _target(page: str, href: str) -> str | None:
    """The built file a link on ``page`` opens, relative to the site root (None: not a page here)."""
    url = urlsplit(href)
    if url.scheme or url.netloc or not url.path:
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page), url.path))
    if url.path.endswith("/") or "." not in posixpath.basename(path):
        path = posixpath.join(path, "index.html")
    return path if path.endswith(".html") else None


def test_every_built_page_is_reachable(site):
    listed = re.search(r'not included in the "nav" configuration:\n((?:\s+- .*\n?)+)', site.log)
    assert listed is None, (
        "pages built but neither in mkdocs.yml's nav nor in its not_in_nav list (add them to the nav, or "
        "link them from the page they belong to and list them in not_in_nav, or exclude_docs them):\n"
        + listed.group(1)
    )
    pages = site.pages
    reached, todo = {"index.html"}, ["index.html"]  # every page carries the whole nav
    while todo:
        name = todo.pop()
        for href in pages[name].links:
            target = _target(name, href)
            if target in pages and target not in reached:
                reached.add(target)
                todo.append(target)
    orphans = sorted(set(pages) - reached - {"404.html"})
    assert not orphans, "built pages no link leads to (not in the nav, linked from no page):\n" + "\n".join(
        orphans
    )


def test_docs_cite_no_developer_only_files(site):
    bad = []
    for path in sorted([*DOCS.rglob("*.md"), ROOT / "mkdocs.yml"]):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PRIVATE_NOTES.search(line) or PRIVATE_NOTE_NAMES.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    # the API reference shows the docstrings: the built pages catch a citation in any of them
    for path in sorted(site.root.rglob("*.html")):
        text = path.read_text(encoding="utf-8")
        bad += [
            f"{path.relative_to(site.root)}: ...{text[max(0, m.start() - 60) : m.end() + 20]}..."
            for m in PRIVATE_NOTES.finditer(text)
        ]
    assert not bad, (
        "cite what users can follow (the paper, the reference implementation's repository), not the "
        "developers' ../shared/ notes:\n" + "\n".join(bad)
    )


def test_site_checks_catch_what_they_look_for():
    page = _Page()
    page.feed(
        '<link rel="canonical" href="https://kvpolicy.invalid/"><link rel="stylesheet" href="//cdn/x.css">'
        '<script src="https://cdn/m.js"></script><img srcset="a.png 1x, https://cdn/b.png 2x">'
        '<div class="mermaid">flowchart TD</div><p style="background: url(\'http://x/y.png\')">'
        '<a href="../other/#part">x</a><a href="https://elsewhere/">y</a>'
    )
    external = [url for _, url in page.assets if EXTERNAL.match(url)]
    assert external == ["//cdn/x.css", "https://cdn/m.js", "https://cdn/b.png"]
    assert page.mermaid and CSS_EXTERNAL.search(page.css[0])
    assert [_target("guide/page/index.html", href) for href in page.links] == ["guide/other/index.html", None]
    assert _target("index.html", "results/compare/") == "results/compare/index.html"
    assert _target("index.html", "images/plot.png") is None
