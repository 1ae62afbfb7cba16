"""TRL's ``SFTTrainer(model, peft_config=<loramix config>)`` trains each method; with
``with_router_aux_loss`` the router aux loss (which TRL's own loss leaves out) is optimised too."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from loramix.callbacks import RouterStatsCallback, with_router_aux_loss  # noqa: E402
from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS  # noqa: E402
from tests.integration.helpers import (  # noqa: E402
    AUX_COEF,
    METHOD_NAMES,
    SFT_TRAINER_DROPS_AUX_LOSS,
    char_tokenizer,
    config,
)
from tests.methods import METHODS  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")

PROMPTS = ["capital of France?", "2+3=", "opposite of hot:", "plural of cat:"]
ANSWERS = [" Paris", " 5", " cold", " cats"]


def sft(tmp_path, method, trainer_cls=SFTTrainer, steps=3):
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
        seed=0,
    )
    data = Dataset.from_dict({"prompt": PROMPTS * 2, "completion": ANSWERS * 2})
    return trainer_cls(
        model=tiny_llama(),
        args=args,
        train_dataset=data,
        processing_class=char_tokenizer(),
        peft_config=config(method),
        callbacks=[RouterStatsCallback()],
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_sft_trainer_trains_a_loramix_adapter(tmp_path, method):
    trainer = sft(tmp_path, method)
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].peft_type == method.upper()
    prefix = METHODS[method][1]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all(prefix in n for n in before)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert all("aux_loss" in e and "router_entropy" in e for e in logs)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert loaded.peft_config["default"].peft_type == method.upper()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_with_router_aux_loss_adds_what_trl_leaves_out(tmp_path, method):
    plain = sft(tmp_path / "plain", method, steps=1)
    plain.train()
    mixed = sft(tmp_path / "mixed", method, trainer_cls=with_router_aux_loss(SFTTrainer), steps=1)
    mixed.train()
    first_plain, first_mixed = plain.state.log_history[0], mixed.state.log_history[0]
    # Same model, data and seed: the first step's LM loss and aux loss agree; only the total differs.
    assert first_mixed["aux_loss"] == pytest.approx(first_plain["aux_loss"], rel=1e-5)
    if SFT_TRAINER_DROPS_AUX_LOSS:
        assert first_mixed["loss"] == pytest.approx(first_plain["loss"] + AUX_COEF * first_plain["aux_loss"], rel=1e-5)
    else:  # older TRL optimises the model's own loss, aux term included: nothing to add, nothing added twice
        assert first_mixed["loss"] == pytest.approx(first_plain["loss"], rel=1e-5)
