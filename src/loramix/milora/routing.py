"""When MiLoRA routes, and on which tokens: a small per-model state plus two hooks on the model.

The routers sit inside the blocks and only see hidden states; which tokens form the prompt (padding,
``labels`` = -100, ``prompt_mask``) and whether a forward is a decoding step are only visible at the
model's top-level call. So :func:`install_routing_hooks` puts a forward pre-hook and a forward hook on
the adapted model itself. They run on every call of the model — through ``PeftModel``, through
``generate``, and through transformers' ``model.load_adapter`` (which keeps no tuner object) alike:

* pre-hook: pops ``prompt_mask``; if ``past_key_values`` is a non-empty cache that this model's last
  routed forward produced, the forward is a decoding step and the routers **reuse** their routing;
  otherwise it starts a new routing *epoch* and builds the pool mask ``(B, T)``:
  ``prompt_mask`` if given, else the attended positions whose label is -100 if ``labels`` are given,
  else all attended positions (a row left empty by a rule falls back to its attended positions).
* forward hook: tags the returned cache with the epoch (so the next step can reuse the routing),
  reports ``aux_loss`` / ``router_logits``, and adds ``router_aux_loss_coef · aux_loss`` to ``loss``
  when labels are given in training mode.

The state stays on the model until the next call replaces it, so activation checkpointing, which
re-runs blocks during ``backward`` after the call returned, routes the recomputed blocks on the same
tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .._outputs import with_output_fields
from ..balance import switch_balance_loss

CONTEXT_ATTR = "_milora_routing"
CACHE_TAG = "_milora_routing_epoch"


class RoutingState:
    """One router's decision for one adapter and one batch of prompts.

    ``logits``/``probs``/``gates`` are ``(B, N)`` float32, ``selected`` ``(B, N)`` bool. :meth:`plan`
    tells expert ``i`` which rows it runs on; it costs one device-to-host copy per state (per block
    per prompt), never one per decoding step.
    """

    __slots__ = ("logits", "probs", "gates", "selected", "epoch", "_plans", "_selected_host", "_factors")

    def __init__(self, logits, probs, gates, selected, epoch: int = 0) -> None:
        self.logits, self.probs, self.gates, self.selected, self.epoch = logits, probs, gates, selected, epoch
        self._plans: dict[int, tuple[torch.Tensor | None, torch.Tensor] | None] = {}
        self._selected_host: torch.Tensor | None = None
        self._factors: dict[tuple, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.gates.shape[0]

    def plan(self, expert: int) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """``None`` if no row selected the expert, else ``(rows, gate)``.

        ``rows`` is ``None`` when every row selected it (no gather needed), else the indices of the rows
        that did; ``gate`` holds their router weights (with grad to the router).
        """
        if expert not in self._plans:
            if self._selected_host is None:
                self._selected_host = self.selected.cpu()
            column = self._selected_host[:, expert]
            if not bool(column.any()):
                plan = None
            elif bool(column.all()):
                plan = (None, self.gates[:, expert])
            else:
                rows = column.nonzero().flatten().to(self.gates.device)
                plan = (rows, self.gates.index_select(0, rows)[:, expert])
            self._plans[expert] = plan
        return self._plans[expert]

    def factor(self, expert: int, scale: float, dtype: torch.dtype, ndim: int) -> torch.Tensor:
        """``scale · gate`` of :meth:`plan`, shaped ``(rows, 1, ..., 1)`` to multiply an ``ndim``-d update.

        Cached: decoding steps reuse it instead of recomputing it in every expert call.
        """
        key = (expert, scale, dtype, ndim)
        value = self._factors.get(key)
        if value is None:
            gate = self.plan(expert)[1]
            value = (gate * scale).to(dtype).view(-1, *([1] * (ndim - 1)))
            self._factors[key] = value
        return value


class RoutingContext:
    """Per-model routing state shared by the hooks and the routers (a plain object, not a module)."""

    def __init__(self, arg_names: tuple[str, ...]) -> None:
        self.arg_names = arg_names  # positional parameter names of the model's forward
        self.epoch = 0
        self.reuse = False
        self.pool_mask: torch.Tensor | None = None
        self.recording = False
        self.records: list[tuple[Any, str, RoutingState]] = []  # (router, adapter, state) of this forward
        self.prompt_len: int | None = None  # set by MiLoRAModel.generate: route on the first tokens only
        self.pending_aux: dict[tuple[int, str], Any] = {}  # reentrant checkpointing, see adapter_balance_losses

    def mask_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The pool mask for hidden states ``(B, T, d)``, or ``None`` (all tokens) if it does not fit them."""
        mask = self.pool_mask
        if mask is None or mask.shape != hidden.shape[:2]:
            return None
        return mask.to(hidden.device)


