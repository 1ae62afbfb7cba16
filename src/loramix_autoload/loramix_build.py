"""loramix's PEP 517 build backend: setuptools', plus the start-up file at the root of every wheel it builds.

``pyproject.toml`` names this file as the top-level module ``loramix_build`` (``build-backend =
"loramix_build"``, ``backend-path = ["src/loramix_autoload"]``); it is used at build time only. Every hook is
setuptools' own; ``build_wheel`` and ``build_editable`` then add :data:`PTH_NAME` to the wheel's root, which
installers copy into site-packages, and list it in the wheel's ``RECORD`` (so ``pip uninstall`` removes it).

Why a top-level module that imports nothing from loramix: where loramix is installed already, every
interpreter, the build backend's included, imports ``loramix_autoload`` at start-up from that install. A
backend inside that package (``loramix_autoload.<backend>``) would then be loaded from the installed copy,
not from the tree being built (pip refuses it: "Backend was not loaded from backend-path").

Why here and not in a setuptools command: setuptools ships files outside packages only through custom
``build_py``/``install_lib`` commands, and its editable installs (PEP 660) do not use ``build_lib``: the
src-layout strategy writes only its own ``__editable__.*.pth``, so a file copied into ``build_lib`` never
reaches an editable install, and reaching it means relying on the internals of ``editable_wheel``.
Adding the file to the finished wheel gives wheel and editable installs (every editable strategy) the
same file through PEP 517's two public hooks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every other hook is setuptools' own)

# The start-up file. Its name sorts after setuptools' ``__editable__.*.pth``, which must put an editable
# install's ``src`` on sys.path before this line runs (site reads .pth files in sorted order); the name is
# also loramix_autoload.PTH_NAME (tests/integration/test_autoload.py checks both).
PTH_NAME = "loramix_autoload.pth"
PTH_LINE = "import loramix_autoload; loramix_autoload.install()\n"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    """setuptools' wheel, with the start-up file added."""
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_file(Path(wheel_directory, name), PTH_NAME, PTH_LINE.encode())
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    """setuptools' editable wheel, with the start-up file added."""
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_file(Path(wheel_directory, name), PTH_NAME, PTH_LINE.encode())
    return name


def _record_line(path: str, data: bytes) -> str:
    """A wheel ``RECORD`` line: ``path,sha256=<urlsafe base64, unpadded>,size``."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def add_file(wheel: Path, path: str, data: bytes) -> None:
    """Add (or replace) ``path`` in the wheel at ``wheel``, before its ``.dist-info`` entries, and in ``RECORD``.

    The other entries are copied unchanged (same order, dates and modes); the new one takes ``RECORD``'s date,
    so a reproducible build stays reproducible. The wheel is replaced atomically.
    """
    with zipfile.ZipFile(wheel) as source:
        entries = [(info, source.read(info)) for info in source.infolist() if info.filename != path]
    record_index = next(
        i
        for i, (info, _) in enumerate(entries)
        if info.filename.count("/") == 1 and info.filename.endswith(".dist-info/RECORD")
    )
    record_info, record = entries[record_index]
    lines = [line for line in record.decode().splitlines() if line and not line.startswith(f"{path},")]
    entries[record_index] = (record_info, ("\n".join([_record_line(path, data), *lines]) + "\n").encode())
    added = zipfile.ZipInfo(path, date_time=record_info.date_time)
    added.external_attr = 0o644 << 16
    added.compress_type = zipfile.ZIP_DEFLATED
    first_metadata = next(i for i, (info, _) in enumerate(entries) if ".dist-info/" in info.filename)
    entries.insert(first_metadata, (added, data))
    partial = wheel.with_name(wheel.name + ".partial")
    with zipfile.ZipFile(partial, "w") as target:
        for info, content in entries:
            target.writestr(info, content)
    os.replace(partial, wheel)
