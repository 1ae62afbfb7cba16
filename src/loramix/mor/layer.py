"""MoR tuner layer: wraps an ``nn.Linear`` and owns one MoR adapter per adapter name."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from loramix._tuner.layer import ScaledRouter, init_adapter_state
from loramix.mor.config import MoRConfig
from loramix.mor.functional import MoRDropout, grouped_mor, mor_delta_weight, mor_linear
from loramix.routing.balance import attach_pending
from loramix.routing.mixed_batch import padding_fits
from loramix.routing.session import RouterRecord, adapter_rows, current_session


def routed_merge_error(adapter_names: list[str]) -> str:
    """Why adapters with a learnable router cannot be merged (the one wording of that refusal)."""
    return (
        f"Cannot merge MoR adapter(s) {adapter_names}: the softmax router makes the update depend on each token "
        "(ΔW(x) = Σ_i G_i(x)·...), so no single weight matrix reproduces it. Merging is exact only with "
        "num_experts=1 or router='mean'. Use `unload()` to get the base model back, or keep the adapter unmerged. "
        "Nothing was merged."
    )


class MoRLayer(BaseTunerLayer, ScaledRouter):
    """Adapter-keyed MoR parameters for one linear layer.

    ``mor_A`` (r x d_in) and ``mor_B`` (d_out x r) are the shared LoRA; ``mor_omega_A`` (N x r) and
    ``mor_omega_B`` (N x d_out) the stacked expert scaling vectors; ``mor_router`` (N x d_in) the
    router weight divided by ``router_lr_ratio`` (absent for the non-learnable ``router="mean"``; see
    :class:`~loramix._tuner.layer.ScaledRouter`).
    """

    adapter_layer_names = ("mor_A", "mor_B", "mor_omega_A", "mor_omega_B", "mor_router")
    other_param_names = ("r", "lora_alpha", "scaling", "num_experts", "router_lr_ratio", "mor_dropout")
    router_container = "mor_router"

    # per adapter (PEFT's containers, made by init_adapter_state)
    mor_A: nn.ParameterDict
    mor_B: nn.ParameterDict
    mor_omega_A: nn.ParameterDict
    mor_omega_B: nn.ParameterDict
    mor_router: nn.ParameterDict  # learnable routers only (router='softmax', num_experts > 1)
    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    num_experts: dict[str, int]
    router_lr_ratio: dict[str, float]
    mor_dropout: nn.ModuleDict

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        init_adapter_state(self, base_layer, modules=("mor_dropout",))

        base_layer = self.get_base_layer()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoR can only adapt torch.nn.Linear layers, got {type(base_layer).__name__}.")
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def update_layer(self, adapter_name: str, config: MoRConfig, inference_mode: bool = False) -> None:
        """Create (or replace) the parameters of ``adapter_name`` from ``config``."""
        n, r = config.num_experts, config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        self.num_experts[adapter_name] = n
        self.router_lr_ratio[adapter_name] = config.router_lr_ratio
        self.mor_dropout[adapter_name] = MoRDropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.mor_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.mor_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.mor_omega_A[adapter_name] = nn.Parameter(torch.empty(n, r))
        self.mor_omega_B[adapter_name] = nn.Parameter(torch.empty(n, self.out_features))
        if config.router == "softmax":
            self.mor_router[adapter_name] = nn.Parameter(torch.empty(n, self.in_features))
        self.reset_mor_parameters(adapter_name, config.init_weights, config.omega_init_std)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_mor_parameters(self, adapter_name: str, init_weights: bool, omega_init_std: float = 0.0) -> None:
        """Paper Table 2: A and router normal-ish, B zero; Ω around 1 (exactly 1 with ``omega_init_std=0``), so MoR
        starts as a zero LoRA. The router weight W_r starts at N(0, 0.02²) whatever ``router_lr_ratio``."""
        nn.init.kaiming_uniform_(self.mor_A[adapter_name], a=math.sqrt(5))
        ratio = self.router_lr_ratio[adapter_name]
        if adapter_name in self.mor_router:
            nn.init.normal_(self.mor_router[adapter_name], std=0.02 / ratio)
        if init_weights:
            nn.init.zeros_(self.mor_B[adapter_name])
            nn.init.ones_(self.mor_omega_A[adapter_name])
            nn.init.ones_(self.mor_omega_B[adapter_name])
            if omega_init_std > 0:  # distinct experts from the start (MoRConfig.omega_init_std)
                nn.init.normal_(self.mor_omega_A[adapter_name], mean=1.0, std=omega_init_std)
                nn.init.normal_(self.mor_omega_B[adapter_name], mean=1.0, std=omega_init_std)
        else:
            nn.init.normal_(self.mor_B[adapter_name], std=0.1)
            nn.init.normal_(self.mor_omega_A[adapter_name], mean=1.0, std=0.5)
            nn.init.normal_(self.mor_omega_B[adapter_name], mean=1.0, std=0.5)
            if adapter_name in self.mor_router:
                nn.init.normal_(self.mor_router[adapter_name], std=1.0 / math.sqrt(self.in_features) / ratio)

    def is_input_independent(self, adapter_name: str) -> bool:
        """Whether G(x) is constant for this adapter (one expert or the mean router)."""
        return self.num_experts[adapter_name] == 1 or adapter_name not in self.mor_router

    def _fixed_expert_weights(self, adapter_name: str) -> torch.Tensor:
        n = self.num_experts[adapter_name]
        return torch.full((n,), 1.0 / n, device=self.mor_A[adapter_name].device)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` (d_out x d_in) of an input-independent adapter; raises for a routed one."""
        if not self.is_input_independent(adapter_name):
            raise ValueError(routed_merge_error([adapter_name]))
        return mor_delta_weight(
            self.mor_A[adapter_name],
            self.mor_B[adapter_name],
            self.mor_omega_A[adapter_name],
            self.mor_omega_B[adapter_name],
            self._fixed_expert_weights(adapter_name),
            self.scaling[adapter_name],
        )

    def merge_refusal(self, adapter_names: list[str]) -> str | None:
        """Why the adapters of ``adapter_names`` that this layer holds cannot be merged into it, or None."""
        names = [name for name in adapter_names if name in self.mor_A and name not in self.merged_adapters]
        routed = [name for name in names if not self.is_input_independent(name)]
        if routed:
            return routed_merge_error(routed)
        weight = self.get_base_layer().weight
        if names and not weight.dtype.is_floating_point:
            return (
                f"Cannot merge MoR into a quantized base layer ({type(self.get_base_layer()).__name__} with "
                f"{weight.dtype} weights, e.g. bitsandbytes 4/8-bit): adding ΔW needs float weights. Load the base "
                "model unquantized to merge, or keep the adapter unmerged."
            )
        return None