def cache_length(cache: Any) -> int:
    """Tokens already in a KV cache (0 for ``None``)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def build_pool_mask(attention_mask, labels, prompt_mask, length: int | None, prompt_len: int | None = None):
    """The tokens each row's routers pool over, ``(B, T)`` bool, or ``None`` for all tokens.

    ``attention_mask`` may be longer than the current tokens (a cache in front); its last ``length``
    columns are used. A row that a rule leaves empty falls back to its attended tokens, then to all.
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
    if prompt_len is not None and length is not None:
        reference = chosen if chosen is not None else attended
        device = reference.device if reference is not None else None
        in_prompt = (torch.arange(length, device=device) < prompt_len).unsqueeze(0)
        chosen = in_prompt if chosen is None else chosen & in_prompt
    if chosen is None:
        pool = attended
    else:
        if attended is not None:
            chosen = chosen.to(attended.device)
            try:
                fits = torch.broadcast_shapes(chosen.shape, attended.shape) == attended.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"MiLoRA: prompt_mask/labels of shape {tuple(chosen.shape)} do not match the attention mask "
                    f"{tuple(attended.shape)}."
                )
            pool = chosen & attended
            pool = torch.where(pool.any(dim=-1, keepdim=True), pool, attended)
        else:
            pool = chosen
    if pool is None:
        return None
    return pool | ~pool.any(dim=-1, keepdim=True)


def _tag_cache(cache: Any, epoch: int) -> None:
    try:
        setattr(cache, CACHE_TAG, epoch)
    except (AttributeError, TypeError):  # e.g. a tuple: cannot be recognised later, so it is routed afresh
        pass


def routing_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
    context: RoutingContext | None = module.__dict__.get(CONTEXT_ATTR)
    if context is None:
        return None
    prompt_mask = kwargs.pop("prompt_mask", None)
    inputs = dict(zip(context.arg_names, args, strict=False))
    inputs.update(kwargs)
    context.records = []
    context.recording = True
    context.pending_aux = {}  # left over from a forward whose backward never came
    cache = inputs.get("past_key_values")
    if cache_length(cache) > 0:
        tag = getattr(cache, CACHE_TAG, None)
        if tag == context.epoch:
            context.reuse = True
            return args, kwargs
        if tag is not None:
            raise RuntimeError(
                "MiLoRA: this KV cache was routed for an earlier prompt, whose routing has been replaced by a later "
                "forward or generate call. MiLoRA keeps the routing of the most recent prompt only; run the prompt "
                "again without a cache to continue it."
            )
    context.reuse = False
    context.epoch += 1
    tokens = inputs.get("input_ids")
    if not isinstance(tokens, torch.Tensor):
        tokens = inputs.get("inputs_embeds")
    length = tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None
    context.pool_mask = build_pool_mask(
        inputs.get("attention_mask"), inputs.get("labels"), prompt_mask, length, context.prompt_len
    )
    return args, kwargs


def _get(output: Any, key: str):
    if isinstance(output, dict):
        return output.get(key)
    return getattr(output, key, None)


