"""MiLoRA tuner layers: the per-block router (wrapping the block's first module) and the LoRA experts.

Both live inside the model's module tree as ordinary PEFT tuner layers, so PEFT's save/load,
``set_adapter``, ``disable_adapter``, ``delete_adapter``, ``requires_grad`` handling, dtype casts and
``unload`` — and transformers' ``model.load_adapter``, which keeps no tuner object — cover them with
no special code. Each expert is given a reference to its block's router when the router is attached
(``Linear.block_router``, as VeRA hands its shared tensors to its layers); the routing itself belongs to the
forward, not to the modules (threads share the model): the router puts it in the forward's
:class:`~loramix.routing.RoutingSession` under its own key, and the block's experts, which run after it, read
it there through their router.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from loramix import kernels
from loramix._tuner.layer import ScaledRouter, init_adapter_state
from loramix.milora import functional as F_milora
from loramix.milora.config import MiLoRAConfig
from loramix.routing.balance import attach_pending
from loramix.routing.mixed_batch import padding_fits
from loramix.routing.session import RouterRecord, RoutingSession, adapter_rows, current_session


class RoutingState:
    """One router's decision for one adapter and one batch of prompts (MiLoRA paper Eq. 3).

    ``logits``/``probs``/``gates`` are ``(S, N)`` float32, ``selected`` ``(S, N)`` bool, for the ``S``
    prompts routed: the whole batch, or in a mixed-adapter batch the batch rows ``rows`` of this adapter
    (:meth:`place`). :meth:`plan` tells expert ``i`` which batch rows it runs on; it costs one
    device-to-host copy per state (per block per prompt), never one per decoding step.
    """

    __slots__ = (
        "logits", "probs", "gates", "selected", "rows", "row_key", "batch_size", "_plans", "_selected_host", "_factors"
    )  # fmt: skip

    def __init__(self, logits, probs, gates, selected) -> None:
        self.logits, self.probs, self.gates, self.selected = logits, probs, gates, selected
        self.rows: torch.Tensor | None = None  # the batch rows routed (None: all)
        self.row_key: tuple[int, ...] | None = None  # the same on the host
        self.batch_size = gates.shape[0]  # rows of the batch the state belongs to
        self._plans: dict[int, tuple[torch.Tensor | None, torch.Tensor] | None] = {}
        self._selected_host: torch.Tensor | None = None
        self._factors: dict[tuple, torch.Tensor] = {}

    def place(self, rows: torch.Tensor, row_key: tuple[int, ...], batch_size: int) -> RoutingState:
        """Mark the routed prompts as the rows ``rows`` (``row_key`` on the host) of a batch of ``batch_size``."""
        self.rows, self.row_key, self.batch_size = rows, row_key, batch_size
        return self

    def plan(self, expert: int) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """``None`` if no row selected the expert, else ``(rows, gate)``: ``rows`` is ``None`` when every
        row of the batch selected it, else the batch indices of those that did; ``gate`` their router
        weights (with grad)."""
        if expert not in self._plans:
            if self._selected_host is None:
                self._selected_host = self.selected.cpu()
            column = self._selected_host[:, expert]
            if not bool(column.any()):
                plan = None
            elif bool(column.all()):
                plan = (self.rows, self.gates[:, expert])
            else:
                local = column.nonzero().flatten()
                rows = local if self.row_key is None else torch.tensor(self.row_key)[local]
                gate = self.gates.index_select(0, local.to(self.gates.device))[:, expert]
                plan = (rows.to(self.gates.device), gate)
            self._plans[expert] = plan
        return self._plans[expert]

    def factor(self, expert: int, scale: float, dtype: torch.dtype, ndim: int) -> torch.Tensor:
        """``scale · gate`` of :meth:`plan`, shaped ``(rows, 1, ..., 1)``; cached, so decoding steps reuse it."""
        key = (expert, scale, dtype, ndim)
        value = self._factors.get(key)
        if value is None:
            value = (self.plan(expert)[1] * scale).to(dtype).view(-1, *([1] * (ndim - 1)))
            self._factors[key] = value
        return value


class GroupedExperts:
    """One expert layer's work in a mixed-adapter batch, built once per call (a ``generate``) and reused by
    its decoding steps: the experts of several adapters, each on the rows whose adapter selected it,
    stacked for :func:`~loramix.milora.functional.grouped_lora`. ``states`` are the routings it was built
    from; ``stack_A`` is ``None`` when no row selected this expert; ``sizes`` are the rows per adapter."""

    __slots__ = ("states", "stack_A", "stack_B", "gather", "counts", "factor", "sizes")

    def __init__(self, states: tuple[RoutingState, ...], stack_A=None, stack_B=None, gather=None, counts=None,
                 factor=None, sizes=()) -> None:  # fmt: skip
        self.states, self.stack_A, self.stack_B = states, stack_A, stack_B
        self.gather, self.counts, self.factor, self.sizes = gather, counts, factor, sizes

    def built_from(self, states: tuple[RoutingState, ...]) -> bool:
        return len(states) == len(self.states) and all(a is b for a, b in zip(states, self.states, strict=True))


MERGE_ERROR = (
    "MiLoRA adapters cannot be merged: the router selects the experts of every block per prompt, so no single "
    "weight matrix reproduces the adapter for all prompts. Keep the adapter unmerged (routing costs one router call "
    "per block per prompt), or use `unload()` to get the base model back without the adapter."
)


class MiLoRATunerLayer(BaseTunerLayer):
    """Common base of :class:`MiLoRARouter` and :class:`Linear` (the tuner's ``tuner_layer_cls``)."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)


class MiLoRARouter(nn.Module, MiLoRATunerLayer, ScaledRouter):
    """The router of one transformer block; wraps the block's ``router_anchor`` (e.g. ``input_layernorm``).

    Its input is the block's input hidden states ``H`` (B, T, d). Unless the current forward is a
    decoding step that reuses the routing of the prompt, it computes, for each active adapter,
    ``Top-k(softmax(g(Pooler(H')) W_r))`` over the tokens of the routing context's pool mask and keeps
    it for the block's experts; then it returns ``base_layer(H)`` unchanged. ``H'`` is ``base_layer(H)``
    (``router_input="normalized"``, the default) or ``H`` itself (``"residual"``).

    Parameters per adapter: ``milora_router`` (N x d, stored divided by ``router_lr_ratio``, see
    :class:`~loramix._tuner.layer.ScaledRouter`), ``milora_pool_query`` (d; attention pooler
    only), ``milora_rational_num`` (m+1) and ``milora_rational_den`` (n) (rational activation only).
    """

    adapter_layer_names = ("milora_router", "milora_pool_query", "milora_rational_num", "milora_rational_den")
    other_param_names = (
        "top_k",
        "gate_form",
        "pooler",
        "activation",
        "router_input",
        "expert_names",
        "router_aux_loss_coef",
        "router_lr_ratio",
    )
    router_container = "milora_router"

    # per adapter (PEFT's containers, made by init_adapter_state)
    milora_router: nn.ParameterDict
    milora_pool_query: nn.ParameterDict
    milora_rational_num: nn.ParameterDict
    milora_rational_den: nn.ParameterDict
    top_k: dict[str, int]
    gate_form: dict[str, str]
    pooler: dict[str, str]
    activation: dict[str, str]
    router_input: dict[str, str]
    expert_names: dict[str, tuple[str, ...]]
    router_aux_loss_coef: dict[str, float]
    router_lr_ratio: dict[str, float]

    def __init__(self, base_layer: nn.Module, hidden_size: int) -> None:
        super().__init__()
        init_adapter_state(self, base_layer)
        self.hidden_size = hidden_size
        self._active_adapter = []

    def update_layer(
        self,
        adapter_name: str,
        config: MiLoRAConfig,
        expert_names: list[str],
        active_adapters: list[str],
        inference_mode: bool = False,
    ) -> None:
        """Create (or replace) the router of ``adapter_name`` for the block's experts ``expert_names``."""
        num_experts, d = len(expert_names), self.hidden_size
        if config.top_k > num_experts:
            raise ValueError(
                f"`top_k`={config.top_k} is larger than the number of experts in this block ({num_experts}: "
                f"{list(expert_names)}). Lower top_k or target more modules."
            )
        self.top_k[adapter_name] = config.top_k
        self.gate_form[adapter_name] = config.gate_form
        self.pooler[adapter_name] = config.pooler
        self.activation[adapter_name] = config.activation
        self.router_input[adapter_name] = config.router_input
        self.expert_names[adapter_name] = tuple(expert_names)
        self.router_aux_loss_coef[adapter_name] = config.router_aux_loss_coef
        self.router_lr_ratio[adapter_name] = config.router_lr_ratio
        self.milora_router[adapter_name] = nn.Parameter(torch.empty(num_experts, d))
        if config.pooler == "attention":
            self.milora_pool_query[adapter_name] = nn.Parameter(torch.empty(d))
        if config.activation == "rational":
            m, n = config.rational_order
            self.milora_rational_num[adapter_name] = nn.Parameter(torch.empty(m + 1))
            self.milora_rational_den[adapter_name] = nn.Parameter(torch.empty(n))
        self.reset_router_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        trainable = adapter_name in active_adapters and not inference_mode
        for attr in self.adapter_layer_names:
            if adapter_name in getattr(self, attr):
                getattr(self, attr)[adapter_name].requires_grad_(trainable)
        if not self._active_adapter:
            self._active_adapter = list(active_adapters)

    @torch.no_grad()
    def reset_router_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """Router W_r ~ N(0, 0.02) (random 1/sqrt(d) with ``init_weights=False``) whatever ``router_lr_ratio``, pool
        query 0 (= mean pooling at the start), rational coefficients = the GeLU fit of
        :func:`~loramix.milora.functional.rational_gelu_init`."""
        router = self.milora_router[adapter_name]
        std = 0.02 if init_weights else 1.0 / math.sqrt(self.hidden_size)
        nn.init.normal_(router, std=std / self.router_lr_ratio[adapter_name])
        if adapter_name in self.milora_pool_query:
            query = self.milora_pool_query[adapter_name]
            nn.init.zeros_(query) if init_weights else nn.init.normal_(query, std=1.0 / math.sqrt(self.hidden_size))
        if adapter_name in self.milora_rational_num:
            num = self.milora_rational_num[adapter_name]
            den = self.milora_rational_den[adapter_name]
            a, b = F_milora.rational_gelu_init(num.shape[0] - 1, den.shape[0])
            num.copy_(torch.tensor(a, dtype=num.dtype, device=num.device))
            den.copy_(torch.tensor(b, dtype=den.dtype, device=den.device))

    def route(self, adapter_name: str, hidden: torch.Tensor, mask: torch.Tensor | None) -> RoutingState:
        """The routing of ``adapter_name`` for hidden states ``(B, T, d)`` pooled over ``mask`` (B, T).

        The maths is :func:`loramix.milora.functional.route` (float32, autocast off).
        """
        if hidden.dim() != 3:
            raise ValueError(
                f"MiLoRA routers expect block inputs of shape (batch, seq, hidden), got {tuple(hidden.shape)}."
            )
        name = adapter_name
        logits, probs, gates, selected = F_milora.route(
            hidden,
            mask,
            self.router_weight(name),
            pooler=self.pooler[name],
            activation=self.activation[name],
            top_k=self.top_k[name],
            gate_form=self.gate_form[name],
            query=self.milora_pool_query[name] if name in self.milora_pool_query else None,
            numerator=self.milora_rational_num[name] if name in self.milora_rational_num else None,
            denominator=self.milora_rational_den[name] if name in self.milora_rational_den else None,
        )
        return RoutingState(logits, probs, gates, selected)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        session = current_session()
        for name, rows in adapter_rows(session, self.active_adapters, self.milora_router, x):
            state = self._routing(session, name, result if self.router_input[name] == "normalized" else x, rows)
            session.routing[(self, name)] = state  # for the block's experts (Linear.block_router), which run next
            result = attach_pending(session, self, name, state.probs, result)
        return result

    def _routing(
        self, session: RoutingSession | None, name: str, hidden: torch.Tensor, rows: torch.Tensor | None
    ) -> RoutingState:
        """Route adapter ``name`` on the prompts of ``hidden`` (only the batch rows ``rows`` in a mixed-adapter
        batch), or take the routing the session reuses (decoding steps)."""
        if session is None:
            raise RuntimeError(
                "MiLoRA routers run inside a forward of the adapted model, which tells them the prompt tokens; "
                "call the model (or its PeftModel), not a block or layer alone."
            )
        row_key = None if rows is None else session.rows.host[name]
        if session.continues_cache:
            state = (session.reuse or {}).get((self, name))
            if state is None or state.batch_size != hidden.shape[0] or state.row_key != row_key:
                raise RuntimeError(
                    f"MiLoRA: this forward continues a KV cache, but no routing of adapter '{name}' matches it (the "
                    "cache was not produced by a routed forward of this model and adapter, or the adapter was set, "
                    "enabled or added since, or the batch or its `adapter_names` changed). Run the prompt again "
                    "without a cache."
                )
            return state
        pool = session.pool_mask(hidden)
        if rows is None:
            state = self.route(name, hidden, pool)
        else:
            pool = None if pool is None else pool.index_select(0, rows)
            state = self.route(name, hidden.index_select(0, rows), pool).place(rows, row_key, hidden.shape[0])
        if not session.closed:  # not a re-run by activation checkpointing
            session.decisions[(self, name)] = state
            record = RouterRecord(
                self, name, state.probs, logits=state.logits, selected=state.selected, rows=rows, gates=state.gates
            )
            session.record(record)
        return state

    def __repr__(self) -> str:
        return "milora.router." + super().__repr__()


class Linear(nn.Module, MiLoRATunerLayer):
    """An ``nn.Linear`` that is one expert of its block: ``o = W x + b + Σ_active w(prompt) · Δ(x)``.

    ``Δ`` is ``(lora_alpha / r) · B A x`` (``milora_A``: r x d_in, ``milora_B``: d_out x r), or the DoRA
    update with magnitude ``milora_magnitude`` (d_out) for MiDoRA. ``w`` is the router weight of the
    sequence for this expert (0 when not selected). Rows that did not select the expert cost nothing;
    if no row did, the expert is skipped entirely.
    """

    adapter_layer_names = ("milora_A", "milora_B", "milora_magnitude")
    other_param_names = ("r", "lora_alpha", "scaling", "milora_dropout", "expert_index", "block_router")

    # per adapter (PEFT's containers, made by init_adapter_state)
    milora_A: nn.ParameterDict
    milora_B: nn.ParameterDict
    milora_magnitude: nn.ParameterDict  # MiDoRA only
    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    milora_dropout: nn.ModuleDict
    expert_index: dict[str, int]  # this expert's column in its block router's choice
    block_router: dict[str, MiLoRARouter]  # the router of this expert's block: a reference, set by the tuner

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MiLoRAConfig, **kwargs: Any) -> None:
        super().__init__()
        init_adapter_state(self, base_layer, modules=("milora_dropout",))
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MiLoRA can only adapt torch.nn.Linear layers, got {type(base).__name__}.")
        self.in_features, self.out_features = base.in_features, base.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def update_layer(self, adapter_name: str, config: MiLoRAConfig, inference_mode: bool = False) -> None:
        """Create (or replace) the expert of ``adapter_name`` from ``config``."""
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        self.milora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.milora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.milora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        if config.use_dora:
            self.milora_magnitude[adapter_name] = nn.Parameter(torch.empty(self.out_features))
        self.reset_expert_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_expert_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """A kaiming-uniform (as PEFT's LoRA), B zero (random with ``init_weights=False``); DoRA magnitude =
        ``||W + s·BA||`` per row (PEFT's DoRA init, so a fresh MiDoRA expert is a no-op too)."""
        lora_A, lora_B = self.milora_A[adapter_name], self.milora_B[adapter_name]
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(lora_B)
        else:
            nn.init.normal_(lora_B, std=0.1)
        if adapter_name in self.milora_magnitude:
            magnitude = self.milora_magnitude[adapter_name]
            weight = self.get_base_layer().weight
            if weight.device.type == "meta" or magnitude.device.type == "meta":
                return
            norm = F_milora.dora_weight_norm(weight.to(lora_A.device), lora_A, lora_B, self.scaling[adapter_name])
            if not init_weights:
                norm = norm * (1.0 + 0.2 * torch.randn_like(norm))
            magnitude.copy_(norm.to(magnitude.dtype))

    def _block_routing(self, session: RoutingSession | None, name: str, x: torch.Tensor) -> RoutingState:
        """The routing of this expert's block for adapter ``name`` in this forward (its router ran first)."""
        router = self.block_router.get(name)
        state = None if session is None or router is None else session.routing.get((router, name))
        if state is None:
            raise RuntimeError(
                f"MiLoRA expert (adapter '{name}') ran before its block's router chose the experts. MiLoRA experts "
                "must be called inside their transformer block, after the block's router (its `router_anchor`), "
                "within a forward of the adapted model."
            )
        if state.batch_size != x.shape[0]:
            raise RuntimeError(
                f"MiLoRA: the router chose experts for a batch of {state.batch_size} prompts, but this layer got a "
                f"batch of {x.shape[0]}."
            )
        return state

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s·BA||`` per row; cached in inference (no grad) until a weight changes (decoding steps)."""
        lora_A, lora_B = self.milora_A[name], self.milora_B[name]
        if self.training or torch.is_grad_enabled():
            return F_milora.dora_weight_norm(weight, lora_A, lora_B, self.scaling[name])
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (weight, lora_A, lora_B))
        cached = self._dora_norms.get(name)
        if cached is None or cached[0] != key:
            cached = (key, F_milora.dora_weight_norm(weight, lora_A, lora_B, self.scaling[name]))
            self._dora_norms[name] = cached
        return cached[1]

    def _dora_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The DoRA update for inputs ``x`` (already cast to the adapter dtype) and ``base_out`` = ``W x + b``."""
        base, dropout = self.get_base_layer(), self.milora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            plain = base_out if base.bias is None else base_out - base.bias
            plain = plain.to(x.dtype)
        else:  # as PEFT: with active dropout, W x is recomputed on the dropped-out input
            x = dropout(x)
            plain = torch.nn.functional.linear(x, base.weight.to(x.dtype))
        norm = self._dora_norm(name, base.weight)
        lora_A, lora_B, magnitude = self.milora_A[name], self.milora_B[name], self.milora_magnitude[name]
        return F_milora.dora_update(x, plain, lora_A, lora_B, magnitude, norm, self.scaling[name])

    def _zero_gradient_link(self, name: str, result: torch.Tensor) -> torch.Tensor:
        """In training, tie an unselected expert to the output with weight 0, so its parameters get zero
        gradients rather than none: DDP (without ``find_unused_parameters``) and FSDP reduce the gradients of
        every parameter on every rank, and which experts a batch uses differs between ranks. Costs one
        scalar add per unselected expert and only when gradients are being recorded."""
        if not (self.training and torch.is_grad_enabled()):
            return result
        params = [p for p in (self.milora_A[name], self.milora_B[name]) if p.requires_grad]
        if name in self.milora_magnitude and self.milora_magnitude[name].requires_grad:
            params.append(self.milora_magnitude[name])
        if not params:
            return result
        zero = sum(p.sum() for p in params) * 0.0
        return result + zero.to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        layout = None if (session := current_session()) is None else session.token_layout(x)
        if layout is not None:  # the batch's tokens flattened (OPT's fc1/fc2): rows follow from batch x tokens
            return self.forward(x.reshape(*layout, x.shape[-1]), *args, **kwargs).flatten(0, 1)
        result = self.base_layer(x, *args, **kwargs)
        names = [name for name, _ in adapter_rows(session, self.active_adapters, self.milora_A, x)]
        if session is not None and session.rows is not None and not torch.is_grad_enabled():
            grouped = [name for name in names if name not in self.milora_magnitude]  # MiDoRA: per adapter
            if len(grouped) > 1 and len({self.milora_A[name].dtype for name in grouped}) == 1:
                plan = self._grouped_plan(session, grouped, x)
                tokens_per_row = x[0].numel() // x.shape[-1]
                # no row selected this expert: nothing to add; the Triton kernel skips padding; PyTorch pays for it
                if plan.stack_A is None or kernels.use_triton(x) or padding_fits(plan.sizes, tokens_per_row):
                    result = self._add_grouped(plan, x, result)
                    names = [name for name in names if name not in grouped]
        for name in names:  # each adapter's routing knows its rows
            result = self._add_update(name, x, result, self._block_routing(session, name, x))
        return result

    def _grouped_plan(self, session: RoutingSession, names: list[str], x: torch.Tensor) -> GroupedExperts:
        """The experts of all ``names`` for this call's routing, built once and reused by the decoding steps."""
        states = tuple(self._block_routing(session, name, x) for name in names)
        plan = session.scratch.get(self)
        if plan is None or not plan.built_from(states):
            plan = self._grouped_experts(names, states)
            session.scratch[self] = plan
        return plan

    def _add_grouped(self, plan: GroupedExperts, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the experts of the plan's adapters on their selecting rows, in one computation."""
        if plan.stack_A is None:
            return result
        x_in = self._cast_input_dtype(x, plan.stack_A.dtype)
        return F_milora.grouped_lora(x_in, result, plan.stack_A, plan.stack_B, plan.gather, plan.counts, plan.factor)

    @torch.no_grad()
    def _grouped_experts(self, names: list[str], states: tuple[RoutingState, ...]) -> GroupedExperts:
        """Stack the selected experts of ``names``, each adapter's rows padded to the largest group."""
        parts = []
        for name, state in zip(names, states, strict=True):
            plan = state.plan(self.expert_index[name])
            if plan is not None:
                rows, gate = plan
                rows = torch.arange(state.batch_size, device=gate.device) if rows is None else rows
                parts.append((name, rows, gate.float() * self.scaling[name]))
        if not parts:
            return GroupedExperts(states)
        lora_A = self.milora_A[parts[0][0]]
        slots, rank = max(len(rows) for _, rows, _ in parts), max(self.r[name] for name, _, _ in parts)
        stack_A = lora_A.new_zeros(len(parts), self.in_features, rank)
        stack_B = lora_A.new_zeros(len(parts), rank, self.out_features)
        gather = torch.empty(len(parts), slots, dtype=torch.long, device=lora_A.device)
        factor = torch.zeros(len(parts), slots, device=lora_A.device)
        for index, (name, rows, weights) in enumerate(parts):
            r, count = self.r[name], len(rows)
            stack_A[index, :, :r] = self.milora_A[name].T
            stack_B[index, :r] = self.milora_B[name].T
            gather[index, :count] = rows
            gather[index, count:] = rows[0]  # padding: a real row of the adapter, with factor 0
            factor[index, :count] = weights
        sizes = [len(rows) for _, rows, _ in parts]
        counts = torch.tensor(sizes, dtype=torch.int32, device=lora_A.device)
        return GroupedExperts(states, stack_A, stack_B, gather, counts, factor, sizes)

    def _add_update(self, name: str, x: torch.Tensor, result: torch.Tensor, state: RoutingState) -> torch.Tensor:
        """``result + w · Δ(x)`` on the rows whose prompt selected this expert; no cost if none did."""
        index = self.expert_index[name]
        plan = state.plan(index)
        if plan is None:
            return self._zero_gradient_link(name, result)
        rows = plan[0]
        x_in = self._cast_input_dtype(x, self.milora_A[name].dtype)
        if name in self.milora_magnitude:  # MiDoRA
            x_rows = x_in if rows is None else x_in.index_select(0, rows)
            delta = self._dora_delta(name, x_rows, result if rows is None else result.index_select(0, rows))
            return F_milora.add_rows(result, delta * state.factor(index, 1.0, delta.dtype, delta.dim()), rows)
        dropout = self.milora_dropout[name]
        dropout = dropout if self.training and not isinstance(dropout, nn.Identity) else None
        factor = state.factor(index, self.scaling[name], x_in.dtype, x_in.dim())  # router weight x lora_alpha / r
        return F_milora.gated_lora(x_in, result, self.milora_A[name], self.milora_B[name], rows, factor, dropout)

    def __repr__(self) -> str:
        return "milora." + super().__repr__()
