"""QLoRA: each method on a bitsandbytes 4-bit / 8-bit base loaded through transformers, on CPU.

bitsandbytes >= 0.45 runs ``Linear4bit`` / ``Linear8bitLt`` on CPU; these tests skip when it is not
installed (it is in the ``test`` extra)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, config, sequences
from tests.tiny_models import tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")

QUANT = {
    "4bit": (
        lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "Linear4bit",
    ),
    "8bit": (lambda: BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt"),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden_size=64, intermediate_size=64).save_pretrained(path)
    return path


def load_quantized(base_dir, kind):
    quantization_config, _ = QUANT[kind]
    # float32 for the layers bitsandbytes leaves alone (transformers < 5 would load them in float16)
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization_config(), device_map="cpu", dtype=torch.float32
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("kind", sorted(QUANT))
def test_qlora_trains_saves_and_loads(tmp_path, base_dir, method, kind):
    base = prepare_model_for_kbit_training(load_quantized(base_dir, kind), use_gradient_checkpointing=True)
    model = get_peft_model(base, config(method))
    bases = {
        type(m.get_base_layer()).__name__
        for n, m in model.named_modules()
        if hasattr(m, "get_base_layer") and ".mlp." in n
    }
    assert QUANT[kind][1] in bases
    ids = sequences(rows=2, length=10)
    labels = ids.clone()
    labels[:, :3] = -100
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_quantized(base_dir, kind), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("kind", sorted(QUANT))
def test_merging_into_a_quantized_base_is_refused(base_dir, kind):
    from loramix import MoRConfig

    # num_experts=1 merges exactly on a float base; a quantized base has no float weight to add to.
    model = get_peft_model(load_quantized(base_dir, kind), MoRConfig(r=4, num_experts=1, init_weights=False))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    before = layer.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="quantized"):
        model.merge_adapter()
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged
