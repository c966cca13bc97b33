"""Settings base class and the token-or-fraction budget type shared by every policy.

Policies are immutable settings (pydantic models, ``frozen=True``) plus pure functions; anything that
changes during one request lives in :class:`kvpolicy.state.RequestState`, never here. That is what lets
one policy object serve interleaved requests and threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt


def _check_budget(value: object) -> object:
    """One plain sentence for a bad budget, instead of the two union branches' messages."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"a budget is a token count (an int >= 1) or a fraction of the prompt (a float in (0, 1]), "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError(f"a token budget must be at least 1, got {value}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        hint = (
            f" (for {int(value)} tokens write the int {int(value)})"
            if value > 1 and value.is_integer()
            else ""
        )
        raise ValueError(f"a fractional budget must lie in (0, 1], got {value}{hint}")
    return value


#: A KV or token budget: an ``int`` is a token count (>= 1), a ``float`` a fraction of the prompt
#: length in (0, 1]. Strict types keep ``1`` (one token) and ``1.0`` (the whole prompt) apart.
Budget = Annotated[
    Annotated[StrictInt, Field(ge=1)] | Annotated[StrictFloat, Field(gt=0.0, le=1.0)],
    BeforeValidator(_check_budget),
]


def _odd_kernel(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd to keep the pooled axis length, got {kernel}")
    return kernel


#: A pooling kernel along the token or key axis: odd, so that same-padding pooling keeps the axis's
#: length (the reference pads ``kernel // 2`` each side).
OddKernel = Annotated[int, Field(ge=1), AfterValidator(_odd_kernel)]


def resolve_budget(budget: int | float, prompt_len: int, floor: int = 0) -> int:
    """Token count of ``budget`` for a prompt of ``prompt_len`` tokens.

    Fractions round down as the FastKV reference code does (``int(L * r)``), but never below one
    token nor below ``floor``, and never above the prompt: ``min(L, max(int(L * r), floor, 1))``.
    The floor is what the calling policy needs to stay meaningful (SnapKV: its window plus as many
    selected entries), because a fraction chosen for long prompts would otherwise gut a short one
    (10 % of a 35-token chat prompt is 3 tokens, less than SnapKV's 8-token window). A token count
    (``int``) is what the user asked for and stays exact: the floor does not apply to it.

    Args:
        budget: a token count (``int``) or a fraction of the prompt (``float``).
        prompt_len: tokens in the prompt, ``L``.
        floor: the fewest tokens a fraction resolves to (capped at ``L``); 0 means just one token.
    """
    if isinstance(budget, float):
        return min(prompt_len, max(1, floor, int(prompt_len * budget)))
    return budget


class Settings(BaseModel):
    """Base of every policy's settings: validated, immutable, JSON round-trippable.

    ``kind`` is the registry name of the component; subclasses set it as a ``ClassVar`` and it is
    written into the JSON form so that :func:`kvpolicy.registry.policy_from_dict` can rebuild it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict:
        """The JSON-ready form, tagged with the component kind."""
        return {"kind": self.kind, **self.model_dump(mode="json")}


def budgets_per_row(
    store: dict[Any, Any], prompt_lens: tuple[int, ...], budget: Callable[[int], int], device: Any
) -> Any:
    """Each row's budget ``budget(prompt_len)`` for a batched decode view: an int when the rows
    agree, else a ``(B, 1)`` long tensor on ``device``, made once and kept in ``store`` (a decode step
    then builds nothing on the host)."""
    values = [budget(n) for n in prompt_lens]
    if len(set(values)) == 1:
        return values[0]
    key = ("budgets", tuple(values))
    if key not in store:
        store[key] = torch.tensor(values, device=device)[:, None]
    return store[key]
