"""What every loramix config shares: format versioning, strict loading, atomic saving.

PEFT is lenient when loading a config: keys it does not know are dropped with a warning, and
``SomeConfig.from_pretrained`` returns whatever class the file names. For an adapter that took
hours to train, loramix prefers a clear error to a silently different model, so:

* ``loramix_format`` is written into ``adapter_config.json``; a file with a newer format than this
  installation understands is refused, naming the versions (on every loading path).
* Unknown keys are refused by ``MoRConfig/MiLoRAConfig.from_pretrained`` and so by ``PeftModel.from_pretrained``
  (PEFT's generic ``PeftConfig.from_pretrained`` still drops them with a warning: PEFT's forward-compatibility rule).
* ``MiLoRAConfig.from_pretrained`` on a MoR adapter (or vice versa) is refused.
* The config records the SHA-256 of the ``adapter_model.safetensors`` saved with it; PEFT's loaders
  (which call ``<Config>.from_pretrained``) refuse weights that do not belong to the config, e.g. after
  a save that was killed between writing the weights and the config.
* ``adapter_config.json`` is written to a temporary file and renamed into place; with the crash-safe
  weight writer of ``_registration.py`` an interrupted save leaves the old adapter or the new one.
* A directory with only ``adapter_model.bin`` is refused: loramix never unpickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

# Bump when a saved adapter could not be loaded correctly by an older loramix.
LORAMIX_FORMAT = 1
# The weights of the previous save, kept while a new save is under way (see _registration.py).
PREVIOUS_WEIGHTS_NAME = ".adapter_model.previous.safetensors"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class LoramixConfig(PeftConfig):
    """Base of the loramix configs (not used directly)."""

    loramix_format: int = field(
        default=LORAMIX_FORMAT, metadata={"help": "Adapter format version; set automatically, do not edit."}
    )
    weights_sha256: str | None = field(
        default=None,
        metadata={"help": "SHA-256 of the adapter_model.safetensors saved with this config; set by save_pretrained."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Checked here, not only in check_kwargs, because PeftConfig.from_pretrained and transformers' loader
        # build the config without calling our check_kwargs.
        if isinstance(self.loramix_format, bool) or not isinstance(self.loramix_format, int):
            raise TypeError(f"`loramix_format` must be an int, got {self.loramix_format!r}.")
        if self.loramix_format > LORAMIX_FORMAT:
            raise ValueError(
                f"This adapter was saved by a newer loramix (adapter format {self.loramix_format}; this installation "
                f"reads format {LORAMIX_FORMAT}). Upgrade loramix: `pip install -U loramix`."
            )

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Validate a loaded ``adapter_config.json`` before the config is built (called by from_pretrained)."""
        saved_type = str(kwargs.get("peft_type", ""))
        own_type = cls.__name__.removesuffix("Config").upper()
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
        """Load the config and, for a local adapter, check that the weights beside it belong to it."""
        if cls is LoramixConfig:
            raise TypeError("LoramixConfig is a base class; use MoRConfig, MiLoRAConfig or PeftConfig.")
        if kwargs.get("peft_type") not in (None, cls.__name__.removesuffix("Config").upper()):
            raise ValueError(f"peft_type={kwargs['peft_type']!r} does not match {cls.__name__}.")
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isdir(directory) and not os.path.isfile(weights):
            if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
                raise ValueError(
                    f"{directory} holds {WEIGHTS_NAME} (a pickle) but no {SAFETENSORS_WEIGHTS_NAME}. loramix loads "
                    "safetensors only, because unpickling can run arbitrary code; re-save the adapter with "
                    "safe_serialization=True."
                )
            if config.weights_sha256:  # saved by save_pretrained together with weights, which are gone
                raise FileNotFoundError(f"{weights} is missing: {CONFIG_NAME} was saved with weights beside it.")
        if config.weights_sha256 and os.path.isfile(weights) and file_sha256(weights) != config.weights_sha256:
            previous = os.path.join(directory, PREVIOUS_WEIGHTS_NAME)
            if os.path.isfile(previous) and file_sha256(previous) == config.weights_sha256:
                # A save was killed after the new weights but before the new config: roll back to the old pair.
                os.replace(previous, weights)
                warnings.warn(
                    f"An interrupted save_pretrained left new weights next to the old config in {directory}; "
                    "restored the previous, complete adapter.",
                    stacklevel=2,
                )
                return config
            raise ValueError(
                f"{weights} does not belong to {os.path.join(directory, CONFIG_NAME)} (SHA-256 mismatch). The adapter "
                "was modified after saving, or a save into this directory was interrupted between the weights and "
                "the config. Save the adapter again."
            )
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` atomically, recording the hash of the weights saved beside it."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        weights = os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
        self.weights_sha256 = file_sha256(weights) if os.path.isfile(weights) else None
        output = self.to_dict()
        for key, value in output.items():
            if isinstance(value, set):
                output[key] = sorted(value)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        text = json.dumps(output, indent=2, sort_keys=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode())
        # The new pair is complete: the journal copy of the previous weights is no longer needed.
        previous = os.path.join(save_directory, PREVIOUS_WEIGHTS_NAME)
        if os.path.isfile(previous):
            os.unlink(previous)
