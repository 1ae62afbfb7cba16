"""How a loramix adapter directory is written and checked, so that a crash never leaves a mixed adapter.

A saved adapter is ``adapter_config.json`` plus one weights file, ``adapter_model.safetensors``
(the default) or ``adapter_model.bin`` (``save_pretrained(safe_serialization=False)``). The config
records the SHA-256 of the weights file saved with it (``weights_sha256``), and every loramix load
path checks it, so weights and config from different saves are never combined silently.

The order of a save (``PeftModel.save_pretrained`` writes the weights, then the config):

1. safetensors: :func:`write_adapter_safetensors` keeps the current weights as a journal
   (``PREVIOUS_WEIGHTS_NAME``, a hard link where the filesystem allows, else a copy) and writes the new
   ones to a temporary file renamed over the old one. ``adapter_model.bin`` is written by PEFT itself
   with ``torch.save``, in place and without a journal.
2. ``LoramixConfig.save_pretrained`` asks :func:`weights_of_this_save` which weights file it belongs
   to, records its hash, writes the config atomically, then :func:`finish_save` removes the journal and
   a weights file of the other format left by an earlier save.

A process killed at any point therefore leaves a directory that :func:`resolve_weights` turns back into
one complete adapter when it is next loaded: the file PEFT would load is the one whose hash the config
records; if not, the journal or the other-format file that matches the config is restored (with a
warning), and if none matches the load is refused. The one case that cannot be rolled back is a
``.bin`` save killed while ``torch.save`` was overwriting the previous ``.bin``: that file is then
incomplete, and loading it is refused (hash mismatch) instead of loading a damaged adapter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
import zipfile

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

# The weights of the previous save, kept while a new safetensors save is under way.
PREVIOUS_WEIGHTS_NAME = ".adapter_model.previous.safetensors"

# adapter_model.safetensors files this process has written and no config has claimed yet (absolute paths).
_unclaimed_writes: set[str] = set()


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


def _keep_as_journal(path: str) -> None:
    """Make ``PREVIOUS_WEIGHTS_NAME`` beside ``path`` hold the current content of ``path``."""
    journal = os.path.join(os.path.dirname(path), PREVIOUS_WEIGHTS_NAME)
    tmp = journal + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        # The new weights replace `path` by a rename (a new file), so a hard link keeps the old bytes for free.
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, tmp)
    os.replace(tmp, journal)


def write_adapter_safetensors(tensors: dict, filename: str, metadata: dict[str, str] | None = None) -> None:
    """Write a loramix adapter's ``adapter_model.safetensors`` crash-safely (step 1 of the module docstring)."""
    filename = os.path.abspath(filename)
    if os.path.isfile(filename):
        _keep_as_journal(filename)
    atomic_write_bytes(filename, safetensors_bytes(tensors, metadata=metadata))
    _unclaimed_writes.add(filename)


def weights_of_this_save(directory: str) -> str | None:
    """The weights file that the config being saved into ``directory`` belongs to, or None if there is none.

    Normally one weights file is there, the one just written. When both formats are there, the other one
    was left by an earlier save in the other format: the newer file is this save's (on equal modification
    times, the safetensors file if this process wrote it and no config has claimed it yet, else the .bin).
    """
    safetensors_path = os.path.abspath(os.path.join(directory, SAFETENSORS_WEIGHTS_NAME))
    bin_path = os.path.abspath(os.path.join(directory, WEIGHTS_NAME))
    written_here = safetensors_path in _unclaimed_writes
    _unclaimed_writes.discard(safetensors_path)
    has_safetensors, has_bin = os.path.isfile(safetensors_path), os.path.isfile(bin_path)
    if has_safetensors and has_bin:
        safetensors_time = os.stat(safetensors_path).st_mtime_ns
        bin_time = os.stat(bin_path).st_mtime_ns
        if safetensors_time > bin_time or (safetensors_time == bin_time and written_here):
            return safetensors_path
        return bin_path
    if has_safetensors:
        return safetensors_path
    return bin_path if has_bin else None


