"""``router_lr_ratio``: the router weight is W_r = k · P with P the trained parameter (loramix/_tuner/layer.py,
ScaledRouter).

What must hold, each against a reference that does not use the code under test:
* with one learning rate, Adam's first step moves W_r by k · lr per coordinate (Adam's first step is lr · sign(g));
* the layer computes with W_r = k · P (the float64 loop over experts of tests/mor/reference.py, fed k times the
  saved P);
* files hold P and the config holds k, so every loader gives the saved model's outputs: PEFT's, transformers'
  ``load_adapter`` (which assigns tensors without ``load_state_dict``), and a state dict gathered from
  ``named_parameters`` (as DeepSpeed ZeRO-3 gathers one);
* ``adapter_config.json`` leaves the default ratio 1 out (loramix 0.1 refuses unknown keys);
* a fresh adapter's W_r (and so its outputs) does not depend on k;
* the field refuses values outside [0.01, 100] and non-finite ones, naming itself; MoR's mean router refuses k != 1.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

import loramix
from tests.mor.reference import mor_linear_reference
from tests.tiny_models import tiny_llama

CONFIGS = {
    "mor": lambda **kw: loramix.MoRConfig(r=4, lora_alpha=8, num_experts=3, target_modules=["up_proj"], **kw),
    "milora": lambda **kw: loramix.MiLoRAConfig(
        r=4, lora_alpha=8, top_k=2, target_modules=["q_proj", "up_proj"], **kw
    ),  # fmt: skip
}
ROUTER = {"mor": "mor_router", "milora": "milora_router"}


def _routers(model, method: str) -> dict[str, torch.Tensor]:
    """Every router of ``model`` as the layer computes with it (W_r), by module name."""
    out = {}
    for name, module in model.named_modules():
        container = getattr(module, ROUTER[method], None)
        if isinstance(container, torch.nn.ParameterDict) and "default" in container:
            out[name] = module.router_weight("default").detach().clone()
    return out


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("ratio", [1.0, 10.0])
def test_first_adam_step_moves_the_router_weight_ratio_times_lr(method, ratio):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS[method](router_lr_ratio=ratio, init_weights=False))
    before = _routers(model, method)
    lr = 1e-3
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-30)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = _routers(model, method)
    for name, w in before.items():
        step = (after[name] - w).abs()
        moved = step[step > 0]
        assert moved.numel() > 0, f"{name}: the router did not move"
        # each moved coordinate by k * lr, up to float32 rounding of W and of the step
        tolerance = 4 * torch.finfo(torch.float32).eps * (w.abs().max().item() + ratio * lr)
        assert torch.allclose(moved, torch.full_like(moved, ratio * lr), atol=tolerance, rtol=0), (name, moved)


def test_mor_layer_computes_with_ratio_times_the_saved_router(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS["mor"](router_lr_ratio=7.0, init_weights=False)).eval()
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["router_lr_ratio"] == 7.0
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    key = next(k for k in saved if "layers.0.mlp.up_proj" in k and "mor_router" in k)
    prefix = key.split("mor_router")[0]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    expected = mor_linear_reference(
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        saved[prefix + "mor_A"],
        saved[prefix + "mor_B"],
        saved[prefix + "mor_omega_A"],
        saved[prefix + "mor_omega_B"],
        7.0 * saved[key].double(),
        layer.scaling["default"],
    )
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def _load(loader: str, path):
    """A fresh tiny LLaMA with the adapter saved at ``path``, loaded the way ``loader`` names."""
    if loader == "peft":
        return PeftModel.from_pretrained(tiny_llama(), path)
    model = tiny_llama()
    model.load_adapter(str(path))  # transformers' loader: tensors assigned by name
    return model


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("loader", ["peft", "transformers"])
@pytest.mark.parametrize("gathered", [False, True], ids=["state_dict", "named_parameters"])
def test_every_loader_gives_the_saved_models_outputs(method, loader, gathered, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS[method](router_lr_ratio=5.0, init_weights=False)).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # what a ZeRO-3 save hands to save_pretrained: the parameters themselves, not module.state_dict()
    state = {n: p.detach().clone() for n, p in model.named_parameters()} if gathered else None
    model.save_pretrained(tmp_path, state_dict=state)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, p in get_peft_model_state_dict(model).items():
        torch.testing.assert_close(saved[name], p, atol=0, rtol=0)  # the file holds P, exactly as trained
    loaded = _load(loader, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_the_default_ratio_is_left_out_of_the_saved_config(method, tmp_path):
    get_peft_model(tiny_llama(), CONFIGS[method]()).save_pretrained(tmp_path)
    assert "router_lr_ratio" not in json.loads((tmp_path / "adapter_config.json").read_text())
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"].router_lr_ratio == 1.0


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fresh_adapter_router_does_not_depend_on_the_ratio(method):
    weights = []
    for ratio in (1.0, 16.0):
        torch.manual_seed(0)
        weights.append(_routers(get_peft_model(tiny_llama(), CONFIGS[method](router_lr_ratio=ratio)), method))
    for name in weights[0]:
        # P = W / 16 drawn from the same stream: W agrees up to the rounding of the division and product
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=0, rtol=4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("value", [0.0, -1.0, 0.009, 100.5, math.nan, math.inf, -math.inf])
def test_ratio_refuses_values_out_of_range_and_non_finite(method, value):
    with pytest.raises(ValueError, match="router_lr_ratio"):
        CONFIGS[method](router_lr_ratio=value)


def test_mean_router_refuses_a_ratio():
    with pytest.raises(ValueError, match="router_lr_ratio.*mean"):
        CONFIGS["mor"](router="mean", router_lr_ratio=10.0)
    CONFIGS["mor"](router="mean", router_lr_ratio=1.0)


def test_mixed_adapter_batch_with_two_ratios_equals_each_row_alone():
    """The grouped path (mor/layer.py ``_grouped_stacks``) stacks each adapter's W_r = ratio · P: rows of a batch
    mixing adapters with ratios 7 and 3 equal each row run alone with its adapter active."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CONFIGS["mor"](router_lr_ratio=7.0, init_weights=False), adapter_name="a")
    model.add_adapter("b", CONFIGS["mor"](router_lr_ratio=3.0, init_weights=False))
    model.eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 8], [7, 3, 44, 12, 90, 1]])
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["a", "b"]).logits
        alone = []
        for row, name in enumerate(["a", "b"]):
            model.set_adapter(name)
            alone.append(model(input_ids=ids[row : row + 1]).logits[0])
    torch.testing.assert_close(mixed, torch.stack(alone), atol=1e-5, rtol=1e-5)
