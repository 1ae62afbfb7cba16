"""What both config classes share (``loramix/_config_base.py``): PEFT-style docs that cite the paper."""

from __future__ import annotations

import dataclasses

import pytest
from peft import PeftConfig

from loramix import MiLoRAConfig, MoRConfig


@pytest.mark.parametrize("config_cls, paper", [(MoRConfig, "arXiv 2410.13408"), (MiLoRAConfig, "arXiv 2410.18035")])
def test_docstring_documents_every_field_and_cites_the_paper(config_cls, paper):
    doc = config_cls.__doc__
    args = doc[doc.index("    Args:") : doc.index("    Example::")]
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    own = [f.name for f in dataclasses.fields(config_cls) if f.name not in inherited]
    assert own and not [name for name in own if f"        {name} (`" not in args and f", {name} (`" not in args]
    assert paper in doc and "../" not in doc