class Linear(nn.Module, MoRLayer):
    """An ``nn.Linear`` with MoR adapters: ``o = W x + b + Σ_active Δo_adapter(x)``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoRConfig, **kwargs: Any) -> None:
        super().__init__()
        MoRLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``ΔW`` of input-independent adapters to the base weight; every adapter is checked (and, with
        ``safe_merge``, the result too) before the weight changes, so a refusal merges none of them."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [name for name in adapter_names if name in self.mor_A]
        if not names:
            return
        refusal = self.merge_refusal(names)
        if refusal:
            raise ValueError(refusal)
        weight = self.get_base_layer().weight
        merged = weight.data
        for name in names:
            merged = merged + self.get_delta_weight(name).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        weight.data = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ``ΔW`` again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.mor_A:
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``W x + b + (α/r) Σ_i G_i(x) Ω_B[i] ⊙ B(Ω_A[i] ⊙ A x)`` per active adapter (paper Eq. 11, 15)."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        layout = None if (session := current_session()) is None else session.token_layout(x)
        if layout is not None:  # the batch's tokens flattened (OPT's fc1/fc2): rows follow from batch x tokens
            return self.forward(x.reshape(*layout, x.shape[-1]), *args, **kwargs).flatten(0, 1)
        result = self.base_layer(x, *args, **kwargs)
        pairs = adapter_rows(session, self.active_adapters, self.mor_A, x)
        grouped = session is not None and session.rows is not None and len(pairs) > 1 and x.dim() == 3
        if grouped and not torch.is_grad_enabled() and len({self.mor_A[name].dtype for name, _ in pairs}) == 1:
            plan = self._grouped_plan(session, pairs, x)
            if padding_fits(plan[1], x.shape[1]):
                return self._add_grouped(session, plan, [name for name, _ in pairs], x, result)
        for name, rows in pairs:
            result = self._add_update(session, name, x, result, rows)
        return result

    def _grouped_plan(self, session, pairs, x: torch.Tensor):
        """The stacks of :meth:`_grouped_stacks` and the rows per adapter, built once per call (the decoding
        steps of a generate reuse them)."""
        key = (self, session.rows)
        if key not in session.scratch:
            names = [name for name, _ in pairs]
            session.scratch[key] = self._grouped_stacks(names, session.rows.groups(x.device))
        return session.scratch[key]

    def _add_grouped(self, session, plan, names: list[str], x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """A mixed-adapter batch: every adapter of ``names`` on its own rows in one grouped computation."""
        stacks, counts = plan
        x_in = self._cast_input_dtype(x, stacks[0].dtype)
        result, probs = grouped_mor(x_in, result, *stacks)
        mask = session.token_mask
        for index, (name, count) in enumerate(zip(names, counts, strict=True)):
            if name in self.mor_router:
                rows = stacks[-2][index, :count]
                own = probs[index, : count * x.shape[1]].view(count, x.shape[1], -1)[..., : self.num_experts[name]]
                own_mask = None if mask is None else mask.index_select(0, rows.to(mask.device))
                session.record(RouterRecord(self, name, own, mask=own_mask, rows=rows))
        return result

    @torch.no_grad()
    def _grouped_stacks(self, names: list[str], groups: dict[str, torch.Tensor]):
        """The inputs of :func:`~loramix.mor.functional.grouped_mor` for the adapters ``names``."""
        first = self.mor_A[names[0]]
        num, slots = len(names), max(len(groups[name]) for name in names)
        rank = max(self.r[name] for name in names)
        experts = max(self.num_experts[name] for name in names)
        stack_A = first.new_zeros(num, self.in_features, rank)
        stack_router = first.new_zeros(num, self.in_features, experts)
        expert_bias = torch.full((num, experts), float("-inf"), device=first.device)
        stack_omega_A = first.new_zeros(num, experts, rank)
        stack_B = first.new_zeros(num, rank, self.out_features)
        stack_omega_B = first.new_zeros(num, experts, self.out_features)
        gather = torch.empty(num, slots, dtype=torch.long, device=first.device)
        valid = torch.zeros(num, slots, device=first.device)
        for index, name in enumerate(names):
            r, n, rows = self.r[name], self.num_experts[name], groups[name]
            stack_A[index, :, :r] = self.mor_A[name].T
            if name in self.mor_router:
                stack_router[index, :, :n] = self.router_weight(name).T
            expert_bias[index, :n] = 0.0
            stack_omega_A[index, :n, :r] = self.mor_omega_A[name]
            stack_B[index, :r] = self.mor_B[name].T * self.scaling[name]
            stack_omega_B[index, :n] = self.mor_omega_B[name]
            gather[index, : len(rows)] = rows
            gather[index, len(rows) :] = rows[0]  # padding: a real row of the adapter, added with weight 0
            valid[index, : len(rows)] = 1.0
        stacks = (stack_A, stack_router, expert_bias, stack_omega_A, stack_B, stack_omega_B, gather, valid)
        return stacks, [len(groups[name]) for name in names]

    def _add_update(self, session, name: str, x: torch.Tensor, result: torch.Tensor, rows) -> torch.Tensor:
        """``result`` plus adapter ``name``'s update on the batch rows ``rows`` (``None``: all rows; a mixed-adapter
        batch: one gather and one scatter for the adapter's rows)."""
        router = self.router_weight(name) if name in self.mor_router else None
        x_in = self._cast_input_dtype(x if rows is None else x.index_select(0, rows), self.mor_A[name].dtype)
        residual = result if rows is None else result.index_select(0, rows)
        params = (self.mor_A[name], self.mor_B[name], self.mor_omega_A[name], self.mor_omega_B[name], router)
        out, probs = mor_linear(x_in, residual, *params, self.scaling[name], self.mor_dropout[name])
        if session is not None and router is not None:
            mask = session.token_mask
            mask = mask if mask is None or rows is None else mask.index_select(0, rows.to(mask.device))
            session.record(RouterRecord(self, name, probs, mask=mask, rows=rows))
            out = attach_pending(session, self, name, probs, out)
        return out if rows is None else result.index_copy(0, rows, out.to(result.dtype))

    def __repr__(self) -> str:
        return "mor." + super().__repr__()
