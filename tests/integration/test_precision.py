"""Mixed precision: bf16 / fp16 autocast and bf16 weights train; router probabilities stay float32;
no NaN on long or extreme inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import loramix.mor.functional as mor_functional
from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, TokenDataset, peft_model, sequences
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")

HALF = [torch.bfloat16, torch.float16]


def batch(rows=2, length=12):
    ids = sequences(rows=rows, length=length)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture
def router_dtypes(monkeypatch):
    """dtypes of the router probabilities MoR computes (MiLoRA: of its router logits, from the outputs)."""
    seen = []
    original = mor_functional.router_probs

    def spy(*args, **kwargs):
        probs = original(*args, **kwargs)
        seen.append(probs.dtype)
        return probs

    monkeypatch.setattr(mor_functional, "router_probs", spy)
    return seen


def check_router_float32(method, outputs, seen):
    if method == "mor":
        assert seen and all(d == torch.float32 for d in seen)
    else:
        logits = outputs.router_logits
        assert logits and all(t.dtype == torch.float32 for t in logits)
    assert outputs.aux_loss.dtype == torch.float32 and torch.isfinite(outputs.aux_loss)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_autocast_training_step(method, dtype, router_dtypes):
    model = peft_model(method).train()
    with torch.no_grad():
        reference = model(**batch()).loss
    with torch.autocast("cpu", dtype=dtype):
        out = model(**batch())
    assert out.logits.dtype in (dtype, torch.float32)
    out.loss.backward()
    check_router_float32(method, out, router_dtypes)
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(reference.item(), rel=2e-2)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bf16_weights(method, router_dtypes):
    base = tiny_llama().to(torch.bfloat16)
    model = peft_model(method, base=base).train()
    out = model(**batch())
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    check_router_float32(method, out, router_dtypes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # PEFT keeps adapter weights in float32 on a bf16 base (autocast_adapter_dtype=True) for stable updates.
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainable)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_trainer_mixed_precision(tmp_path, method, flag):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **{flag: True},
    )
    trainer = Trainer(model=peft_model(method), args=args, train_dataset=TokenDataset(sequences()))
    trainer.train()
    assert trainer.accelerator.mixed_precision == flag
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(loss == loss and abs(loss) < 1e3 for loss in losses)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["fp32", "bf16", "fp16"])
def test_long_and_extreme_inputs_stay_finite(method, dtype, router_dtypes):
    model = peft_model(method, base=tiny_llama(max_position_embeddings=1024)).eval()
    long = sequences(rows=1, length=1000)
    embeds = model.get_input_embeddings()(long[:, :64])
    extreme = embeds / embeds.abs().amax() * 6e4  # near the float16 maximum
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        outs = [
            model(input_ids=long, labels=long),
            model(inputs_embeds=extreme, labels=long[:, :64]),
            model(inputs_embeds=-extreme, labels=long[:, :64]),
        ]
    for out in outs:
        assert torch.isfinite(out.logits).all()
        assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    check_router_float32(method, outs[0], router_dtypes)
