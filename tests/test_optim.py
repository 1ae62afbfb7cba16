"""``loramix.optim.parameter_groups``: each trainable parameter in exactly one group, found from the modules
themselves (not from names), and the groups' rates kept by ``transformers.Trainer``."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from loramix import MoRConfig
from loramix.milora.layer import MiLoRARouter
from loramix.mor.layer import MoRLayer
from loramix.optim import parameter_groups
from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import TokenDataset, peft_model, sequences
from tests.tiny_models import tiny_llama


def _expected(model) -> dict[str, set[int]]:
    """The groups read off the layers' own containers."""
    router, omega = set(), set()
    for module in model.modules():
        if isinstance(module, MoRLayer):
            router |= {id(p) for p in module.mor_router.values()}
            omega |= {id(p) for p in (*module.mor_omega_A.values(), *module.mor_omega_B.values())}
        if isinstance(module, MiLoRARouter):
            for attr in module.adapter_layer_names:
                router |= {id(p) for p in getattr(module, attr).values()}
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    others = {i for i in trainable if i not in router | omega}
    vectors = {i for i in others if trainable[i].dim() == 1}
    return {"adapter": others - vectors, "vectors": vectors, "router": router, "omega": omega}


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("mor", {}), ("mor", {"bias": "mor_only"}), ("milora", {}), ("milora", {"use_dora": True})],
)
def test_groups_partition_the_trainable_parameters(method, overrides):
    model = peft_model(method, base=tiny_llama(0, mlp_bias=True), **overrides)  # biases: frozen unless bias=...
    groups = parameter_groups(model, 1e-3, router_lr=1e-2, omega_lr=5e-3, weight_decay=0.1)
    found = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    expected = {k: v for k, v in _expected(model).items() if v}
    assert found == expected and all(expected.values())
    settings = {"adapter": (1e-3, 0.1), "vectors": (1e-3, 0.0), "router": (1e-2, 0.0), "omega": (5e-3, 0.0)}
    assert ("vectors" in found) == bool(overrides)  # biases, DoRA magnitudes
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {k: settings[k] for k in expected}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_an_adapter_named_like_a_container_is_classified_by_its_layers():
    base = tiny_llama()
    model = get_peft_model(base, MoRConfig(r=4, num_experts=3), adapter_name="mor_router")
    found = {g["name"]: {id(p) for p in g["params"]} for g in parameter_groups(model, 1e-3)}
    assert found == {k: v for k, v in _expected(model).items() if v}


def test_other_adapters_are_one_group():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    groups = parameter_groups(model, 2e-4, router_lr=1.0)
    assert [g["name"] for g in groups] == ["adapter"] and groups[0]["lr"] == 2e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": -1.0}, "`lr`"), ({"lr": 1e-3, "router_lr": "x"}, "`router_lr`")]
    + [
        ({"lr": 1e-3, label: value} if label != "lr" else {"lr": value}, f"`{label}`")
        for label in ("lr", "router_lr", "omega_lr", "weight_decay")
        for value in (float("nan"), float("inf"), float("-inf"))
    ],
)
def test_bad_rates_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parameter_groups(peft_model("mor"), **kwargs)


def test_a_frozen_model_is_refused():
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(tiny_llama().requires_grad_(False), 1e-3)


@pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")
def test_trainer_keeps_each_groups_rate(tmp_path):
    model = peft_model("mor")
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3, router_lr=4e-3, omega_lr=2e-3))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        lr_scheduler_type="linear", warmup_steps=0, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    router = next(m.mor_router["default"] for m in model.modules() if isinstance(m, MoRLayer))
    before = router.detach().clone()
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenDataset(sequences(rows=4)), optimizers=(optimizer, None)
    )
    trainer.train()
    # the Trainer's schedule starts each group at its own rate (and decays them alike)
    names = [g["name"] for g in trainer.optimizer.param_groups]
    assert dict(zip(names, trainer.lr_scheduler.base_lrs, strict=True)) == {
        "adapter": 1e-3,
        "router": 4e-3,
        "omega": 2e-3,
    }
    assert not torch.equal(router.detach(), before)
