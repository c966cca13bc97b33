"""Generation under a policy: prefill through the adapter, then a decode loop with explicit positions.

Decode positions continue at the original prompt length, not at the number of
entries the compressed cache holds. :func:`prefill` also hands back a transformers ``Cache`` that
``model.generate`` can continue from (see the README).
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvpolicy.cache import KVPolicyCache
from kvpolicy.devices import module_device
from kvpolicy.graphs import graph_decode_step
from kvpolicy.interfaces import Policy
from kvpolicy.registry import get_adapter, get_policy
from kvpolicy.state import Batch, RequestState


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
        kv_bytes_per_layer: bytes each layer kept after prefill: its keys and values, and on a hybrid
            model a recurrent layer's state (constant in the prompt length).
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
    """Result of :func:`prefill`: last-position logits ``(B, V)``, the batch (one request state per
    prompt and their shared cache) and the prefill time."""

    logits: torch.Tensor
    batch: Batch
    seconds: float

    @property
    def state(self) -> RequestState:
        """The first (for one prompt: the only) request's state."""
        return self.batch.states[0]

    @property
    def states(self) -> list[RequestState]:
        return self.batch.states

    @property
    def cache(self) -> KVPolicyCache:
        """The compressed cache, a transformers ``Cache`` usable as ``model.generate(past_key_values=...)``."""
        return self.batch.cache

    @property
    def next_token(self) -> torch.Tensor:
        """Greedy next token per sequence, ``(B, 1)``."""
        return self.logits.argmax(dim=-1, keepdim=True)

    def generate_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """The cache as ``model.generate``'s keyword: ``cache`` from transformers 5.24 (where
        ``past_key_values`` is deprecated), ``past_key_values`` before (which reject ``cache``)."""
        return {cache_keyword(model): self.cache}


def cache_keyword(model: nn.Module) -> str:
    """``"cache"`` where the model's forward takes it (transformers 5.24+), else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _resolve_policy(policy: Policy | str | None, tokenizer: Any = None) -> Policy:
    """The policy to run, bound to ``tokenizer`` when one is given (a policy whose scoring pass is
    text, KVzip's, needs its ids: :meth:`~kvpolicy.interfaces.CachePolicy.with_tokenizer`)."""
    if policy is None:
        policy = get_policy("fullkv")
    elif isinstance(policy, str):
        policy = get_policy(policy)
    elif not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be a Policy (kvpolicy.compose / kvpolicy.get_policy) or a preset name, "
            f"got {type(policy).__name__}"
        )
    return policy if tokenizer is None else policy.with_tokenizer(tokenizer)


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
        raise ValueError(f"expected one prompt, got batch size {ids.shape[0]}; pass a list of prompts")
    if ids.shape[1] == 0:
        raise ValueError("empty prompt: it has 0 tokens")
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}); got range [{int(ids.min())}, {int(ids.max())}]")
    return ids.long().to(module_device(model.get_input_embeddings()))


def prefill(
    model: nn.Module,
    input_ids: Any,
    policy: Policy | str | None = None,
    reserve: int = 0,
    block_size: int | None = None,
) -> Prefill:
    """Run the prompt (or a list of prompts: a left-padded batch) through ``model`` under ``policy``
    and return logits plus the compressed cache.

    ``reserve`` preallocates room for that many decode tokens per layer and KV head (no growth while
    decoding up to it); ``block_size`` is the cache's page size (default: the adapter's).
    """
    pol = _resolve_policy(policy)
    adapter = get_adapter(model)
    prompts = _encode_all(model, adapter, None, None, input_ids, None, reserve)
    return _prefill(adapter, prompts, pol, reserve, block_size)


def _prefill(
    adapter: Any, prompts: list[torch.Tensor], pol: Policy, reserve: int, block_size: int | None = None
) -> Prefill:
    device = prompts[0].device
    _sync(device)
    t0 = time.perf_counter()
    logits, batch = adapter.prefill(prompts, pol, reserve=reserve, block_size=block_size)
    _sync(device)
    return Prefill(logits=logits, batch=batch, seconds=time.perf_counter() - t0)


