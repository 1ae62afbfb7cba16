"""One routing path for both methods: a :class:`RoutingSession` per forward of the adapted model.

The tuner opens the session, the layers read from it and record into it, the tuner reads it::

    pre-hook (model)   opens a session: the forward's masks, and the routing to reuse, if any
    MoR layer          records its per-token router probabilities              (MoR paper Eq. 11)
    MiLoRA router      routes the prompt (or reuses its routing), records it   (MiLoRA paper Eq. 2-3)
    MiLoRA expert      reads the routing of its block from the session
    post-hook (model)  builds ``aux_loss`` and ``router_logits`` from the records, adds the balance loss
                       to ``loss``, hands the records to subscribers (:mod:`loramix.analysis`), closes

The hooks sit on the adapted ``transformers`` model itself, so every entry point (``PeftModel`` with or
without ``task_type``, ``generate``, transformers' ``model.load_adapter``) goes through them. The
session lives in a :class:`contextvars.ContextVar`: it belongs to the call, so threads serving one model
each see their own. Activation checkpointing re-runs blocks during ``backward``, after the call
returned: the outputs' autograd nodes make the (closed) session current again when the backward pass
starts, so the re-run layers find the same masks (see :func:`_resumable`).

MiLoRA routes once per prompt. Its routing is reused (the routers do not run) when

* the forward is a later step of the same ``generate`` call (:func:`generation_routing`, opened by the
  tuner's ``generate``): with or without KV cache, greedy, sampling or beams;
* the forward continues a KV cache (a ``transformers.Cache`` passed under any argument name) that an
  earlier routed forward returned: the routing is looked up by the cache object.

A forward that continues a non-empty cache whose routing is unknown raises; it never re-routes.

In a mixed-adapter batch (``adapter_names=[...]``, :mod:`loramix.routing.mixed_batch`) the session also holds
the adapter of each row (:attr:`RoutingSession.rows`), and :func:`adapter_rows` tells each layer which
adapters to apply to which rows. A cache keeps the row adapters it was computed with; continuing it
with others raises.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Cache

from loramix._compat.torch import has_forward_hook, queue_backward_callback, remove_forward_hooks
from loramix._compat.transformers import with_output_fields
from loramix.routing.balance import balance_losses
from loramix.routing.mixed_batch import AdapterRows, requested, rows_for_batch

__all__ = [
    "RouterRecord",
    "RoutingSession",
    "adapter_rows",
    "capture_routing",
    "current_session",
    "has_routing",
    "subscribe",
]

_SESSION: contextvars.ContextVar[RoutingSession | None] = contextvars.ContextVar("loramix_session", default=None)
_GENERATION: contextvars.ContextVar[GenerationCall | None] = contextvars.ContextVar("loramix_generation", default=None)
# KV cache object -> the routing of the prompt it holds, {(router, adapter): state}; gone with the cache.
_CACHE_ROUTING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# KV cache object -> the adapter of each row it was computed with (None: the active adapters on every row)
_CACHE_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# adapted model -> callbacks that receive (records, outputs) at the end of each of its forwards
_SUBSCRIBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNSET = object()
_CACHE_NAMES = ("past_key_values", "cache")  # only to refuse legacy tuple caches; Cache objects are found by type


@dataclass
class GenerationCall:
    """What the forwards of one call (a ``generate``) share; set by the first forward, read by the later ones.

    ``routing``: the routing decided by the first forward, ``{(router, adapter): state}``, reused by every later
    forward (``None`` until a forward routed). ``rows``: the adapter of each row of a mixed-adapter batch, built
    once. ``scratch``: what layers derive from the routing for the whole call (e.g. MiLoRA's grouped expert
    weights of a mixed-adapter batch).
    """

    routing: dict[tuple[nn.Module, str], Any] | None = None
    rows: AdapterRows | None = None
    scratch: dict[Any, Any] = field(default_factory=dict)
    prompt: Prompt | None = None


@dataclass(frozen=True)
class Prompt:
    """The inputs a call (``forward`` or ``generate``) was given: ``batch`` rows of ``length`` tokens and, if given
    as one, the 2-D ``attention_mask`` (batch, length).

    ``generate`` may hand the model more than the prompt in its first forward (assisted and prompt-lookup
    decoding append draft tokens) and a 4-D attention mask instead of the 2-D one (static and other
    preallocated caches); the routed forward pools over the prompt's attended tokens all the same.
    """

    batch: int
    length: int
    attention_mask: torch.Tensor | None = None
    masked: bool = False  # the call gave an attention mask (possibly not a 2-D one)

    @classmethod
    def of_call(cls, args: tuple, kwargs: dict[str, Any]) -> Prompt | None:
        """The prompt of a ``forward`` / ``generate`` call from its arguments (``None`` if they do not tell)."""
        for value in (*args[:1], *(kwargs.get(k) for k in ("input_ids", "inputs_embeds", "inputs"))):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                mask = kwargs.get("attention_mask")
                two_d = isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(value.shape[:2])
                return cls(value.shape[0], value.shape[1], mask if two_d else None, mask is not None)
        return None


@dataclass
class RouterRecord:
    """What one router computed in one forward, for one adapter.

    ``probs`` (..., N) float32: ``(B, T, N)`` per token (MoR) or ``(B, N)`` per prompt (MiLoRA);
    ``mask`` marks the rows that count (MoR: attended tokens); ``logits``, ``selected`` (top-k) and
    ``gates`` (the weights the selected experts' updates were multiplied by, ``MiLoRAConfig.gate_form``)
    are set by MiLoRA; ``layer`` is the module that routed. In a mixed-adapter batch ``rows`` are the
    batch rows of ``adapter`` that the record covers (its first dimension); ``None`` means all rows.
    """

    layer: nn.Module
    adapter: str
    probs: torch.Tensor
    mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    gates: torch.Tensor | None = None


def build_pool_mask(attention_mask, labels, prompt_mask, length: int | None):
    """The tokens each row's MiLoRA routers pool over, ``(B, T)`` bool, or ``None`` for all tokens.

    ``prompt_mask`` if given, else the tokens labelled -100 if ``labels`` are given, else all tokens;
    always restricted to attended tokens. ``attention_mask`` may be longer than the current tokens (a
    cache in front); its last ``length`` columns are used. A row that a rule leaves empty falls back to
    its attended tokens, then to all.
    """
    attended = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attended = attention_mask.bool()
        if length is not None:
            attended = attended[:, -length:]
    chosen = None
    if isinstance(prompt_mask, torch.Tensor):
        chosen = prompt_mask.bool()
    elif isinstance(labels, torch.Tensor) and labels.dim() == 2 and (length is None or labels.shape[1] == length):
        chosen = labels.eq(-100)
    if chosen is None:
        pool = attended
    elif attended is None:
        pool = chosen
    else:
        if chosen.shape != attended.shape:
            raise ValueError(
                f"MiLoRA: prompt_mask/labels of shape {tuple(chosen.shape)} do not match the attention mask "
                f"{tuple(attended.shape)}."
            )
        pool = chosen.to(attended.device) & attended
        pool = torch.where(pool.any(dim=-1, keepdim=True), pool, attended)
    return None if pool is None else pool | ~pool.any(dim=-1, keepdim=True)


class RoutingSession:
    """The routing state of one forward of an adapted model (see the module docstring).

    Attributes read by the layers: :meth:`pool_mask` and :attr:`token_mask` (which tokens count),
    :attr:`reuse` (routing to reuse, ``{(router, adapter): state}``, or ``None``) and
    :attr:`continues_cache` (the input continues a KV cache), :attr:`rows` (mixed-adapter batches). Written by
    the layers: :attr:`scratch` (derived data kept for the later forwards of the call), :meth:`record`,
    :attr:`decisions` (this forward's routing per router and adapter, kept for later forwards) and
    :attr:`routing` (the routing each router computed or took in this pass, read by the layers it routes —
    also when activation checkpointing re-runs a block). :attr:`pending` holds balance-loss terms whose
    gradient is delivered when reentrant activation checkpointing re-runs a layer (:mod:`loramix.routing.balance`).

    :meth:`enter` makes the session current (the model's pre-hook), :meth:`exit` closes it (the post-hook).
    """

    def __init__(
        self,
        inputs: dict[str, Any],
        reuse: dict | None,
        continues_cache: bool,
        rows: AdapterRows | None = None,
        scratch: dict | None = None,
        prompt: Prompt | None = None,
    ) -> None:
        tokens = inputs.get("input_ids")
        if not isinstance(tokens, torch.Tensor):
            tokens = inputs.get("inputs_embeds")
        self.shape = tuple(tokens.shape[:2]) if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None
        prompt_mask = inputs.get("prompt_mask")
        if prompt_mask is not None and (
            not isinstance(prompt_mask, torch.Tensor) or self.shape is None or tuple(prompt_mask.shape) != self.shape
        ):
            got = tuple(prompt_mask.shape) if isinstance(prompt_mask, torch.Tensor) else type(prompt_mask).__name__
            raise ValueError(f"prompt_mask must be a (batch, seq) tensor of the input's shape {self.shape}, got {got}.")
        self._inputs = (inputs.get("attention_mask"), inputs.get("labels"), prompt_mask)
        self._prompt = prompt
        attention = self._inputs[0]
        self.token_mask = attention[:, -self.shape[1] :] if self._fits(attention) else None
        self.reuse = reuse
        self.continues_cache = continues_cache
        self.rows = rows  # the adapter of each row in a mixed-adapter batch, else None
        # what layers derive from the routing for the forwards of one call (a generate), e.g. MiLoRA's
        # grouped weights for a mixed-adapter batch; dropped with the call
        self.scratch: dict[Any, Any] = {} if scratch is None else scratch
        self.decisions: dict[tuple[nn.Module, str], Any] = {}
        self.routing: dict[tuple[nn.Module, str], Any] = {}
        self.records: list[RouterRecord] = []
        self.pending: dict[tuple[nn.Module, str], Any] = {}
        self.closed = False
        self._pool: Any = _UNSET
        self._token: contextvars.Token | None = None  # set while the session is current (enter .. exit)

    def enter(self) -> None:
        """Make this session the current one of this thread (the forward starts)."""
        self._token = _SESSION.set(self)

    def exit(self) -> bool:
        """End the forward: the session is no longer current, and is closed (re-runs record nothing). Returns
        False if it was not current (nothing done)."""
        if self._token is None:
            return False
        _SESSION.reset(self._token)
        self._token = None
        self.closed = True
        return True

    def _fits(self, mask: Any) -> bool:
        return isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == (self.shape or (None,))[0]

    def pool_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The MiLoRA pool mask for block inputs ``hidden`` (B, T, d); raises if it cannot fit them."""
        if self._pool is _UNSET:
            self._pool = self._build_pool()
        if self._pool is None:
            return None
        if tuple(self._pool.shape) != tuple(hidden.shape[:2]):
            raise RuntimeError(
                f"MiLoRA: the routers got hidden states of shape {tuple(hidden.shape[:2])}, but the model's input "
                f"is {tuple(self._pool.shape)}: the prompt tokens cannot be matched to them."
            )
        return self._pool.to(hidden.device)

    def _build_pool(self) -> torch.Tensor | None:
        """:func:`build_pool_mask` of this forward, with the call's prompt where the forward's own inputs do not
        tell it: draft tokens after the prompt never enter the pool, and a 4-D mask is replaced by the call's 2-D
        one; raises where the padding cannot be told."""
        attention, labels, prompt_mask = self._inputs
        length = self.shape[1] if self.shape else None
        prompt = self._prompt
        if attention is not None and not self._fits(attention):
            attention = self._call_attention(attention, prompt_mask is not None)
        if prompt_mask is None and prompt is not None and length is not None and length > prompt.length:
            # assisted / prompt-lookup decoding: the first forward carries the prompt, then draft tokens
            prompt_mask = torch.arange(length) < prompt.length
            prompt_mask = prompt_mask.expand(self.shape[0], -1)
        return build_pool_mask(attention, labels, prompt_mask, length)

    def _call_attention(self, attention: Any, has_prompt_mask: bool) -> torch.Tensor | None:
        """The call's 2-D attention mask for this forward's tokens, standing in for ``attention`` (a 4-D mask or
        another form whose padding cannot be told); repeated for beams, extended (attended) for draft tokens."""
        call = None if self._prompt is None else self._prompt.attention_mask
        if self._prompt is not None and not self._prompt.masked:
            return None  # the call gave no mask: every token is attended (the 4-D mask is generate's own causal one)
        if call is not None and self.shape is not None and self.shape[0] % call.shape[0] == 0:
            call = call.repeat_interleave(self.shape[0] // call.shape[0], dim=0)
            extra = self.shape[1] - call.shape[1]
            return torch.cat([call, call.new_ones(call.shape[0], extra)], dim=1) if extra > 0 else call
        if has_prompt_mask:
            return None  # the caller's prompt_mask says which tokens route
        form = f"a {attention.dim()}-D tensor" if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise ValueError(
            f"MiLoRA: the attention mask of this forward is {form}, from which the padding tokens that must stay out of "
            "the routing cannot be told. Pass the 2-D `attention_mask` (batch, seq) instead, or `prompt_mask` "
            "(batch, seq) marking the tokens to route on."
        )

    def token_layout(self, x: torch.Tensor) -> tuple[int, int] | None:
        """``(batch, tokens)`` when ``x`` holds this forward's tokens flattened into one dimension (OPT's ``fc1`` /
        ``fc2`` see ``(batch·tokens, hidden)``), so a layer can view it as ``(batch, tokens, hidden)`` and every
        row keeps its adapter and routing; ``None`` for any other input."""
        if self.shape is None or x.dim() != 2 or x.shape[0] != self.shape[0] * self.shape[1]:
            return None
        return self.shape

    def record(self, record: RouterRecord) -> None:
        """Keep ``record`` for the post-hook; a re-run during backward (checkpointing) records nothing."""
        if not self.closed:
            self.records.append(record)


def adapter_rows(
    session: RoutingSession | None, active: Iterable[str], held: Container[str], x: torch.Tensor
) -> list[tuple[str, torch.Tensor | None]]:
    """The adapters a layer holding ``held`` applies to its input ``x`` (batch first), with their rows.

    Normally the active adapters, each on every row (rows ``None``). In a mixed-adapter batch, each adapter
    of the batch on its own rows (a long tensor on ``x``'s device, ``None`` if it has them all); raises if
    ``x`` is not that batch.
    """
    if session is None and requested() is not None:
        raise RuntimeError(
            "loramix: a layer ran outside a forward of the adapted model during a call with `adapter_names` (e.g. "
            "the encoder of an encoder-decoder model, which `generate` calls by itself), so its rows cannot be "
            "matched to their adapters. Mixed-adapter batches need every adapted layer to run inside the model's "
            "forward (decoder-only models); otherwise run one adapter per batch with `set_adapter`."
        )
    if session is None or session.rows is None:
        return [(name, None) for name in active if name in held]
    session.rows.check_batch(x.shape[0], "a loramix layer")
    return [(name, rows) for name, rows in session.rows.groups(x.device).items() if name in held]


def current_session() -> RoutingSession | None:
    """The session of the forward being computed in this thread (``None`` outside an adapted model)."""
    return _SESSION.get()


@contextmanager
def generation_routing(prompt: Prompt | None = None) -> Iterator[None]:
    """Within this context every forward reuses the routing of the first one (one ``generate`` call), which routes
    on ``prompt``'s tokens (:class:`Prompt`)."""
    token = _GENERATION.set(GenerationCall(prompt=prompt))
    try:
        yield
    finally:
        _GENERATION.reset(token)


def _find_cache(values) -> Any:
    for value in values:
        if isinstance(value, Cache):
            return value
    return None


def _cache_length(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def session_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    prompt_mask = kwargs.pop("prompt_mask", None)
    inputs = dict(zip(_arg_names(module), args, strict=False))
    inputs.update(kwargs)
    inputs["prompt_mask"] = prompt_mask
    generation = _GENERATION.get()
    cache = _find_cache(inputs.values())
    legacy = [n for n in _CACHE_NAMES if isinstance(inputs.get(n), tuple) and len(inputs[n]) > 0]
    if legacy:
        raise TypeError(
            f"loramix: `{legacy[0]}` is a legacy tuple KV cache, whose routing cannot be matched; pass the "
            "transformers Cache object the model returned."
        )
    rows = _rows_of(inputs, generation)
    if generation is not None and generation.routing is not None:
        reuse, continues = generation.routing, True
    elif _cache_length(cache) > 0:
        reuse, continues = _CACHE_ROUTING.get(cache), True
        _check_cache_rows(cache, rows)
    else:
        reuse, continues = None, False
    scratch, prompt = (None, None) if generation is None else (generation.scratch, generation.prompt)
    RoutingSession(inputs, reuse, continues, rows, scratch, prompt).enter()
    return args, kwargs


def _rows_of(inputs: dict[str, Any], generation: GenerationCall | None) -> AdapterRows | None:
    """The row adapters of this forward: those of the call's first forward (one ``generate``), else built now."""
    request = requested()
    if request is None:
        return None
    tokens = inputs.get("input_ids")
    tokens = tokens if isinstance(tokens, torch.Tensor) else inputs.get("inputs_embeds")
    tokens = tokens if isinstance(tokens, torch.Tensor) else None
    rows = None if generation is None else generation.rows
    if rows is None:
        rows = rows_for_batch(request, tokens, inputs.get("attention_mask"))
        if generation is not None:
            generation.rows = rows
    if tokens is not None:
        rows.check_batch(tokens.shape[0], "this forward")
    return rows


def _check_cache_rows(cache: Any, rows: AdapterRows | None) -> None:
    """Continuing a cache with other row adapters than it was computed with would mix them up: raise."""
    known = _CACHE_ROWS.get(cache, _UNSET)
    current = None if rows is None else rows.names
    if known is _UNSET and current is not None:
        raise RuntimeError(
            "loramix: this forward continues a KV cache that no forward of this model filled (in this process), e.g. "
            "a copy of one, so the adapters its rows were computed with are unknown; with `adapter_names`, pass the "
            "cache object the model returned."
        )
    if known is not _UNSET and known != current:
        raise RuntimeError(
            "loramix: this forward continues a KV cache computed with "
            + ("the active adapter(s) on every row" if known is None else f"adapter_names={list(known)}")
            + ", but is called with "
            + ("the active adapter(s) on every row" if current is None else f"adapter_names={list(current)}")
            + ". Pass the same `adapter_names` as the forward that filled the cache."
        )


def session_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
    session = _SESSION.get()
    if session is None or not session.exit():
        return None
    if output is None:  # the forward raised (the hook runs anyway, to close the session)
        return None
    generation = _GENERATION.get()
    if not session.continues_cache:  # a routed forward: later ones continuing its cache reuse what it decided
        cache = _find_cache(output.values() if isinstance(output, dict) else output)
        if cache is not None:
            _CACHE_ROUTING[cache] = session.decisions
            _CACHE_ROWS[cache] = None if session.rows is None else session.rows.names
        if generation is not None and generation.routing is None and (session.decisions or session.rows):
            generation.routing = session.decisions
    if not session.records:
        return None
    output = _finish_outputs(module, session, output, kwargs.get("labels"))
    for callback in list(_SUBSCRIBERS.get(module, {}).values()):
        callback(session.records, output)
    return output


def _finish_outputs(module: nn.Module, session: RoutingSession, output: Any, labels: Any):
    """``aux_loss`` (mean over the adapters with ``router_aux_loss_coef > 0``), ``router_logits`` (MiLoRA),
    ``loss + Σ coef · aux`` whenever labels are given (transformers' MoE models do the same, in training and
    evaluation), with the loss before that term kept as ``lm_loss``; a tuple output (``return_dict=False``)
    gets the same ``loss`` and no other field."""
    configs = getattr(module, "peft_config", {}) or {}
    coefs = {a: configs[a].router_aux_loss_coef for a in {r.adapter for r in session.records} if a in configs}
    losses = balance_losses(session, {a: c for a, c in coefs.items() if c > 0})
    values: dict[str, Any] = {}
    if losses:
        values["aux_loss"] = torch.stack(list(losses.values())).mean()
    router_logits = tuple(r.logits for r in session.records if r.logits is not None)
    if router_logits:
        values["router_logits"] = router_logits
    extra = sum(coefs[a] * loss for a, loss in losses.items()) if losses and labels is not None else None
    if isinstance(output, tuple):  # return_dict=False: transformers puts the loss first when labels are given
        if extra is not None and len(output) and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            output = (output[0] + extra, *output[1:])
        return _resumable(session, output)
    if extra is not None and output.get("loss") is not None:
        values["lm_loss"] = output["loss"]  # the loss without the balance term
    output = with_output_fields(output, **values)  # real fields: DDP and torch.compile rebuild outputs
    if extra is not None and output.get("loss") is not None:
        output["loss"] = output["loss"] + extra
    return _resumable(session, output)


def _resumable(session: RoutingSession, output: Any) -> Any:
    """Make ``session`` current again when the backward pass reaches the outputs (before any checkpointed
    block is re-run), until the pass ends: a pre-hook on the autograd nodes that produced them."""
    if not torch.is_grad_enabled():
        return output
    # Top-level tensors only (loss, logits, log_probs of TRL's fused head, ...): the router logits are held by
    # the session itself, and a hook on their nodes would make a cycle that Python's GC cannot see.
    for value in output if isinstance(output, tuple) else output.values():
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            value.grad_fn.register_prehook(functools.partial(_resume, session))
    return output


def _resume(session: RoutingSession, grad_outputs: Any) -> None:
    if _SESSION.get() is not session:
        token = _SESSION.set(session)
        queue_backward_callback(functools.partial(_restore, token))


def _restore(token: contextvars.Token) -> None:
    try:
        _SESSION.reset(token)
    except ValueError:  # the pass ended in another context (a device thread): its value does not leak here
        pass


def _arg_names(module: nn.Module) -> tuple[str, ...]:
    return _positional_names(type(module))


@functools.cache
def _positional_names(cls: type) -> tuple[str, ...]:
    try:
        parameters = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return ("input_ids", "attention_mask")
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[1:]  # no self


def install_session_hooks(model: nn.Module) -> None:
    """Put the session hooks on the adapted model (idempotent)."""
    if not has_forward_hook(model, session_pre_hook):
        model.register_forward_pre_hook(session_pre_hook, with_kwargs=True)
    if not has_forward_hook(model, session_post_hook):
        model.register_forward_hook(session_post_hook, with_kwargs=True, always_call=True)


def remove_session_hooks(model: nn.Module) -> None:
    """Undo :func:`install_session_hooks` (``unload``)."""
    remove_forward_hooks(model, (session_pre_hook, session_post_hook))


def _hooked(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if has_forward_hook(module, session_post_hook):
            return module
    raise ValueError(f"{type(model).__name__} holds no loramix adapter (no MoR or MiLoRA layers were injected).")


def has_routing(model: nn.Module) -> bool:
    """Whether ``model`` holds a loramix adapter, i.e. its forward takes ``prompt_mask`` and routes."""
    return any(has_forward_hook(module, session_post_hook) for module in model.modules())


class _Handle:
    def __init__(self, owner: dict, key: int) -> None:
        self.owner, self.key = owner, key

    def remove(self) -> None:
        self.owner.pop(self.key, None)


def subscribe(model: nn.Module, callback: Callable[[list[RouterRecord], Any], None]) -> _Handle:
    """Call ``callback(records, outputs)`` at the end of every forward of ``model`` (any thread) that ran
    routers (decoding steps that reuse a routing bring no records). Returns a handle with ``remove()``."""
    callbacks = _SUBSCRIBERS.setdefault(_hooked(model), {})
    key = max(callbacks, default=-1) + 1
    callbacks[key] = callback
    return _Handle(callbacks, key)


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[list[RouterRecord]]:
    """``with capture_routing(model) as records: model(...)``: the records of every forward in the block."""
    records: list[RouterRecord] = []
    handle = subscribe(model, lambda new, _: records.extend(new))
    try:
        yield records
    finally:
        handle.remove()
