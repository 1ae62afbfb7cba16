"""Configuration of MiLoRA: Efficient Mixture of Low-Rank Adaptation (Zhang et al., arXiv 2410.18035).

Not the "minor singular components" MiLoRA (Wang et al., arXiv 2406.09044), which is an
initialisation scheme for LoRA; this one is a prompt-routed mixture of a block's LoRA modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from loramix._tuner.config import LoramixConfig, config_field, document_fields, shared_field
from loramix._tuner.validation import check_choice, check_int, check_number
from loramix.milora.functional import ACTIVATIONS, POOLERS

ROUTER_INPUTS = ("normalized", "residual")


@document_fields
@dataclass
class MiLoRAConfig(LoramixConfig):
    """Configuration of a MiLoRA adapter: a block's LoRA modules are experts, chosen once per prompt.

    MiLoRA is "MiLoRA: Efficient Mixture of Low-Rank Adaptation for Large Language Models Fine-tuning",
    Zhang et al., Findings of EMNLP 2024, arXiv 2410.18035 (https://arxiv.org/abs/2410.18035); not the
    "minor singular components" MiLoRA of arXiv 2406.09044. Every targeted linear layer of a transformer
    block gets an ordinary LoRA (an *expert*). One router per block reads the block's input hidden states
    ``H`` of the prompt and picks ``top_k`` experts (paper Eq. 2-3)::

        w = Top-k(softmax(g(Pooler(H)) W_r))         # per prompt, per block; N = experts in the block
        o_m = W_m x + w_m · (lora_alpha / r) · B_m A_m x    for a selected module m; W_m x otherwise

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
    normalize_gates: bool = config_field(
        False,
        "False (paper Eq. 3): a selected expert's update is weighted by its router probability p_i (about 1/N at "
        "the start). True: by p_i divided by the sum over the selected experts, so the selected weights sum to 1.",
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
        super().__post_init__()  # the shared fields; also sets peft_type to PeftType.MILORA
        check_int("top_k", self.top_k, 1)
        check_choice("normalize_gates", self.normalize_gates, (True, False))
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
