"""Configuration of MiLoRA: Efficient Mixture of Low-Rank Adaptation (Zhang et al., arXiv 2410.18035).

Not the "minor singular components" MiLoRA (Wang et al., arXiv 2406.09044), which is an
initialisation scheme for LoRA; this one is a prompt-routed mixture of a block's LoRA modules.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from loramix._tuner.config import LORAMIX_FORMAT, LoramixConfig, config_field, document_fields, shared_field
from loramix._tuner.validation import check_choice, check_int, check_number
from loramix.milora.functional import ACTIVATIONS, GATE_FORMS, POOLERS

ROUTER_INPUTS = ("normalized", "residual")
# What `gate_form` is when a config gives neither it nor `normalize_gates`: from adapter format 2 on the default
# below; adapter_config.json files of format 1 (loramix 0.1) had no gate_form and meant the paper's gates.
DEFAULT_GATE_FORM = "unit_mean"
# The gate forms an adapter format 1 file can express, through its boolean `normalize_gates`.
LEGACY_GATE_FORMS = {False: "probability", True: "normalized"}


def resolve_gate_form(gate_form: Any, normalize_gates: Any, loramix_format: Any) -> str:
    """The gate form meant by a config's (or an ``adapter_config.json``'s) three fields.

    ``gate_form`` wins when given; ``normalize_gates`` (the pre-0.2 field) maps to ``"normalized"`` / ``"probability"``
    and must agree with ``gate_form`` when both are given. With neither, a format 1 adapter meant the paper's
    gates (``"probability"``, loramix 0.1's default), anything newer :data:`DEFAULT_GATE_FORM`. Used by
    :class:`MiLoRAConfig` and by the vLLM conversion, so both read a file the same way.
    """
    if normalize_gates is not None:
        check_choice("normalize_gates", normalize_gates, (True, False))
        legacy = LEGACY_GATE_FORMS[normalize_gates]
        if gate_form is not None and gate_form != legacy:
            raise ValueError(
                f"`normalize_gates`={normalize_gates} means `gate_form`={legacy!r}, but `gate_form`={gate_form!r} was "
                "given too. Set only `gate_form` (`normalize_gates` is deprecated)."
            )
        return legacy
    if gate_form is None:
        return LEGACY_GATE_FORMS[False] if isinstance(loramix_format, int) and loramix_format < 2 else DEFAULT_GATE_FORM
    check_choice("gate_form", gate_form, GATE_FORMS)
    return gate_form


@document_fields
@dataclass
class MiLoRAConfig(LoramixConfig):
    """Configuration of a MiLoRA adapter: a block's LoRA modules are experts, chosen once per prompt.

    MiLoRA is "MiLoRA: Efficient Mixture of Low-Rank Adaptation for Large Language Models Fine-tuning",
    Zhang et al., Findings of EMNLP 2024, arXiv 2410.18035 (https://arxiv.org/abs/2410.18035); not the
    "minor singular components" MiLoRA of arXiv 2406.09044. Every targeted linear layer of a transformer
    block gets an ordinary LoRA (an *expert*). One router per block reads the block's input hidden states
    ``H`` of the prompt and picks ``top_k`` experts (paper Eq. 2-3)::

        p = softmax(g(Pooler(H)) W_r)               # per prompt, per block; N = experts in the block
        w = Top-k(p)                                 # gate_form: k·p_i/S (default), p_i/S or p_i (Eq. 3 as written)
        o_m = W_m x + w_m · (lora_alpha / r) · B_m A_m x    for a selected module m; W_m x otherwise

    (``S``: the sum of the selected ``p_i``; with the default gates a uniformly routed expert starts at LoRA's scale.)
    Routing is computed on the prompt and reused for every generated token (KV cache stays on).
    ``use_dora=True`` gives MiDoRA (weight-decomposed experts). A fresh adapter (``init_weights=True``)
    leaves the model's outputs unchanged. The default ``target_modules`` are every projection of a block (LLaMA:
    ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``),
    ``loramix.constants.TRANSFORMERS_MODELS_TO_BLOCK_TARGET_MODULES``; ``layers_to_transform`` also selects the
    blocks that are routed.

    Example::

        import loramix
        from peft import get_peft_model

        model = get_peft_model(base_model, loramix.MiLoRAConfig(r=32, top_k=3, task_type="CAUSAL_LM"))
    """

    PEFT_TYPE_NAME: ClassVar[str] = "MILORA"

    r: int = shared_field("r", 32)
    lora_alpha: float = shared_field("lora_alpha", 64)
    top_k: int = config_field(
        3, "Experts selected per prompt in each block (the paper: 3 of 7); at most the experts of every block."
    )
    gate_form: Literal["unit_mean", "normalized", "probability"] | None = config_field(
        None,
        "What a selected expert's update is multiplied by (p_i its router probability, S the sum over the top_k "
        "selected): 'unit_mean' (the default, unset = None) k·p_i/S, so the selected weights average 1 and each "
        "expert starts at LoRA's scale lora_alpha/r; 'normalized' p_i/S (they sum to 1); 'probability' p_i, the "
        "paper's Eq. 3 as written (about 1/N at the start). The paper does not say how the weights scale an update; "
        "'unit_mean' scored 4-12 points above 'probability' in loramix's capacity benchmark (README, 'Does it pay "
        "off?'). With top_k=1, 'unit_mean' and 'normalized' weights are the constant 1 and only the balance loss "
        "trains the router.",
    )
    normalize_gates: bool | None = config_field(
        None,
        "Deprecated (loramix 0.1), use `gate_form`: True means 'normalized', False 'probability'. Adapters saved with "
        "it load with the gates they were trained with.",
    )
    pooler: Literal["attention", "mean", "last", "max"] = config_field(
        "attention",
        "How the router summarises the prompt's hidden states: 'attention' (learnable self-attention pooling, paper "
        "Appendix C; starts as mean pooling), 'mean', 'last' (last prompt token), 'max'. Padding never enters a pool.",
    )
    router_input: Literal["normalized", "residual"] = config_field(
        "normalized",
        "What the router pools: 'normalized', the block's input hidden states after the block's input norm (the "
        "output of `router_anchor`, what the block's projections see); or 'residual', the raw residual stream "
        "entering the block (the paper's H^l read literally). Real LLMs carry massive activations in the residual "
        "stream (up to ~2.5e4 in SmolLM2-135M) that saturate the router softmax, so the default is 'normalized'.",
    )
    activation: Literal["rational", "gelu", "relu", "identity"] = config_field(
        "rational",
        "Activation g between pooler and router: 'rational' (learnable, paper Eq. 6, initialised to fit GeLU), "
        "'gelu', 'relu', 'identity'.",
    )
    rational_order: tuple[int, int] = config_field(
        (6, 5), "Orders (m, n) of the numerator and denominator of the rational activation."
    )
    router_aux_loss_coef: float = config_field(
        1e-2,
        "Weight of the Switch load-balancing loss N · Σ_i f_i · p̂_i over the prompts of the batch (per block, "
        "averaged over blocks). Always returned as `aux_loss`; added to `loss` whenever labels are given.",
    )
    use_dora: bool = config_field(False, "MiDoRA: weight-decomposed (DoRA) experts.")
    router_anchor: str | None = config_field(
        None,
        "Name of the module of every block whose input is the block's input hidden states and that runs before the "
        "block's projections; the router wraps it and pools its output ('normalized') or its input ('residual'). "
        "Default per architecture (LLaMA family: 'input_layernorm'), see "
        "loramix.constants.TRANSFORMERS_MODELS_TO_MILORA_ROUTER_ANCHOR.",
    )

    def __post_init__(self) -> None:
        saved_format = self.loramix_format  # the file's: format 1 files mean the paper's gates when they name none
        super().__post_init__()  # the shared fields (checks saved_format); sets peft_type to PeftType.MILORA
        check_int("top_k", self.top_k, 1)
        legacy_field = self.normalize_gates
        self.gate_form = resolve_gate_form(self.gate_form, legacy_field, saved_format)
        self.normalize_gates = None  # folded into gate_form; saved again only in a format 1 file (to_saved_dict)
        object.__setattr__(self, "_gate_form_resolved", True)
        if legacy_field is not None and saved_format >= 2:  # a format 1 file holds it: no warning then
            warnings.warn(
                f"`normalize_gates` is deprecated and will be removed in loramix 0.3: use `gate_form={self.gate_form!r}`.",
                FutureWarning,
                stacklevel=3,
            )
        if self.top_k == 1 and self.gate_form != "probability" and not self.inference_mode:
            warnings.warn(
                f"With top_k=1 and gate_form={self.gate_form!r} the selected expert's weight is always 1, so the "
                "language-model loss does not train the routers (only the balance loss does). "
                "gate_form='probability' lets it.",
                UserWarning,
                stacklevel=3,
            )
        check_choice("pooler", self.pooler, POOLERS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("router_input", self.router_input, ROUTER_INPUTS)
        if not isinstance(self.rational_order, (list, tuple)) or len(self.rational_order) != 2:
            raise ValueError(f"`rational_order` must be a pair (m, n), got {self.rational_order!r}.")
        check_int("rational_order", self.rational_order[0], 1)
        check_int("rational_order", self.rational_order[1], 1)
        self.rational_order = tuple(self.rational_order)  # a list after a JSON round trip
        check_number("router_aux_loss_coef", self.router_aux_loss_coef, 0.0)
        check_choice("use_dora", self.use_dora, (True, False))
        if self.router_anchor is not None and (not isinstance(self.router_anchor, str) or not self.router_anchor):
            raise ValueError(
                f"`router_anchor` must be a module name such as 'input_layernorm', got {self.router_anchor!r}."
            )

    def __setattr__(self, name: str, value: Any) -> None:
        # `config.normalize_gates = True` on a built config (loramix 0.1 code) sets the gate form it means
        if name == "normalize_gates" and value is not None and getattr(self, "_gate_form_resolved", False):
            form = resolve_gate_form(None, value, LORAMIX_FORMAT)
            warnings.warn(
                f"`normalize_gates` is deprecated and will be removed in loramix 0.3: use `gate_form={form!r}`.",
                FutureWarning,
                stacklevel=2,
            )
            name, value = "gate_form", form
        super().__setattr__(name, value)

    def adapter_format(self) -> int:
        """Format 1 (loramix 0.1 reads it) can hold only the gate forms of its ``normalize_gates``."""
        return max(super().adapter_format(), 1 if self.gate_form in LEGACY_GATE_FORMS.values() else 2)

    def to_saved_dict(self) -> dict[str, Any]:
        """A format 1 file holds the gate form as loramix 0.1's ``normalize_gates``, a newer one as ``gate_form``."""
        output = super().to_saved_dict()
        if output["loramix_format"] < 2:
            output["normalize_gates"] = self.gate_form == "normalized"
            del output["gate_form"]
        else:
            del output["normalize_gates"]
        return output
