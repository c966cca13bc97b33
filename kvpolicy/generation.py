"""Generation under a policy: prefill through the adapter, then a decode loop with explicit positions.

Decode positions continue at the original prompt length (design-notes §3), not at the number of
entries the compressed cache holds. :func:`prefill` also hands back a transformers ``Cache`` that
``model.generate`` can continue from (see the README).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvpolicy.devices import module_device
from kvpolicy.interfaces import Policy
from kvpolicy.registry import get_adapter, get_policy
from kvpolicy.state import RequestState


@dataclass
class GenerationStats:
    """What one generation cost.

    Attributes:
        prompt_tokens: prompt length ``L``.
        new_tokens: tokens generated.
        prefill_seconds: one forward of the prompt, scoring, propagation and cache build included.
        decode_seconds: all decode steps (excluding prefill).
        decode_steps: decode forwards run (the first new token comes from the prefill logits).
        tokens_per_layer: tokens each layer processed during prefill.
        discarded_tokens_per_layer: tokens per layer of a pass a restart discarded (GemFilter's filter).
        kv_tokens_per_layer: KV entries kept per layer and KV head after prefill.
        kv_bytes_per_layer: bytes of keys and values each layer kept after prefill.
    """

    prompt_tokens: int
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    discarded_tokens_per_layer: list[int] = field(default_factory=list)
    kv_tokens_per_layer: list[int] = field(default_factory=list)
    kv_bytes_per_layer: list[int] = field(default_factory=list)

    @property
    def decode_seconds_per_token(self) -> float:
        """Seconds per decode forward (one token through every layer)."""
        return self.decode_seconds / self.decode_steps if self.decode_steps else 0.0

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    policy: Policy


@dataclass
class Prefill:
    """Result of :func:`prefill`: last-position logits ``(B, V)`` and the request's state and cache."""

    logits: torch.Tensor
    state: RequestState
    seconds: float

    @property
    def cache(self) -> Any:
        """The compressed cache, a transformers ``Cache`` usable as ``model.generate(past_key_values=...)``."""
        return self.state.cache

    @property
    def next_token(self) -> torch.Tensor:
        """Greedy next token per sequence, ``(B, 1)``."""
        return self.logits.argmax(dim=-1, keepdim=True)


def _resolve_policy(policy: Policy | str | None) -> Policy:
    if policy is None:
        return get_policy("fullkv")
    if isinstance(policy, str):
        return get_policy(policy)
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be a Policy (kvpolicy.compose / kvpolicy.get_policy) or a preset name, "
            f"got {type(policy).__name__}"
        )
    return policy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_input_ids(model: nn.Module, input_ids: Any) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    elif isinstance(input_ids, Sequence) and all(isinstance(t, int) for t in input_ids):
        ids = torch.tensor(list(input_ids), dtype=torch.long)
    else:
        raise TypeError(f"input_ids must be a tensor or a list of ints, got {type(input_ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(
            f"input_ids must be integer token ids of shape (L,) or (1, L), got {tuple(ids.shape)}"
        )
    if ids.shape[0] != 1:
        raise ValueError(
            f"prefill takes one prompt, got batch size {ids.shape[0]}; generate() takes a list of prompts"
        )
    if ids.shape[1] == 0:
        raise ValueError("empty prompt: it has 0 tokens")
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}); got range [{int(ids.min())}, {int(ids.max())}]")
    return ids.long().to(module_device(model.get_input_embeddings()))


