"""What every loramix config shares: format versioning, strict loading, crash-safe saving.

PEFT is lenient when loading a config: keys it does not know are dropped with a warning, and
``SomeConfig.from_pretrained`` returns whatever class the file names. For an adapter that took
hours to train, loramix prefers a clear error to a silently different model, so:

* ``loramix_format`` is written into ``adapter_config.json``; a file with a newer format than this
  installation understands is refused, naming the versions (on every loading path).
* Unknown keys are refused by ``MoRConfig/MiLoRAConfig.from_pretrained`` and so by ``PeftModel.from_pretrained``
  and transformers' ``model.load_adapter`` (PEFT's generic ``PeftConfig.from_pretrained`` still drops them with a
  warning: PEFT's forward-compatibility rule).
* ``MiLoRAConfig.from_pretrained`` on a MoR adapter (or vice versa) is refused.
* The config records the SHA-256 of the weights file saved with it, ``adapter_model.safetensors`` or, after
  ``save_pretrained(safe_serialization=False)``, ``adapter_model.bin``. The loaders refuse weights that do not
  belong to the config (modified after saving, or from a save that was interrupted), before reading them.
* ``adapter_config.json`` is written to a temporary file and renamed into place; with the journal of
  ``loramix/_tuner/saving.py`` an interrupted safetensors save leaves the old adapter or the new one (see that module).
* ``adapter_model.bin`` is loaded the way PEFT and transformers load it, ``torch.load(weights_only=True)``,
  which rebuilds tensors and plain containers only and refuses a pickle that would call anything else; the
  hash check above runs first, so a replaced ``.bin`` is refused without being unpickled at all.

A config never touches PEFT's registries: ``import loramix`` registers the methods once
(``loramix/_compat/peft.py``), and a config only looks its ``PeftType`` member up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME
from peft.utils.peft_types import PeftType

from loramix._tuner.saving import atomic_write_bytes, file_sha256, finish_save, resolve_weights, weights_of_this_save
from loramix._tuner.validation import check_choice, check_int, check_layers_to_transform, check_number

# Bump when a saved adapter could not be loaded correctly by an older loramix. Files are written at the oldest
# format that holds them (LoramixConfig.adapter_format), so an adapter that needs nothing new still loads on
# loramix 0.1. Format 2 (loramix 0.2): router_lr_ratio other than 1, MiLoRA's gate_form 'unit_mean'.
LORAMIX_FORMAT = 2


def config_field(default: Any, help: str) -> Any:
    """A config field whose ``help`` is its one documentation (the ``Args:`` of the class docstring is built from
    it by :func:`document_fields`)."""
    return field(default=default, metadata={"help": help})


def shared_field(name: str, default: Any) -> Any:
    """A field of :class:`LoramixConfig` with another default for one method; its help stays the shared one."""
    return config_field(default, LoramixConfig.__dataclass_fields__[name].metadata["help"])


def document_fields(cls: type) -> type:
    """Class decorator: append an ``Args:`` section, built from the fields' help, to the config's docstring (the
    fields of PEFT's own ``PeftConfig`` are documented by PEFT)."""
    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    lines = ["", "    Args:"]
    for f in dataclasses.fields(cls):
        if f.name in peft_fields:
            continue
        default = "*optional*" if f.default is None else f"defaults to `{f.default!r}`"
        lines.append(f"        {f.name} (`{f.type}`, {default}):")
        lines += [f"            {line}" for line in textwrap.wrap(f.metadata.get("help", ""), 104)]
    cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n" + "\n".join(lines) + "\n"
    return cls


@dataclass
class LoramixConfig(PeftConfig):
    """Base of the loramix configs (not used directly): the fields and checks every method shares.

    A method's config subclasses it, adds its own fields (each documented once, by its ``help``) and may give a
    shared field another default with :func:`shared_field`.
    """

    # Name of the method's member of PEFT's ``PeftType`` enum (added by ``import loramix``); set by subclasses.
    PEFT_TYPE_NAME: ClassVar[str] = ""

    r: int = config_field(8, "Rank `r` of the LoRA matrices `A` (r x d_in) and `B` (d_out x r).")
    lora_alpha: float = config_field(32, "LoRA scaling: every update is multiplied by `lora_alpha / r`.")
    lora_dropout: float = config_field(
        0.05, "Dropout probability on the input of `A` (a router sees the input without dropout)."
    )
    target_modules: list[str] | str | None = config_field(
        None,
        "Names (suffix match) or a regex of the `nn.Linear` modules to adapt. Default: the method's modules for the "
        "architecture, from `loramix.constants`.",
    )
    exclude_modules: list[str] | str | None = config_field(
        None, "Names or a regex of modules not to adapt, even if they match `target_modules`."
    )
    layers_to_transform: list[int] | int | None = config_field(
        None, "Only adapt the transformer blocks with these indices."
    )
    layers_pattern: list[str] | str | None = config_field(
        None, "Name of the module list holding the blocks (e.g. 'layers'); only with `layers_to_transform`."
    )
    modules_to_save: list[str] | None = config_field(
        None, "Modules besides the adapter to train fully and save with it (e.g. a classification head)."
    )
    router_lr_ratio: float = config_field(
        1.0,
        "How much faster the router weight W_r learns than the rest of the adapter, with one learning rate for all "
        "(Trainer's default AdamW): W_r is trained as P = W_r / router_lr_ratio, so Adam-type optimizers move W_r "
        "router_lr_ratio times as far per step (plain SGD: its square). Part of the adapter, like lora_alpha: files "
        "hold P, and the saved config's ratio turns it back into W_r. Between 0.01 and 100. "
        "loramix.optim.parameter_groups(router_lr=...) sets P's learning rate on top of this.",
    )
    init_weights: bool = config_field(
        True,
        "True: `A` kaiming-uniform and `B` zero, so a fresh adapter leaves the model unchanged (routers start near "
        "uniform). False: `B` and the routers random too (non-trivial outputs, for tests and debugging).",
    )
    loramix_format: int = config_field(
        LORAMIX_FORMAT,
        "Version of the adapter format; set automatically, do not edit. adapter_config.json holds the oldest format "
        "that holds the adapter (`adapter_format()`, so older loramix versions read what they can); a loaded config "
        "is converted to this installation's format. A config from a newer loramix (a higher number) is refused.",
    )
    weights_sha256: str | None = config_field(
        None,
        "SHA-256 of the weights file (adapter_model.safetensors or .bin) saved with this config; set by "
        "save_pretrained, checked on loading.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = self._registered_peft_type()
        # Checked here, not only in check_kwargs, because PeftConfig.from_pretrained and transformers' loader
        # build the config without calling our check_kwargs.
        if isinstance(self.loramix_format, bool) or not isinstance(self.loramix_format, int):
            raise TypeError(f"`loramix_format` must be an int, got {self.loramix_format!r}.")
        if self.loramix_format > LORAMIX_FORMAT:
            raise ValueError(
                f"This adapter was saved by a newer loramix (adapter format {self.loramix_format}; this installation "
                f"reads format {LORAMIX_FORMAT}). Upgrade loramix: `pip install -U loramix`."
            )
        check_int("r", self.r, 1)
        check_number("lora_alpha", self.lora_alpha, 0.0)
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0, open_max=True)
        check_number("router_lr_ratio", self.router_lr_ratio, 0.01, 100.0)
        check_choice("init_weights", self.init_weights, (True, False))
        check_layers_to_transform(self.layers_to_transform, self.layers_pattern)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        # Read: in memory every config is of this installation's format (a subclass that reads an older file
        # differently takes the saved number before calling this); save_pretrained writes adapter_format().
        self.loramix_format = LORAMIX_FORMAT

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``lora_alpha / r``."""
        return self.lora_alpha / self.r

    @classmethod
    def _registered_peft_type(cls) -> PeftType:
        """The method's ``PeftType`` member. Only looked up: ``import loramix`` added it (``loramix/_compat/peft.py``)."""
        if not cls.PEFT_TYPE_NAME:
            raise TypeError(f"{cls.__name__} is a base class; use MoRConfig, MiLoRAConfig or PeftConfig.")
        member = PeftType.__members__.get(cls.PEFT_TYPE_NAME)
        if member is None:
            raise RuntimeError(
                f"PEFT does not know the method {cls.PEFT_TYPE_NAME}: `import loramix` registers it, and the "
                "registration was removed or never ran in this process."
            )
        return member

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Validate a loaded ``adapter_config.json`` before the config is built (called by from_pretrained)."""
        saved_type = str(kwargs.get("peft_type", ""))
        own_type = cls.PEFT_TYPE_NAME
        if saved_type and saved_type != own_type:
            raise ValueError(
                f"This adapter_config.json describes a {saved_type} adapter, not {own_type}: load it with "
                f"PeftConfig.from_pretrained / PeftModel.from_pretrained, which pick the right class."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"adapter_config.json has keys that {cls.__name__} does not know: {unknown}. It was probably written "
                "by a newer loramix or edited by hand; loading it would silently ignore them."
            )
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load the config and, for a local adapter, check that the weights beside it belong to it.

        After an interrupted save this restores the complete adapter that the config belongs to (with a
        warning); weights that belong to no config are refused (see ``loramix/_tuner/saving.py``).
        """
        if not cls.PEFT_TYPE_NAME:
            raise TypeError(f"{cls.__name__} is a base class; use MoRConfig, MiLoRAConfig or PeftConfig.")
        if kwargs.get("peft_type") not in (None, cls.PEFT_TYPE_NAME):
            raise ValueError(f"peft_type={kwargs['peft_type']!r} does not match {cls.__name__}.")
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(directory):  # a Hub id: the files are downloaded later, by PEFT
            resolve_weights(directory, config.weights_sha256)
        return config

    def adapter_format(self) -> int:
        """The oldest adapter format that holds this config exactly (what ``save_pretrained`` writes): 1 unless a
        field needs loramix 0.2. loramix 0.1 reads format 1 and refuses newer files on every PEFT and transformers
        loading path (its vLLM plugin does not check the format)."""
        return 1 if self.router_lr_ratio == 1.0 else 2

    def to_saved_dict(self) -> dict[str, Any]:
        """The fields as ``adapter_config.json`` holds them, at format :meth:`adapter_format`."""
        output = self.to_dict()
        output["loramix_format"] = self.adapter_format()
        if output.get("router_lr_ratio") == 1.0:  # the default: left out, so loramix 0.1 still reads the file
            del output["router_lr_ratio"]
        return output

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` atomically, recording the hash of the weights saved beside it."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        weights = weights_of_this_save(save_directory)
        self.weights_sha256 = file_sha256(weights) if weights is not None else None
        output = self.to_saved_dict()
        for key, value in output.items():
            if isinstance(value, set):
                output[key] = sorted(value)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        text = json.dumps(output, indent=2, sort_keys=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode())
        # The new pair is complete: the journal and weights left by an earlier save are no longer needed.
        finish_save(save_directory, weights)