def _encode_all(
    model: nn.Module,
    adapter: Any,
    tokenizer: Any,
    prompts: Sequence[str] | None,
    input_ids: Any,
    chat: bool | None,
    room: int,
    batch: bool | None = None,
) -> list[torch.Tensor]:
    """Every prompt as ``(L,)`` token ids on the embedding's device, checked; one prompt is a list of
    one. Errors in a batch name the prompt's index."""
    many = _is_batch(None, input_ids)
    batch = (prompts is not None or many) if batch is None else batch
    if prompts is not None:
        items, texts = list(prompts), True
    elif isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        items, texts = list(input_ids), False  # a (B, L) tensor: its rows
    elif many:
        items, texts = list(input_ids), False
    else:
        items, texts = [input_ids], False
    if not items:
        raise ValueError("empty batch: pass at least one prompt")
    encoded = []
    for i, item in enumerate(items):
        try:
            raw = encode_prompt(tokenizer, item, chat) if texts else item
            ids = _as_input_ids(model, raw)[0]
            adapter.check_prompt_length(ids.shape[0] + max(room, 0))
        except (TypeError, ValueError) as exc:
            if not batch:
                raise
            raise type(exc)(f"prompt {i}: {exc}") from None
        encoded.append(ids)
    return encoded


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
    compile: bool = False,
    graphs: bool = False,
    context: str | None = None,
    questions: Sequence[str] | None = None,
    context_ids: Any = None,
    question_ids: Sequence[Any] | None = None,
) -> Any:
    """Generate a continuation of ``prompt`` (or ``input_ids``) under ``policy``.

    Greedy by default; ``do_sample=True`` samples with ``temperature`` and ``top_p`` (``seed`` makes
    it reproducible). Stops at EOS or ``max_new_tokens``. The prompt is wrapped in the tokenizer's
    chat template when it has one, unless ``chat=False``.

    A *list* of prompts (texts, or token-id lists) returns a list of :class:`GenerationOutput`, one
    per prompt in order, generated in left-padded batches of up to ``batch_size`` (default: all at
    once; prompts are grouped by length to waste little on padding). One prompt is a batch of one:
    the same engine runs both, and greedy output in a batch equals running each prompt alone. In a
    batch, ``prefill_seconds`` and ``decode_seconds`` are the batch's.

    ``compile=True`` runs the decode step through ``torch.compile``; tokens equal eager decoding.
    ``graphs=True`` records the whole decode step once and replays it every step (CUDA graphs on
    CUDA, the fast path; a traced stand-in elsewhere, for tests): tokens equal eager decoding for
    every built-in policy (:mod:`kvpolicy.graphs`). Both together record the compiled step.

    *Compress once, answer many*: ``context=`` and ``questions=`` (or ``context_ids=`` and
    ``question_ids=``) prefill and compress the context once, without the questions (the
    query-agnostic setting), then answer each question from that cache, restored between
    questions; returns a list of :class:`GenerationOutput`, one per question
    (:func:`_answer_questions`).
    """
    _check_sampling(max_new_tokens, do_sample, temperature, top_p)
    if any(x is not None for x in (context, questions, context_ids, question_ids)):
        if prompt is not None or input_ids is not None:
            raise ValueError("pass either prompt/input_ids or context and questions, not both")
        if batch_size is not None:
            raise ValueError(f"batch_size={batch_size!r} does not apply to questions: they run one by one")
        return _answer_questions(
            model,
            tokenizer,
            _resolve_policy(policy, tokenizer),
            context,
            questions,
            context_ids,
            question_ids,
            chat,
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            seed,
            compile,
            graphs,
        )
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    many = _is_batch(prompt, input_ids)
    if (prompt is None) == (input_ids is None):
        raise ValueError(f"pass exactly one of prompt ({'texts' if many else 'text'}) or input_ids")
    pol = _resolve_policy(policy, tokenizer)
    adapter = get_adapter(model)
    texts = None if prompt is None else (list(prompt) if many else [prompt])  # type: ignore[arg-type]
    encoded = _encode_all(model, adapter, tokenizer, texts, input_ids, chat, max_new_tokens, batch=many)
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].shape[0])
    size = batch_size or len(order)
    gen = None
    if do_sample and seed is not None:
        gen = torch.Generator(device=encoded[0].device).manual_seed(seed)
    sampler = _Sampler(do_sample, temperature, top_p, gen)
    step_fn = decode_step_fn(adapter, compile, graphs)
    outputs: dict[int, GenerationOutput] = {}
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        pre = _prefill(adapter, [encoded[i] for i in chunk], pol, max_new_tokens)
        tokens, stats = _decode(pre, pol, step_fn, sampler, max_new_tokens, _eos_ids(model, tokenizer))
        del pre  # this chunk's cache goes now, before the next chunk's prefill allocates its own
        for i, out, st in zip(chunk, tokens, stats, strict=True):
            text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
            outputs[i] = GenerationOutput(text=text, token_ids=out, stats=st, policy=pol)
    results = [outputs[i] for i in range(len(encoded))]
    return results if many else results[0]


