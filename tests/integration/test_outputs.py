"""What distributed training needs from a model's outputs and gradients, checked in one process.

* DistributedDataParallel (and ``torch.compile``) flatten model outputs as pytrees and rebuild them
  with ``type(outputs)(**fields)``: ``aux_loss`` (and ``router_logits``) must be real fields of the output
  class (``loramix._compat.transformers.with_output_fields`` makes them so).
* FSDP reduce-scatters the gradients of every parameter of a shard on every rank, and DDP (without
  ``find_unused_parameters``) all-reduces them: with data-dependent routing, every trainable
  parameter must get a gradient (zeros for unselected experts), or the ranks' collectives differ
  (gloo: "Received data size doesn't match expected size"; NCCL: a hang).
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, peft_model, sequences

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")


def _inputs():
    ids = sequences(rows=2, length=10)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def outputs_survive_pytree_round_trip(method: str) -> bool:
    outputs = peft_model(method).train()(**_inputs())
    try:
        leaves, spec = pytree.tree_flatten(outputs)
        rebuilt = pytree.tree_unflatten(leaves, spec)
    except TypeError:
        return False
    return "aux_loss" in rebuilt and torch.equal(rebuilt["aux_loss"], outputs["aux_loss"])


def every_parameter_gets_a_gradient(method: str) -> bool:
    model = peft_model(method).train()
    model(**_inputs()).loss.backward()
    return all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_outputs_survive_ddp_rebuild(method):
    assert outputs_survive_pytree_round_trip(method)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_trainable_parameter_gets_a_gradient(method):
    assert every_parameter_gets_a_gradient(method)