def adapter_balance_losses(records, context: RoutingContext) -> dict[str, tuple[torch.Tensor, float]]:
    """Per adapter: the Switch loss averaged over the blocks that routed in this forward, and its coefficient.

    Under *reentrant* activation checkpointing the recorded probabilities carry no graph (the first pass
    runs under ``no_grad``); their gradient is then delivered when the block is recomputed, with the
    mechanism of :mod:`loramix.mor._checkpointing`: the loss goes through a ``GradProbe`` and each router
    finds a ``PendingAux`` in ``context.pending_aux`` when it is recomputed (``MiLoRARouter._attach_pending_aux``).
    """
    from ..mor._checkpointing import AuxGradState, GradProbe, PendingAux

    by_adapter: dict[str, list] = {}
    for router, name, state in records:
        by_adapter.setdefault(name, []).append((router, state))
    losses = {}
    for name, entries in by_adapter.items():
        loss = torch.stack([switch_balance_loss(state.probs) for _, state in entries]).mean()
        deferred = [
            (router, state)
            for router, state in entries
            if torch.is_grad_enabled() and not state.probs.requires_grad and router.milora_router[name].requires_grad
        ]
        if deferred:
            grad_state = AuxGradState()
            loss = GradProbe.apply(loss, loss.new_zeros((), requires_grad=True), grad_state)
            for router, state in deferred:
                pending = PendingAux(grad_state, 1.0 / len(entries), switch_balance_loss, state.probs.shape)
                context.pending_aux[(id(router), name)] = pending
        losses[name] = (loss, entries[0][0].router_aux_loss_coef[name])
    return losses


def routing_post_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any):
    context: RoutingContext | None = module.__dict__.get(CONTEXT_ATTR)
    if context is None:
        return None
    context.recording = False
    records, context.records = context.records, []
    cache = _get(output, "past_key_values")
    if cache is not None and not context.reuse:
        _tag_cache(cache, context.epoch)
    if not records or not isinstance(output, dict):
        return None
    losses = adapter_balance_losses(records, context)
    # real dataclass fields, so that DDP / torch.compile can rebuild the outputs (loramix._outputs)
    output = with_output_fields(
        output,
        aux_loss=torch.stack([loss for loss, _ in losses.values()]).mean(),
        router_logits=tuple(state.logits for _, _, state in records),
    )
    inputs = dict(zip(context.arg_names, args, strict=False))
    inputs.update(kwargs)
    loss = output.get("loss")
    if module.training and inputs.get("labels") is not None and loss is not None:
        extra = [coef * aux for aux, coef in losses.values() if coef > 0]
        if extra:
            output["loss"] = loss + sum(extra)
    return output


def install_routing_hooks(model: torch.nn.Module) -> RoutingContext:
    """Give ``model`` its routing context and hooks (idempotent); returns the context."""
    context = model.__dict__.get(CONTEXT_ATTR)
    if context is None:
        try:
            parameters = inspect.signature(model.forward).parameters.values()
            names = tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        except (TypeError, ValueError):
            names = ("input_ids", "attention_mask")
        context = RoutingContext(names)
        model.__dict__[CONTEXT_ATTR] = context
    if routing_pre_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(routing_pre_hook, with_kwargs=True)
    if routing_post_hook not in model._forward_hooks.values():
        model.register_forward_hook(routing_post_hook, with_kwargs=True)
    return context


def remove_routing_hooks(model: torch.nn.Module) -> None:
    """Undo :func:`install_routing_hooks` (used by ``unload``)."""
    for hooks, with_kwargs in (
        (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs),
        (model._forward_hooks, model._forward_hooks_with_kwargs),
    ):
        for key in [k for k, fn in hooks.items() if fn in (routing_pre_hook, routing_post_hook)]:
            del hooks[key]
            with_kwargs.pop(key, None)
    model.__dict__.pop(CONTEXT_ATTR, None)