#: Decode steps between host reads of "has every sequence stopped?" (the decode step never syncs).
STOP_CHECK_EVERY = 8


@dataclass
class _Sampler:
    do_sample: bool
    temperature: float
    top_p: float
    gen: torch.Generator | None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.do_sample:
            return _sample(logits, self.temperature, self.top_p, self.gen)
        return logits.argmax(dim=-1, keepdim=True)


@torch.no_grad()  # a decode step replayed from a recording must not build autograd history on the cache
def _decode(
    pre: Prefill,
    pol: Policy,
    step_fn: Any,
    sampler: _Sampler,
    max_new_tokens: int,
    eos: set[int],
    first_step: int = 0,
) -> tuple[list[list[int]], list[GenerationStats]]:
    """The decode loop, shared by every caller: tokens stay on the device; whether every sequence
    has stopped is read every :data:`STOP_CHECK_EVERY` steps (and after the first token), never
    inside a step. Returns each sequence's tokens (up to and including its EOS) and stats.
    ``first_step``: decode steps already run on ``pre``'s batch (a question fed after its context)."""
    batch = pre.batch
    cache = batch.cache
    stats = [
        GenerationStats(
            prompt_tokens=state.prompt_len,
            prefill_seconds=pre.seconds,
            tokens_per_layer=list(state.tokens_per_layer),
            discarded_tokens_per_layer=list(state.discarded_tokens_per_layer),
            kv_tokens_per_layer=cache.kv_lengths_of(b),
            kv_bytes_per_layer=cache.kv_bytes_of(b),
        )
        for b, state in enumerate(batch.states)
    ]
    device = pre.logits.device
    tokens = torch.zeros((batch.size, max(max_new_tokens, 1)), dtype=torch.long, device=device)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    done = torch.zeros(batch.size, dtype=torch.bool, device=device)
    logits, steps, generated = pre.logits, 0, 0
    _sync(device)
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        token = sampler(logits)
        tokens[:, step] = token[:, 0]
        generated = step + 1
        if eos_ids.numel():
            done |= torch.isin(token[:, 0], eos_ids)
        if step == max_new_tokens - 1:
            break
        if (step == 0 or (step + 1) % STOP_CHECK_EVERY == 0) and eos_ids.numel() and bool(done.all()):
            break
        logits = step_fn(token, pol, batch, first_step + step)
        steps += 1
    _sync(device)
    decode_seconds = time.perf_counter() - t0
    batch.raise_deferred(pol.cache)
    outs = []
    for b, row in enumerate(tokens[:, :generated].tolist()):
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        outs.append(row[:cut])
        stats[b].new_tokens = cut
        stats[b].decode_steps = min(steps, max(cut - 1, 0))
        stats[b].decode_seconds = decode_seconds
    return outs, stats


#: What ends a text context before its questions (a question's text follows it directly).
QUESTION_SEPARATOR = "\n\n"
_QUESTION_MARK = "\u241fkvpolicy-question\u241f"


def encode_context_questions(
    tokenizer: Any, context: str, questions: Sequence[str], chat: bool | None = None
) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``context`` and of each question, split as kvpress's query-agnostic protocol does.

    With a chat template (``chat`` as in :func:`encode_prompt`), the one user turn is
    ``context + QUESTION_SEPARATOR + question``: the context's ids are the template's prefix (BOS,
    user header) through the separator, a question's ids are the question, the end of the turn and
    the assistant header. Without one: ``context + QUESTION_SEPARATOR`` (with the tokenizer's special
    tokens), then each question (without). Each part is tokenized alone, so ids at the boundary can
    differ from tokenizing the whole prompt at once."""
    if not isinstance(context, str):
        raise TypeError(f"context must be a str, got {type(context).__name__}")
    if not context:
        raise ValueError("context is empty: it has 0 characters")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    head, tail = context + QUESTION_SEPARATOR, ""
    if use_chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": head + _QUESTION_MARK}], add_generation_prompt=True, tokenize=False
        )
        head, found, tail = rendered.partition(_QUESTION_MARK)
        if not found:
            raise ValueError(
                "the chat template changes the message text, so the context cannot be split from the "
                "question; pass chat=False or context_ids= and question_ids="
            )
    context_ids = list(tokenizer(head, add_special_tokens=not use_chat)["input_ids"])
    out = []
    for i, question in enumerate(questions):
        if not isinstance(question, str):
            raise TypeError(f"question {i} must be a str, got {type(question).__name__}")
        if not question:
            raise ValueError(f"question {i} is empty: it has 0 characters")
        out.append(list(tokenizer(question + tail, add_special_tokens=False)["input_ids"]))
    return context_ids, out


def _answer_questions(
    model: nn.Module,
    tokenizer: Any,
    pol: Policy,
    context: str | None,
    questions: Sequence[str] | None,
    context_ids: Any,
    question_ids: Sequence[Any] | None,
    chat: bool | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int | None,
    compile: bool,
    graphs: bool = False,
) -> list[GenerationOutput]:
    """Compress once, answer many (``generate(context=..., questions=...)``).

    The context alone is prefilled under ``pol`` (its cache policy scores with the context's own
    last tokens: SnapKV's window is the context's end, not the question, which is the point of the
    query-agnostic setting). For each question, a copy of that batch (cache pages and lengths,
    positions, policies' per-request scratch) is taken, the question's tokens are fed through the
    engine's decode step one at a time (positions continue after the context's logical length;
    decode-time eviction applies to them as to any decoded token), then the answer is decoded by
    the same loop as :func:`generate`. Answers never see each other."""
    if context is None and context_ids is None:
        raise ValueError("questions need a context: pass context= (text) or context_ids= (token ids)")
    if context is not None and context_ids is not None:
        raise ValueError("pass one of context (text) or context_ids, not both")
    if questions is None and question_ids is None:
        raise ValueError("a context needs questions: pass questions= (texts) or question_ids= (token ids)")
    if questions is not None and question_ids is not None:
        raise ValueError("pass one of questions (texts) or question_ids, not both")
    if (context is None) != (questions is None):
        raise ValueError("pass context and questions as text, or context_ids and question_ids, not a mix")
    items = questions if questions is not None else question_ids
    name = "questions" if questions is not None else "question_ids"
    if isinstance(items, (str, torch.Tensor)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{name} is empty ({items!r}): pass at least one question")
    if questions is not None:
        if tokenizer is None:
            raise ValueError("text context and questions need a tokenizer; pass context_ids and question_ids")
        context_ids, question_ids = encode_context_questions(tokenizer, context, questions, chat)  # type: ignore[arg-type]
    adapter = get_adapter(model)
    try:
        ctx = _as_input_ids(model, context_ids)[0]
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"context: {exc}") from None
    asked = []
    for i, q in enumerate(question_ids):  # type: ignore[union-attr]
        try:
            asked.append(_as_input_ids(model, q)[0])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"question {i}: {exc}") from None
    longest = max(q.shape[0] for q in asked)
    adapter.check_prompt_length(ctx.shape[0] + longest + max_new_tokens)
    gen = None
    if do_sample and seed is not None:
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
    sampler = _Sampler(do_sample, temperature, top_p, gen)
    step_fn = decode_step_fn(adapter, compile, graphs)
    eos = _eos_ids(model, tokenizer)
    pre = _prefill(adapter, [ctx], pol, longest + max_new_tokens)  # the one prefill, kept untouched
    batch = copy.deepcopy(pre.batch)  # the working copy each question decodes in
    outputs = []
    for i, q in enumerate(asked):
        if i:
            _restore(batch, pre.batch)  # the compressed context as prefill left it
        _sync(ctx.device)
        t0 = time.perf_counter()
        logits = pre.logits
        with torch.no_grad():
            for j in range(q.shape[0]):
                logits = step_fn(q[j : j + 1].view(1, 1), pol, batch, j)
        _sync(ctx.device)
        fed = Prefill(logits=logits, batch=batch, seconds=pre.seconds + time.perf_counter() - t0)
        tokens, stats = _decode(fed, pol, step_fn, sampler, max_new_tokens, eos, first_step=q.shape[0])
        stats[0].prompt_tokens = ctx.shape[0] + q.shape[0]
        text = tokenizer.decode(tokens[0], skip_special_tokens=True) if tokenizer is not None else ""
        outputs.append(GenerationOutput(text=text, token_ids=tokens[0], stats=stats[0], policy=pol))
    return outputs


def _restore(work: Batch, saved: Batch) -> None:
    """Put ``work`` (a deep copy of ``saved``, since decoded in) back to ``saved``'s contents, in place.

    Tensors, the cache's and the policies' scratch alike, are copied into the ones ``work`` already
    holds wherever shape and dtype still match (always, unless the cache grew past its reserve), so
    their addresses stay put and recorded decode graphs replay across questions; what a decode step
    added to scratch is dropped and what it consumed comes back as a copy (the graph path then sees the
    moved state and records anew)."""
    for lw, ls in zip(work.cache.layers, saved.cache.layers, strict=True):
        for name, value in vars(ls).items():
            if isinstance(value, torch.Tensor):
                setattr(lw, name, _restored(getattr(lw, name, None), value))
            else:
                setattr(lw, name, copy.copy(value))
    work.next_positions.copy_(saved.next_positions)
    work.step_counter.copy_(saved.step_counter)
    assert work.flags is not None
    work.flags.zero_()
    _restore_dict(work._scratch, saved._scratch)
    for sw, ss in zip(work.states, saved.states, strict=True):
        _restore_dict(sw._scratch, ss._scratch)


def _restored(mine: Any, saved: Any) -> Any:
    """``saved``'s contents in ``mine`` where they fit (tensors in place, dicts key by key), else a copy."""
    if isinstance(saved, torch.Tensor):
        if isinstance(mine, torch.Tensor) and mine.shape == saved.shape and mine.dtype == saved.dtype:
            return mine.copy_(saved)
        return saved.clone()
    if isinstance(saved, dict) and isinstance(mine, dict):
        _restore_dict(mine, saved)
        return mine
    return copy.deepcopy(saved)


def _restore_dict(mine: dict[Any, Any], saved: dict[Any, Any]) -> None:
    for key in [k for k in mine if k not in saved]:
        del mine[key]
    for key, value in saved.items():
        mine[key] = _restored(mine.get(key), value)


#: ``torch.compile`` backend for ``compile=True`` (``None``: inductor). Tests set ``"eager"`` to check
#: graph capture (no breaks, no recompiles) without inductor's code generation time.
COMPILE_BACKEND: str | None = None


def compiled_forward(adapter: Any, graphs: bool = False) -> Any:
    """``adapter.decode_forward`` under ``torch.compile(fullgraph=True)``, made once per adapter.

    On CUDA without ``graphs`` it uses ``mode="reduce-overhead"`` (inductor's own CUDA graphs, which
    skip a step whose inputs are mutated: kvpolicy's always are); with ``graphs`` the default mode,
    since :mod:`kvpolicy.graphs` records the fused step itself. With ``graphs`` off CUDA, inductor is
    replaced by ``aot_eager`` (the same captured graph, run as aten ops): the CPU stand-in of a CUDA
    graph traces the ops a step runs, and inductor's generated kernels are invisible to it."""
    attr = "_compiled_forward_graphs" if graphs else "_compiled_forward"
    compiled = getattr(adapter, attr, None)
    if compiled is None:
        cuda = next(adapter.model.parameters()).device.type == "cuda"
        backend = COMPILE_BACKEND
        if graphs and not cuda and backend in (None, "inductor"):
            backend = "aot_eager"
        options: dict[str, Any] = {"backend": backend} if backend else {}
        if cuda and not backend and not graphs:
            options["mode"] = "reduce-overhead"
        # Policies and batches are guarded by identity: allow a few dozen before dynamo gives up.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(adapter.decode_forward, fullgraph=True, **options)
        setattr(adapter, attr, compiled)
    return compiled


def compiled_decode_step(adapter: Any) -> Any:
    """The adapter's decode step with its device work under ``torch.compile(fullgraph=True)``.

    Host bookkeeping (cache room, step counter) stays outside the graph; the forward has static shapes
    between cache growths, so it compiles once per shape. One compiled function per adapter."""
    compiled = compiled_forward(adapter)

    def step(token_ids: torch.Tensor, policy: Policy, batch: Batch, step: int) -> torch.Tensor:
        adapter.prepare_step(batch, step)
        with adapter.routing():
            return compiled(token_ids, policy, batch, step)

    return step


def decode_step_fn(adapter: Any, compile: bool = False, graphs: bool = False) -> Any:
    """The decode step every decode loop calls: eager, ``torch.compile``-d, or replayed from
    recorded graphs (:mod:`kvpolicy.graphs`; with ``compile`` too, the compiled step is recorded)."""
    if graphs:
        return graph_decode_step(adapter, compiled_forward(adapter, graphs=True) if compile else None)
    return compiled_decode_step(adapter) if compile else adapter.decode_step


def _check_sampling(max_new_tokens: Any, do_sample: bool, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
