"""What both config classes share (``loramix/_tuner/config.py``): PEFT-style docs that cite the paper."""

from __future__ import annotations

import dataclasses

import pytest
from peft import PeftConfig

from loramix import MiLoRAConfig, MoRConfig


@pytest.mark.parametrize("config_cls, paper", [(MoRConfig, "arXiv 2410.13408"), (MiLoRAConfig, "arXiv 2410.18035")])
def test_docstring_documents_every_field_and_cites_the_paper(config_cls, paper):
    doc = config_cls.__doc__
    args = doc[doc.index("    Args:") :]
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    own = [f.name for f in dataclasses.fields(config_cls) if f.name not in inherited]
    assert own and not [name for name in own if f"        {name} (`" not in args and f", {name} (`" not in args]
    assert paper in doc and "../" not in doc


@pytest.mark.parametrize("config_cls", [MoRConfig, MiLoRAConfig])
def test_each_field_is_documented_once_by_its_help(config_cls):
    """The ``Args:`` entry of every field is its ``help``, word for word (one source for both)."""
    args = " ".join(config_cls.__doc__[config_cls.__doc__.index("    Args:") :].split())
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    for f in dataclasses.fields(config_cls):
        if f.name not in inherited:
            assert " ".join(f.metadata["help"].split()) in args, f.name


def test_a_shared_field_keeps_its_help_under_another_default():
    shared = {f.name: f for f in dataclasses.fields(MoRConfig)}
    for f in dataclasses.fields(MiLoRAConfig):
        if f.name in ("r", "lora_alpha"):
            assert f.default != shared[f.name].default and f.metadata == shared[f.name].metadata


def _numeric_fields(config_cls) -> list[str]:
    """The config's fields whose default is a real number (int or float, not bool)."""
    return [
        f.name
        for f in dataclasses.fields(config_cls)
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) and f.name != "loramix_format"
    ]


@pytest.mark.parametrize("config_cls", [MoRConfig, MiLoRAConfig])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_numeric_field_refuses_non_finite_values_naming_the_field(config_cls, value):
    """Enumerated from the dataclass, so a new numeric field is covered without a new test."""
    fields = _numeric_fields(config_cls)
    assert {"r", "lora_alpha", "lora_dropout", "router_aux_loss_coef"} <= set(fields)
    for name in fields:
        with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
            config_cls(**{name: value})
