"""Configuration of MoR, Mixture of Ranks (Tang et al., arXiv 2410.13408)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from loramix._tuner.config import LoramixConfig, config_field, document_fields
from loramix._tuner.validation import check_choice, check_int, check_number

ROUTERS = ("softmax", "mean")
BIASES = ("none", "all", "mor_only")


@document_fields
@dataclass
class MoRConfig(LoramixConfig):
    """Configuration of a MoR adapter: one shared LoRA per linear layer, mixed by a per-token router.

    MoR is "MoR: Mixture of Ranks for Low-Rank Adaptation Tuning", Tang et al., arXiv 2410.13408
    (https://arxiv.org/abs/2410.13408). For a targeted linear ``W`` (``d_out x d_in``) the adapted
    layer computes (paper Eq. 11 and 15)::

        G(x) = softmax(W_r x)                                      # N router weights per token
        o    = W x + (lora_alpha / r) * sum_i G_i(x) * Ω_B[i] ⊙ B (Ω_A[i] ⊙ (A x))

    with ``A`` (``r x d_in``) and ``B`` (``d_out x r``) shared by the ``N = num_experts`` experts,
    each expert being its own pair of scaling vectors ``Ω_A[i]`` (``r``) and ``Ω_B[i]`` (``d_out``).
    With the defaults, a fresh adapter equals a zero-initialised LoRA: the model is unchanged. The default
    ``target_modules`` are the feed-forward projections (LLaMA: ``gate_proj``, ``up_proj``, ``down_proj``),
    ``loramix.constants.TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES``.

    Example::

        import loramix
        from peft import get_peft_model

        model = get_peft_model(base_model, loramix.MoRConfig(r=8, num_experts=8, task_type="CAUSAL_LM"))
    """

    PEFT_TYPE_NAME: ClassVar[str] = "MOR"

    num_experts: int = config_field(8, "Number N of rank experts, each a pair of scaling vectors Ω_A[i], Ω_B[i].")
    router: Literal["softmax", "mean"] = config_field(
        "softmax",
        "'softmax': the learnable per-token router softmax(W_r x) of the paper. 'mean': uniform 1/N weights, not "
        "learnable; the mixture is then input-independent and can be merged.",
    )
    router_aux_loss_coef: float = config_field(
        0.0,
        "Weight of the Switch-Transformer balance loss N · Σ_i f_i · p_i (averaged over layers). When > 0, it is "
        "returned as `aux_loss` and, times this weight, added to `loss` whenever labels are given.",
    )
    omega_init_std: float = config_field(
        0.0,
        "With init_weights=True, Ω_A and Ω_B start at 1 + N(0, omega_init_std²) instead of exactly 1. At 1 every "
        "expert is the same function, so the router's gradient is zero at the start; the experts then drift apart "
        "only through each one's own per-token gate weighting (slowly: Ω spread 0.035 after 800 steps in "
        "benchmarks/RESULTS.md §7). Noise makes them differ from the first step; the adapter is still a no-op "
        "at the start (B = 0). With init_weights=False, Ω is random.",
    )
    bias: Literal["none", "all", "mor_only"] = config_field(
        "none", "Which biases to train and save: 'none', 'all' biases of the model, or 'mor_only' (of adapted layers)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # the shared fields; also sets peft_type to PeftType.MOR
        check_int("num_experts", self.num_experts, 1)
        check_choice("router", self.router, ROUTERS)
        check_number("router_aux_loss_coef", self.router_aux_loss_coef, 0.0)
        check_number("omega_init_std", self.omega_init_std, 0.0)
        check_choice("bias", self.bias, BIASES)
        if self.router == "mean" and self.router_aux_loss_coef > 0:
            raise ValueError(
                "`router_aux_loss_coef` must be 0 with router='mean': a uniform router cannot be balanced."
            )
        if self.router == "mean" and self.router_lr_ratio != 1.0:
            raise ValueError("`router_lr_ratio` must be 1 with router='mean': the mean router has no weight to train.")

    @property
    def is_input_independent(self) -> bool:
        """True when G(x) does not depend on x (one expert or the mean router): the adapter can be merged."""
        return self.num_experts == 1 or self.router == "mean"
