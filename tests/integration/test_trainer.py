"""``transformers.Trainer`` on a PEFT model of each method: aux loss optimised and logged, adapter-only
checkpoints, and resuming from a checkpoint ends on the same adapter as an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from loramix.callbacks import RouterStatsCallback, add_router_stats_callback
from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import (
    AUX_COEF,
    METHOD_NAMES,
    TokenDataset,
    adapter_state,
    peft_model,
    sequences,
    trainer_token_count,
)
from tests.methods import METHODS

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")


def training_args(out, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_trainer_optimises_and_logs_the_aux_loss(tmp_path, method):
    data = TokenDataset(sequences(rows=4))
    # One batch is the whole data set, so the first logged loss is that of the initial adapter on it.
    model = peft_model(method).train()  # dropout is 0: the same loss as the Trainer computes in train mode
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        expected = model(**batch)
    lm_sum = torch.nn.functional.cross_entropy(
        expected.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    lm_only = lm_sum / batch["labels"][:, 1:].ne(-100).sum()
    assert expected.loss.item() == pytest.approx(lm_only.item() + AUX_COEF * expected.aux_loss.item(), rel=1e-5)
    assert expected.loss.item() - lm_only.item() > 0.1  # the aux term is large enough to see
    # What the Trainer optimises: the LM loss sum over its own token count (num_items_in_batch), plus the aux term.
    trainer_loss = lm_sum.item() / trainer_token_count(batch["labels"]) + AUX_COEF * expected.aux_loss.item()

    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=len(data))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RouterStatsCallback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    # The loss the Trainer optimises (and logs) is the LM loss plus coef * aux loss ...
    assert logs[0]["loss"] == pytest.approx(trainer_loss, rel=1e-4)
    # ... and the aux loss itself is logged, with router statistics.
    assert logs[0]["aux_loss"] == pytest.approx(expected.aux_loss.item(), rel=1e-4)
    for entry in logs:
        assert {"aux_loss", "router_entropy", "router_balance", "router_max_usage"} <= set(entry)
        assert entry["router_balance"] > 0 and entry["router_entropy"] > 0
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_callback_first_reaches_reporting_integrations(tmp_path, method):
    seen = []

    class Reporter(RouterStatsCallback.__mro__[1]):  # a TrainerCallback standing in for TensorBoard / W&B
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = Trainer(
        model=peft_model(method), args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset(sequences())
    )
    trainer.callback_handler.callbacks.insert(0, Reporter())
    add_router_stats_callback(trainer)
    trainer.train()
    assert seen and all("aux_loss" in logs and "router_entropy" in logs for logs in seen if "loss" in logs)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_checkpoints_hold_the_adapter_only(tmp_path, method):
    model = peft_model(method)
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(model=model, args=args, train_dataset=TokenDataset(sequences())).train()
    checkpoint = tmp_path / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    saved = load_file(checkpoint / "adapter_model.safetensors")
    prefix = METHODS[method][1]
    assert saved and all(prefix in key for key in saved)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == method.upper()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_resume_from_checkpoint_reaches_the_same_adapter(tmp_path, method):
    data = TokenDataset(sequences(rows=8))
    # Dropout on, mid-epoch checkpoint: the resumed run must restore RNG, optimizer and data order.
    overrides = {"lora_dropout": 0.1}
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear", warmup_steps=1)

    straight = peft_model(method, **overrides)
    Trainer(model=straight, args=training_args(tmp_path / "a", **args), train_dataset=data).train()
    expected = adapter_state(straight, method)

    resumed = peft_model(method, **overrides)
    start = adapter_state(resumed, method)
    trainer = Trainer(model=resumed, args=training_args(tmp_path / "b", **args), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    final = adapter_state(resumed, method)
    assert final.keys() == expected.keys()
    # (MiLoRA: modules its routers never selected keep their initial weights.)
    assert sum(not torch.equal(final[name], start[name]) for name in expected) > len(expected) // 2
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_router_statistics_every_n_steps(tmp_path, method):
    trainer = Trainer(
        model=peft_model(method),
        args=training_args(tmp_path, max_steps=4),
        train_dataset=TokenDataset(sequences()),
        callbacks=[RouterStatsCallback(every_n_steps=2, per_layer=True)],
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("aux_loss" in e for e in logs)  # every step
    assert ["router_entropy" in e for e in logs] == [True, False, True, False]
    assert any(key.startswith("router_balance/") for key in logs[0])


def test_callback_on_a_model_without_routers_warns_and_training_goes_on(tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.tiny_models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["up_proj"], task_type="CAUSAL_LM"))
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=TokenDataset(sequences()),
        callbacks=[RouterStatsCallback()],
    )
    with pytest.warns(UserWarning, match="logs nothing"):
        trainer.train()
    assert "aux_loss" not in trainer.state.log_history[0]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_with_router_aux_loss_does_not_count_twice_with_trainer(tmp_path, method):
    from loramix.callbacks import with_router_aux_loss

    losses = []
    for cls in (Trainer, with_router_aux_loss(Trainer)):
        trainer = cls(
            model=peft_model(method), args=training_args(tmp_path, max_steps=1), train_dataset=TokenDataset(sequences())
        )
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_evaluate_and_predict_hand_compute_metrics_the_logits_as_with_lora(tmp_path, method):
    """``predictions`` is the logits array, as for a PEFT LoRA model; ``eval_loss`` is the model's loss, the LM
    loss plus ``router_aux_loss_coef * aux_loss``; the router outputs are there for ``ignore_keys=[]``."""
    from peft import LoraConfig, get_peft_model

    from tests.tiny_models import tiny_llama

    data = TokenDataset(sequences(rows=8))
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions)
        tokens = prediction.predictions.argmax(-1)
        return {"accuracy": float((tokens[:, :-1] == prediction.label_ids[:, 1:]).mean())}

    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["up_proj"], task_type="CAUSAL_LM"))
    model = peft_model(method)
    results = {}
    for name, candidate in (("lora", lora), (method, model)):
        candidate.config.use_cache = False  # transformers 4.x's Trainer cannot gather a returned KV cache
        args = training_args(tmp_path / name, per_device_eval_batch_size=4)
        trainer = Trainer(model=candidate, args=args, eval_dataset=data, compute_metrics=compute_metrics)
        results[name] = [trainer.evaluate(), trainer.predict(data)]
        trainer.compute_metrics = None  # the predictions below are a tuple
        results[name].append(trainer.predict(data, ignore_keys=[]))
    assert len(seen) == 4
    for predictions in seen + [results[name][1].predictions for name in results]:
        assert isinstance(predictions, np.ndarray) and predictions.shape == (8, 12, 128)
    metrics, prediction, everything = results[method]
    assert type(results["lora"][2].predictions) is np.ndarray  # LoRA has no other outputs

    # The documented loss rule, from the logits and aux_loss of plain forwards (no labels), batch by batch.
    model.eval()
    lm_losses, aux_losses = [], []
    with torch.no_grad():
        for start in (0, 4):
            rows = [data[i] for i in range(start, start + 4)]
            batch = {k: torch.stack([row[k] for row in rows]) for k in ("input_ids", "attention_mask", "labels")}
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            lm_losses.append(
                torch.nn.functional.cross_entropy(
                    outputs.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
                ).item()
            )
            aux_losses.append(outputs.aux_loss.item())
    expected = np.mean([lm + AUX_COEF * aux for lm, aux in zip(lm_losses, aux_losses, strict=True)])
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert prediction.metrics["test_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_accuracy"] == prediction.metrics["test_accuracy"]

    # ignore_keys=[]: logits, aux_loss, (MiLoRA) router_logits per block, lm_loss: one value per batch.
    logits, aux, *router_logits, lm = everything.predictions
    np.testing.assert_array_equal(logits, prediction.predictions)
    np.testing.assert_allclose(aux, aux_losses, rtol=1e-5)
    np.testing.assert_allclose(lm, lm_losses, rtol=1e-5)
    if method == "milora":
        assert [r.shape for r in router_logits[0]] == [(8, 7), (8, 7)]  # (prompts, experts) for both blocks

    base = model.unload()  # the base config as it was (transformers 4.x: the class's own list, 5.x: none)
    assert "keys_to_ignore_at_inference" not in vars(base.config)
    assert getattr(base.config, "keys_to_ignore_at_inference", None) == getattr(
        type(base.config), "keys_to_ignore_at_inference", None
    )
