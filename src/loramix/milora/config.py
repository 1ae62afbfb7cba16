"""Configuration of MiLoRA: Efficient Mixture of Low-Rank Adaptation (Zhang et al., arXiv 2410.18035).

Not the "minor singular components" MiLoRA (Wang et al., arXiv 2406.09044), which is an
initialisation scheme for LoRA; this one is a prompt-routed mixture of a block's LoRA modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .._config_base import LoramixConfig
from .._validation import check_choice, check_int, check_layers_to_transform, check_number
from .functional import ACTIVATIONS, POOLERS

ROUTER_INPUTS = ("normalized", "residual")


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
    leaves the model's outputs unchanged.

    Args:
        r (`int`, defaults to 32):
            Rank of every LoRA expert.
        lora_alpha (`float`, defaults to 64):
            LoRA scaling: each expert's update is multiplied by ``lora_alpha / r``.
        lora_dropout (`float`, defaults to 0.05):
            Dropout probability on the input of each expert's ``A``.
        target_modules (`list[str]` or `str`, *optional*):
            Names (suffix match) or a regex of the ``nn.Linear`` modules that become experts. Default: every
            projection of a block (LLaMA: ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``), see
            ``loramix.constants.TRANSFORMERS_MODELS_TO_BLOCK_TARGET_MODULES``.
        exclude_modules (`list[str]` or `str`, *optional*):
            Names or a regex of modules not to adapt, even if they match ``target_modules``.
        top_k (`int`, defaults to 3):
            Experts selected per prompt in each block (the paper: 3 of 7); at most the experts of every block.
        normalize_gates (`bool`, defaults to `False`):
            ``False`` (paper Eq. 3): a selected expert's update is weighted by its router probability ``p_i``
            (about ``1/N`` at the start). ``True``: by ``p_i`` divided by the sum over the selected experts.
        pooler (`str`, defaults to `"attention"`):
            How the router summarises the prompt: ``"attention"`` (learnable attention pooling, paper Appendix C;
            starts as mean pooling), ``"mean"``, ``"last"`` (last prompt token), ``"max"``. Padding never enters it.
        router_input (`str`, defaults to `"normalized"`):
            ``"normalized"``: pool the block's input after its input norm (what its projections see).
            ``"residual"``: pool the raw residual stream (the paper's ``H`` read literally), whose large activations
            in real LLMs saturate the router softmax.
        activation (`str`, defaults to `"rational"`):
            Activation ``g`` between pooler and router: ``"rational"`` (learnable, paper Eq. 6, initialised to fit
            GeLU), ``"gelu"``, ``"relu"``, ``"identity"``.
        rational_order (`tuple[int, int]`, defaults to `(6, 5)`):
            Orders ``(m, n)`` of the numerator and denominator of the rational activation.
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the Switch balance loss over the prompts of the batch (per block, averaged over blocks).
            Always returned as ``aux_loss``; added to ``loss`` whenever labels are given.
        use_dora (`bool`, defaults to `False`):
            MiDoRA: weight-decomposed (DoRA) experts.
        init_weights (`bool`, defaults to `True`):
            ``True``: ``A`` kaiming-uniform, ``B`` zero (a fresh adapter is a no-op), router ``N(0, 0.02)``,
            attention-pool query zero, rational = GeLU fit. ``False``: ``B``, router and query random too.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only adapt (and route) the transformer blocks with these indices.
        layers_pattern (`list[str]` or `str`, *optional*):
            Name of the module list holding the blocks (e.g. ``"layers"``); only with ``layers_to_transform``.
        modules_to_save (`list[str]`, *optional*):
            Modules besides the adapter to train fully and save with it (e.g. a classification head).
        router_anchor (`str`, *optional*):
            The module of every block that the router wraps (it must run before the block's projections): the router
            pools its output (``"normalized"``) or its input (``"residual"``). Default per architecture (LLaMA: ``"input_layernorm"``), see
            ``loramix.constants.TRANSFORMERS_MODELS_TO_MILORA_ROUTER_ANCHOR``.
        loramix_format (`int`), weights_sha256 (`str`, *optional*):
            Set automatically when saving (adapter format version, hash of the saved weights); see
            ``loramix._config_base.LoramixConfig``.

    Example::

        import loramix
        from peft import get_peft_model

        model = get_peft_model(base_model, loramix.MiLoRAConfig(r=32, top_k=3, task_type="CAUSAL_LM"))
    """

    PEFT_TYPE_NAME: ClassVar[str] = "MILORA"

    r: int = field(default=32, metadata={"help": "Rank of every LoRA expert."})
    lora_alpha: float = field(
        default=64, metadata={"help": "LoRA scaling: each update is multiplied by lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the input of each expert's A."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Names (suffix match) or a regex of the nn.Linear modules that become experts. Default: every projection "
                "of a block (LLaMA: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), see "
                "loramix.constants.TRANSFORMERS_MODELS_TO_BLOCK_TARGET_MODULES."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt, even if they match."}
    )
    top_k: int = field(default=3, metadata={"help": "Experts selected per prompt in each block (paper: 3 of 7)."})
    normalize_gates: bool = field(
        default=False,
        metadata={
            "help": (
                "False (paper Eq. 3): a selected expert is weighted by its softmax probability p_i. True: by "
                "p_i / (sum of the selected p_j), so the selected weights sum to 1."
            )
        },
    )
    pooler: Literal["attention", "mean", "last", "max"] = field(
        default="attention",
        metadata={
            "help": (
                "How the router summarises the prompt's hidden states: 'attention' (learnable self-attention pooling, "
                "paper Appendix C; starts as mean pooling), 'mean', 'last' (last prompt token), 'max'. Padding never "
                "enters a pool."
            )
        },
    )
    router_input: Literal["normalized", "residual"] = field(
        default="normalized",
        metadata={
            "help": (
                "What the router pools: 'normalized', the block's input hidden states after the block's input norm "
                "(the output of `router_anchor`, what the block's projections see); or 'residual', the raw residual "
                "stream entering the block (the paper's H^l read literally). Real LLMs carry massive activations in "
                "the residual stream (up to ~2.5e4 in SmolLM2-135M) that saturate the router softmax, so the default "
                "is 'normalized'."
            )
        },
    )
    activation: Literal["rational", "gelu", "relu", "identity"] = field(
        default="rational",
        metadata={
            "help": (
                "Activation g between pooler and router: 'rational' (learnable, paper Eq. 6, initialised to fit GeLU), "
                "'gelu', 'relu', 'identity'."
            )
        },
    )
    rational_order: tuple[int, int] = field(
        default=(6, 5), metadata={"help": "Orders (m, n) of the numerator and denominator of the rational activation."}
    )
    router_aux_loss_coef: float = field(
        default=1e-2,
        metadata={
            "help": (
                "Weight of the Switch load-balancing loss N · Σ_i f_i · p̂_i over the prompts of the batch (per block, "
                "averaged over blocks). Always returned as `aux_loss`; added to `loss` whenever labels are given."
            )
        },
    )
    use_dora: bool = field(default=False, metadata={"help": "MiDoRA: weight-decomposed (DoRA) experts."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: A kaiming-uniform, B zero (a fresh adapter is a no-op), router normal(0, 0.02), attention-pool "
                "query zero, rational = GeLU fit. False: B, router and query random too (for tests and debugging)."
            )
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt (and route) the transformer blocks with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the module list holding the blocks, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapter to train fully and save (e.g. a classifier)."}
    )
    router_anchor: str | None = field(
        default=None,
        metadata={
            "help": (
                "Name of the module of every block whose input is the block's input hidden states and that runs before "
                "the block's projections; the router wraps it. Default per architecture (LLaMA family: "
                "'input_layernorm'), see loramix.constants.TRANSFORMERS_MODELS_TO_MILORA_ROUTER_ANCHOR."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # also sets peft_type to PeftType.MILORA
        check_int("r", self.r, 1)
        check_number("lora_alpha", self.lora_alpha, 0.0)
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0, open_max=True)
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
        check_choice("init_weights", self.init_weights, (True, False))
        check_layers_to_transform(self.layers_to_transform, self.layers_pattern)
        if self.router_anchor is not None and (not isinstance(self.router_anchor, str) or not self.router_anchor):
            raise ValueError(
                f"`router_anchor` must be a module name such as 'input_layernorm', got {self.router_anchor!r}."
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``lora_alpha / r`` of every expert."""
        return self.lora_alpha / self.r
