"""Training MiLoRA: where gradients go, activation checkpointing, the balance loss, bi-level activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramix.milora.bilevel import MiLoRABilevelCallback, architecture_step, split_milora_parameters
from tests.integration.helpers import enable_activation_checkpointing
from tests.milora.common import latest, left_pad, milora_model, random_tokens, routers
from tests.milora.reference import balance_reference, router_reference

ROUTER_PARAMS = ("milora_router", "milora_pool_query", "milora_rational_num", "milora_rational_den")


def batch(rows: int = 4):
    ids, mask = left_pad([random_tokens(9 - r % 3, 10 + r) for r in range(rows)])
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :5] = -100  # the first positions are the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_routers_activations_and_selected_experts_only():
    model = milora_model(router_aux_loss_coef=0.1).train()
    model(**batch()).loss.backward()
    got = grads(model)
    assert all(".milora_" in n for n in got)  # nothing reaches the base model
    for name, router in routers(model).items():
        for attr in ROUTER_PARAMS:
            assert got[f"{name}.{attr}.default"].abs().sum() > 0, (name, attr)
        selected = latest(model, name).selected.any(0)
        block = name.rsplit(".", 1)[0]
        for index, expert_name in enumerate(router.expert_names["default"]):
            for attr in ("milora_A", "milora_B"):
                key = f"{block}.{expert_name}.{attr}.default"
                # unselected experts get exact zeros (not None: DDP/FSDP reduce every parameter's gradient)
                assert bool(got[key].abs().sum() > 0) == bool(selected[index]), key
    assert any(not latest(model, n).selected.any(0).all() for n in routers(model))  # some unselected


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    """Checkpointed blocks are recomputed after the forward returned: they must route on the same tokens."""
    reference = milora_model(router_aux_loss_coef=0.5).train()
    reference(**batch()).loss.backward()
    expected = grads(reference)
    model = milora_model(router_aux_loss_coef=0.5).train()
    enable_activation_checkpointing(model, reentrant)
    model.enable_input_require_grads()
    model(**batch()).loss.backward()
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-4), name


def test_aux_loss_value_and_when_it_is_added():
    coef = 0.25
    model = milora_model(router_aux_loss_coef=coef, pooler="mean", activation="relu").train()
    inputs = batch()
    seen = {}

    def keep(name, value):
        seen[name] = value.detach()

    hooks = [r.register_forward_hook(lambda m, a, o, n=n: keep(n, o)) for n, r in routers(model).items()]  # normed
    out = model(**inputs)
    for hook in hooks:
        hook.remove()
    prompt = inputs["attention_mask"].bool() & inputs["labels"].eq(-100)
    per_block = []
    for name, router in routers(model).items():
        probs, _ = router_reference(
            seen[name], prompt, "mean", None, "relu", router.milora_router["default"].detach(), 2
        )
        per_block.append(balance_reference(probs))
    assert out.aux_loss.item() == pytest.approx(sum(per_block) / len(per_block), rel=1e-5)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (4, 7)
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100)
    assert out.loss.item() == pytest.approx(lm.item() + coef * out.aux_loss.item(), rel=1e-5)  # training: added
    with torch.no_grad():
        evaluated = model.eval()(**inputs)
    # evaluation: added too, as in transformers' MoE models (and MoR): one rule whenever labels are given
    assert evaluated.loss.item() == pytest.approx(lm.item() + coef * out.aux_loss.item(), rel=1e-5)
    assert evaluated.aux_loss.item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
    with model.disable_adapter(), torch.no_grad():
        assert "aux_loss" not in model(**inputs)


def permutation_sequences(rows: int = 8, length: int = 12) -> torch.Tensor:
    """Token sequences that follow a fixed random permutation: a next-token rule adapters can learn."""
    generator = torch.Generator().manual_seed(1)
    successor = torch.randperm(127, generator=generator) + 1
    tokens = [torch.randint(1, 128, (rows,), generator=generator)]
    for _ in range(length - 1):
        tokens.append(successor[tokens[-1] - 1])
    return torch.stack(tokens, dim=1)


def test_training_with_the_aux_loss_makes_the_loss_fall():
    torch.manual_seed(0)
    model = milora_model(init_weights=True, r=8, top_k=3).train()  # paper setting: aux coefficient 1e-2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = permutation_sequences()
    losses, aux = [], []
    for _ in range(40):
        out = model(input_ids=data, labels=data)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
        aux.append(out.aux_loss.item())
    assert losses[-1] < losses[0] / 3, losses[::8]
    assert all(1.0 <= a <= 7.0 for a in aux)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_split_parameters_and_architecture_step():
    model = milora_model().train()
    architecture, weights = split_milora_parameters(model)
    assert len(architecture) == 2 * 2 and all(p.numel() in (7, 5) for p in architecture)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in architecture} | {id(p) for p in weights} == {id(p) for p in trainable}
    before = [p.detach().clone() for p in trainable]
    loss = architecture_step(model, batch(), torch.optim.SGD(architecture, lr=0.1), architecture)
    assert loss > 0
    arch_ids = {id(p) for p in architecture}
    for p, old in zip(trainable, before, strict=True):
        assert torch.equal(p, old) != (id(p) in arch_ids)  # only the architecture moved
        assert p.grad is None


@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_bilevel_callback_updates_activations_on_validation_batches_only(tmp_path, lr):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = milora_model()
    data = permutation_sequences(rows=8)
    train = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist()})
    val = [{"input_ids": data[:2], "labels": data[:2]}]
    callback = MiLoRABilevelCallback(val, lr=lr)
    architecture, weights = split_milora_parameters(model)
    before_arch = [p.detach().clone() for p in architecture]
    before_weights = [p.detach().clone() for p in weights]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
    assert len(callback.val_losses) == 3
    assert any(not torch.equal(p, old) for p, old in zip(weights, before_weights, strict=True))  # trained
    moved = [not torch.equal(p, old) for p, old in zip(architecture, before_arch, strict=True)]
    assert all(moved) if lr > 0 else not any(moved)  # the Trainer's own optimizer never moves them
