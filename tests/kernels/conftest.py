"""Run the Triton kernels on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set when a kernel is *defined* (``@triton.jit`` picks the interpreter
then), so it is set here, at collection, and the kernel modules are (re)imported under it. It is put
back straight after, so that the rest of the suite sees the environment it was started with; the
tests here set it again (``interpret`` fixture) because the ``triton`` backend checks it per call.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

pytest.importorskip("triton")

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    for _name in ("loramix.kernels.mor_triton", "loramix.kernels.segmented"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
        else:
            importlib.import_module(_name)
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
