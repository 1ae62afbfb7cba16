"""Configuration of MoR, Mixture of Ranks (Tang et al., arXiv 2410.13408)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .._config_base import LoramixConfig
from .._validation import check_choice, check_int, check_layers_to_transform, check_number

ROUTERS = ("softmax", "mean")
BIASES = ("none", "all", "mor_only")


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
    With the defaults, a fresh adapter equals a zero-initialised LoRA: the model is unchanged.

    Args:
        r (`int`, defaults to 8):
            Rank of the shared LoRA matrices ``A`` and ``B``.
        lora_alpha (`float`, defaults to 32):
            LoRA scaling: the mixture is multiplied by ``lora_alpha / r``.
        lora_dropout (`float`, defaults to 0.05):
            Dropout probability on the input of ``A`` (the router sees the input without dropout).
        num_experts (`int`, defaults to 8):
            Number ``N`` of rank experts, each a pair of scaling vectors ``Ω_A[i]``, ``Ω_B[i]``.
        target_modules (`list[str]` or `str`, *optional*):
            Names (suffix match) or a regex of the ``nn.Linear`` modules to adapt. Default: the feed-forward
            projections of the architecture (LLaMA: ``gate_proj``, ``up_proj``, ``down_proj``), see
            ``loramix.constants.TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES``.
        exclude_modules (`list[str]` or `str`, *optional*):
            Names or a regex of modules not to adapt, even if they match ``target_modules``.
        router (`str`, defaults to `"softmax"`):
            ``"softmax"``: the learnable per-token router ``softmax(W_r x)`` of the paper. ``"mean"``: uniform
            ``1/N`` weights, not learnable; the mixture is then input-independent and can be merged.
        router_aux_loss_coef (`float`, defaults to 0.0):
            Weight of the Switch-Transformer balance loss ``N · Σ_i f_i · p_i`` (averaged over layers). When > 0,
            it is returned as ``aux_loss`` and, times this weight, added to ``loss`` whenever labels are given.
        init_weights (`bool`, defaults to `True`):
            ``True``: ``A`` kaiming-uniform, ``B`` zero, ``Ω`` ones, router ``N(0, 0.02)``: a fresh adapter is a
            no-op. ``False``: ``B`` and ``Ω`` random too (non-trivial outputs, for tests and debugging).
        omega_init_std (`float`, defaults to 0.0):
            With ``init_weights=True``: ``Ω_A`` and ``Ω_B`` start at ``1 + N(0, omega_init_std²)`` instead of exactly
            1. At 1 every expert is the same function, so the router's gradient is zero and (with Adam) the experts
            receive identical updates: they never become different. Noise breaks that symmetry; the adapter is
            still a no-op at the start (``B = 0``).
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only adapt the transformer blocks with these indices.
        layers_pattern (`list[str]` or `str`, *optional*):
            Name of the module list holding the blocks (e.g. ``"layers"``); only with ``layers_to_transform``.
        modules_to_save (`list[str]`, *optional*):
            Modules besides the adapter to train fully and save with it (e.g. a classification head).
        bias (`str`, defaults to `"none"`):
            Which biases to train and save: ``"none"``, ``"all"`` biases of the model, or ``"mor_only"`` (the
            biases of the adapted layers).
        loramix_format (`int`), weights_sha256 (`str`, *optional*):
            Set automatically when saving (adapter format version, hash of the saved weights); see
            ``loramix._config_base.LoramixConfig``.

    Example::

        import loramix
        from peft import get_peft_model

        model = get_peft_model(base_model, loramix.MoRConfig(r=8, num_experts=8, task_type="CAUSAL_LM"))
    """

    PEFT_TYPE_NAME: ClassVar[str] = "MOR"

    r: int = field(default=8, metadata={"help": "Rank of the shared LoRA matrices A and B."})
    lora_alpha: float = field(
        default=32, metadata={"help": "LoRA scaling: the update is multiplied by lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the input of A (not of the router)."})
    num_experts: int = field(default=8, metadata={"help": "Number N of rank experts (pairs of scaling vectors)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Names (suffix match) or a regex of the nn.Linear modules to adapt. Default: the feed-forward "
                "projections of the architecture (LLaMA: gate_proj, up_proj, down_proj), see "
                "loramix.constants.TRANSFORMERS_MODELS_TO_FFN_TARGET_MODULES."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt, even if they match."}
    )
    router: Literal["softmax", "mean"] = field(
        default="softmax",
        metadata={
            "help": (
                "'softmax': a learnable per-token router softmax(W_r x) (paper default). 'mean': uniform 1/N weights, "
                "not learnable; the mixture is then input-independent and can be merged."
            )
        },
    )
    router_aux_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": (
                "Weight of the Switch-Transformer load-balancing loss N * sum_i f_i * p_i (averaged over layers). "
                "When > 0 it is returned as `aux_loss` and added to the loss whenever labels are given."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: A kaiming-uniform, B zero, Ω ones, router normal(0, 0.02), so a fresh adapter is a no-op. "
                "False: B and Ω random too (non-trivial outputs; for tests and debugging)."
            )
        },
    )
    omega_init_std: float = field(
        default=0.0,
        metadata={
            "help": (
                "With init_weights=True, Ω_A and Ω_B start at 1 + N(0, omega_init_std^2) instead of 1: breaks the "
                "symmetry of identical experts (whose router gets no gradient). B = 0 keeps the start a no-op."
            )
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the transformer blocks with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the module list holding the blocks, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapter to train fully and save (e.g. a classifier)."}
    )
    bias: Literal["none", "all", "mor_only"] = field(
        default="none",
        metadata={"help": "Which biases to train: 'none', 'all' in the model, or 'mor_only' (of adapted layers)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # also sets peft_type to PeftType.MOR
        check_int("r", self.r, 1)
        check_number("lora_alpha", self.lora_alpha, 0.0)
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0, open_max=True)
        check_int("num_experts", self.num_experts, 1)
        check_choice("router", self.router, ROUTERS)
        check_number("router_aux_loss_coef", self.router_aux_loss_coef, 0.0)
        check_choice("init_weights", self.init_weights, (True, False))
        check_number("omega_init_std", self.omega_init_std, 0.0)
        check_choice("bias", self.bias, BIASES)
        check_layers_to_transform(self.layers_to_transform, self.layers_pattern)
        if self.router == "mean" and self.router_aux_loss_coef > 0:
            raise ValueError(
                "`router_aux_loss_coef` must be 0 with router='mean': a uniform router cannot be balanced."
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``lora_alpha / r`` applied to the mixture."""
        return self.lora_alpha / self.r

    @property
    def is_input_independent(self) -> bool:
        """True when G(x) does not depend on x (one expert or the mean router): the adapter can be merged."""
        return self.num_experts == 1 or self.router == "mean"