def finish_save(directory: str, weights: str | None) -> None:
    """After the config is in place: drop the journal, a weights file of the other format (step 2), and the
    temporary files of saves that were killed while writing."""
    journal = os.path.join(directory, PREVIOUS_WEIGHTS_NAME)
    stale = [journal, journal + ".tmp"]
    if weights is not None:
        other = WEIGHTS_NAME if os.path.basename(weights) == SAFETENSORS_WEIGHTS_NAME else SAFETENSORS_WEIGHTS_NAME
        stale.append(os.path.join(directory, other))
    stale += [
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.startswith(".tmp-") and name.endswith(("-" + SAFETENSORS_WEIGHTS_NAME, "-" + CONFIG_NAME))
    ]
    for path in stale:
        if os.path.isfile(path):
            os.unlink(path)


def check_readable(path: str) -> None:
    """Raise ``ValueError`` naming ``path`` if it is not a complete weights file, before anything is loaded.

    For a config with no ``weights_sha256`` (written by hand or by another tool) this is the only check: a
    truncated or overwritten ``adapter_model.safetensors`` would otherwise surface as safetensors' own error,
    which names no file. safetensors checks the header and that the tensors' offsets cover the file exactly; a
    ``.bin`` is a zip archive whose every member's CRC is checked (the unpickling itself happens in PEFT, with
    ``weights_only=True``).
    """
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"member {bad!r} fails its CRC check")
        else:
            with open(path, "rb") as handle:
                if handle.read(1) != b"\x80":  # torch's legacy (pre-zip) format is a pickle: protocol opcode first
                    raise ValueError("neither a zip archive (torch.save) nor a legacy torch pickle")
    except Exception as error:  # safetensors raises its own SafetensorError, zipfile BadZipFile, ...
        raise ValueError(
            f"The adapter weights file {path} is damaged or not a weights file ({type(error).__name__}: {error}); "
            "nothing was loaded. Save the adapter again, or restore the file."
        ) from error


def resolve_weights(directory: str, weights_sha256: str | None) -> str | None:
    """Check, before PEFT loads them, that the weights PEFT will pick in ``directory`` belong to the config.

    PEFT and transformers load ``adapter_model.safetensors`` if present, else ``adapter_model.bin``. If that
    file does not have the hash the config records, the directory was left by an interrupted save: the file
    that does (the journal, or the file of the other format) is made the one PEFT picks, with a warning.
    Returns the path of the weights file PEFT will load; raises if no file belongs to the config.
    """
    safetensors_path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    bin_path = os.path.join(directory, WEIGHTS_NAME)
    journal = os.path.join(directory, PREVIOUS_WEIGHTS_NAME)
    picked = next((p for p in (safetensors_path, bin_path) if os.path.isfile(p)), None)
    if weights_sha256 is None:  # a config saved alone, or written by hand / another tool: no hash to check
        if picked is not None:
            check_readable(picked)
        return picked

    def belongs(path: str) -> bool:
        return os.path.isfile(path) and file_sha256(path) == weights_sha256

    if picked is not None and belongs(picked):
        return picked
    interrupted = (
        f"An interrupted save_pretrained left weights in {directory} that do not belong to its {CONFIG_NAME}; "
    )
    if belongs(journal):
        os.replace(journal, safetensors_path)
        warnings.warn(interrupted + "restored the previous, complete adapter.", stacklevel=3)
        return safetensors_path
    if picked == safetensors_path and belongs(bin_path):
        os.unlink(safetensors_path)
        warnings.warn(interrupted + f"removed them; the adapter is the complete {WEIGHTS_NAME}.", stacklevel=3)
        return bin_path
    if picked is None:
        raise FileNotFoundError(
            f"{directory} has neither {SAFETENSORS_WEIGHTS_NAME} nor {WEIGHTS_NAME}, but its {CONFIG_NAME} was saved "
            "with weights beside it."
        )
    raise ValueError(
        f"{picked} does not belong to {os.path.join(directory, CONFIG_NAME)} (SHA-256 mismatch). The adapter was "
        "modified after saving, or a save into this directory was interrupted between the weights and the config. "
        "Save the adapter again."
    )