def prefill(
    model: nn.Module, input_ids: Any, policy: Policy | str | None = None, reserve: int = 0
) -> Prefill:
    """Run the prompt through ``model`` under ``policy`` and return logits plus the compressed cache.

    ``reserve`` preallocates room for that many decode tokens per layer.
    """
    pol = _resolve_policy(policy)
    ids = _as_input_ids(model, input_ids)
    adapter = get_adapter(model)
    adapter.check_prompt_length(ids.shape[1] + max(reserve, 0))
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    logits, state = adapter.prefill(ids, pol, reserve=reserve)
    _sync(device)
    return Prefill(logits=logits, state=state, seconds=time.perf_counter() - t0)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None
) -> torch.Tensor:
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p, 0.0)  # keep the smallest nucleus >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids of ``prompt``, wrapped in the tokenizer's chat template when it has one (or ``chat``)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("empty prompt: it has 0 characters")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _is_batch(prompt: Any, input_ids: Any) -> bool:
    """A list of prompts (texts, or token-id lists/tensors), as opposed to one prompt."""
    if isinstance(prompt, (list, tuple)):
        return True
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    if isinstance(input_ids, (list, tuple)) and input_ids:
        return not all(isinstance(t, int) for t in input_ids)
    return False


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[str] | None = None,
    policy: Policy | str | None = None,
    *,
    input_ids: Any = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool | None = None,
    batch_size: int | None = None,
) -> Any:
    """Generate a continuation of ``prompt`` (or ``input_ids``) under ``policy``.

    Greedy by default; ``do_sample=True`` samples with ``temperature`` and ``top_p`` (``seed`` makes
    it reproducible). Stops at EOS or ``max_new_tokens``. The prompt is wrapped in the tokenizer's
    chat template when it has one, unless ``chat=False``.

    A *list* of prompts (texts, or token-id lists) returns a list of :class:`GenerationOutput`, one
    per prompt in order, generated in left-padded batches of up to ``batch_size`` (default: all at
    once; prompts are grouped by length to waste little on padding). Greedy output equals running
    each prompt alone: policies see each sequence on its own (:mod:`kvpolicy.ragged`). In a batch,
    ``prefill_seconds`` and ``decode_seconds`` are the batch's.
    """
    if _is_batch(prompt, input_ids):
        return _generate_batch(
            model,
            tokenizer,
            prompt,
            policy,
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            chat=chat,
            batch_size=batch_size,
        )
    _check_sampling(max_new_tokens, do_sample, temperature, top_p)
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt (text) or input_ids")
    pol = _resolve_policy(policy)
    ids = input_ids if input_ids is not None else encode_prompt(tokenizer, prompt, chat)  # type: ignore[arg-type]

    pre = prefill(model, ids, pol, reserve=max_new_tokens)
    state = pre.state
    stats = GenerationStats(
        prompt_tokens=state.prompt_len,
        prefill_seconds=pre.seconds,
        tokens_per_layer=list(state.tokens_per_layer),
        discarded_tokens_per_layer=list(state.discarded_tokens_per_layer),
        kv_tokens_per_layer=state.cache.kv_lengths,
        kv_bytes_per_layer=state.cache.kv_bytes,
    )
    gen = None
    if do_sample and seed is not None:
        gen = torch.Generator(device=pre.logits.device).manual_seed(seed)
    eos = _eos_ids(model, tokenizer)
    adapter = get_adapter(model)
    out: list[int] = []
    logits = pre.logits
    device = pre.logits.device
    _sync(device)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        token = _sample(logits, temperature, top_p, gen) if do_sample else logits.argmax(dim=-1, keepdim=True)
        tok = int(token[0, 0])
        out.append(tok)
        if tok in eos or step == max_new_tokens - 1:
            break
        logits = adapter.decode_step(token, pol, state, step)
        stats.decode_steps += 1
    _sync(device)
    stats.decode_seconds = time.perf_counter() - t0
    stats.new_tokens = len(out)
    text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationOutput(text=text, token_ids=out, stats=stats, policy=pol)


def _check_sampling(max_new_tokens: Any, do_sample: bool, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | None,
    policy: Policy | str | None,
    *,
    input_ids: Any,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int | None,
    chat: bool | None,
    batch_size: int | None,
) -> list[GenerationOutput]:
    _check_sampling(max_new_tokens, do_sample, temperature, top_p)
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt (texts) or input_ids")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    items = list(prompts if prompts is not None else input_ids)  # a (B, L) tensor: its rows
    if not items:
        raise ValueError("empty batch: pass at least one prompt")
    pol = _resolve_policy(policy)
    adapter = get_adapter(model)
    encoded = []
    for i, item in enumerate(items):
        try:
            raw = encode_prompt(tokenizer, item, chat) if prompts is not None else item
            ids = _as_input_ids(model, raw)[0]
            adapter.check_prompt_length(ids.shape[0] + max_new_tokens)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"prompt {i}: {exc}") from None
        encoded.append(ids)
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].shape[0])
    size = batch_size or len(order)
    outputs: dict[int, GenerationOutput] = {}
    gen = None
    if do_sample and seed is not None:
        gen = torch.Generator(device=encoded[0].device).manual_seed(seed)
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        results = _run_batch(
            model,
            tokenizer,
            adapter,
            [encoded[i] for i in chunk],
            pol,
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            gen,
        )
        outputs.update(zip(chunk, results, strict=True))
    return [outputs[i] for i in range(len(encoded))]


def _run_batch(
    model: nn.Module,
    tokenizer: Any,
    adapter: Any,
    prompts: list[torch.Tensor],
    pol: Policy,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    gen: torch.Generator | None,
) -> list[GenerationOutput]:
    from kvpolicy.adapters.batched import decode_step_batch, prefill_batch

    device = prompts[0].device
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, states, cache = prefill_batch(adapter, prompts, pol, reserve=max_new_tokens)
    _sync(device)
    prefill_seconds = time.perf_counter() - t0
    stats = [
        GenerationStats(
            prompt_tokens=state.prompt_len,
            prefill_seconds=prefill_seconds,
            tokens_per_layer=list(state.tokens_per_layer),
            discarded_tokens_per_layer=list(state.discarded_tokens_per_layer),
            kv_tokens_per_layer=cache.kv_lengths(b),
            kv_bytes_per_layer=cache.kv_bytes(b),
        )
        for b, state in enumerate(states)
    ]
    eos = _eos_ids(model, tokenizer)
    outs: list[list[int]] = [[] for _ in prompts]
    done = [max_new_tokens == 0] * len(prompts)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        token = _sample(logits, temperature, top_p, gen) if do_sample else logits.argmax(dim=-1, keepdim=True)
        for b, tok in enumerate(token[:, 0].tolist()):
            if not done[b]:
                outs[b].append(tok)
                done[b] = tok in eos or len(outs[b]) == max_new_tokens
        if all(done):
            break
        logits = decode_step_batch(adapter, token, pol, states, cache, step)
        for b in range(len(prompts)):
            stats[b].decode_steps += not done[b]
    _sync(device)
    decode_seconds = time.perf_counter() - t0
    results = []
    for b, out in enumerate(outs):
        stats[b].decode_seconds = decode_seconds
        stats[b].new_tokens = len(out)
        text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
        results.append(GenerationOutput(text=text, token_ids=out, stats=stats[b], policy=pol))
    return results
