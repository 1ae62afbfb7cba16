"""Shared pieces of the integration tests: methods with the aux loss on, data, a character tokenizer, and
the suite's version shims (what differs between the dependency versions that ``make test-oldest``,
``make test`` and ``make test-newest`` run: see README "Supported versions")."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import string

import torch
import transformers
from packaging.version import Version
from peft import get_peft_model
from transformers import PreTrainedTokenizerFast

from tests.methods import METHODS
from tests.tiny_models import tiny_llama

METHOD_NAMES = sorted(METHODS)
AUX_COEF = 0.5  # large, so that a forgotten aux loss shows in every comparison


def config(method: str, **overrides):
    """A small non-trivial config of ``method`` with the router balance loss switched on."""
    factory, _ = METHODS[method]
    kwargs = {"init_weights": False, "router_aux_loss_coef": AUX_COEF, "lora_dropout": 0.0, **overrides}
    return factory(**kwargs)


def peft_model(method: str, seed: int = 0, base=None, **overrides):
    """``get_peft_model`` of a tiny LLaMA (seeded) with :func:`config`."""
    base = base if base is not None else tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, config(method, **overrides))


def installed(package: str) -> Version:
    """The installed version of ``package``."""
    return Version(importlib.metadata.version(package))


# transformers < 5.10: ``Trainer`` divides a causal LM's summed token loss by the count of all label tokens,
# each row's first position included, although the shifted loss never predicts it; 5.10 counts
# ``labels[..., 1:]``. (The model's own mean loss is the same on every version.)
TRAINER_COUNTS_SHIFTED_LABELS = Version(transformers.__version__) >= Version("5.10")

# TRL >= 1.15: ``SFTTrainer`` computes the loss from its fused LM head and leaves out the model's aux loss
# (``with_router_aux_loss`` adds it back); before, it used the model's ``outputs.loss``, aux loss included.
SFT_TRAINER_DROPS_AUX_LOSS = installed("trl") >= Version("1.15") if importlib.util.find_spec("trl") else None


# transformers >= 5.16: activation checkpointing takes ``every_n_layers`` (checkpoint every n-th block only).
CHECKPOINTING_EVERY_N_LAYERS = Version(transformers.__version__) >= Version("5.16")


def trainer_token_count(labels: torch.Tensor) -> int:
    """The ``num_items_in_batch`` that this transformers' ``Trainer`` divides a causal LM's loss sum by."""
    counted = labels[..., 1:] if TRAINER_COUNTS_SHIFTED_LABELS else labels
    return int(counted.ne(-100).sum())


def enable_activation_checkpointing(model, use_reentrant: bool, **kwargs) -> None:
    """Activation (gradient) checkpointing on a transformers model or a PEFT model of one.

    The one version shim for it: transformers >= 5.23 has ``activation_checkpointing_enable`` and
    deprecates ``gradient_checkpointing_enable`` (a FutureWarning, an error in this suite); older
    releases have only the latter. ``kwargs`` go to whichever is called (``every_n_layers`` needs
    :data:`CHECKPOINTING_EVERY_N_LAYERS`).
    """
    options = {"use_reentrant": use_reentrant}
    if use_reentrant:  # reentrant checkpointing needs inputs that require grad (frozen embeddings give none)
        model.enable_input_require_grads()
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)


def adapter_state(model, method: str) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors (cloned), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def sequences(rows: int = 8, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Token rows following a fixed random permutation: a next-token rule adapters can learn."""
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(127, generator=generator) + 1
    tokens = [torch.randint(1, 128, (rows,), generator=generator)]
    for _ in range(length - 1):
        tokens.append(successor[tokens[-1] - 1])
    return torch.stack(tokens, dim=1)


class TokenDataset(torch.utils.data.Dataset):
    """``input_ids``/``attention_mask``/``labels`` rows for ``transformers.Trainer``; row 0 is left-padded."""

    def __init__(self, ids: torch.Tensor, pad_first: int = 3) -> None:
        self.ids = ids.clone()
        self.mask = torch.ones_like(ids)
        if pad_first:
            self.ids[0, :pad_first] = 0
            self.mask[0, :pad_first] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with fewer than 128 ids (fits the tiny models), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def run_process_group(command: list[str], cwd, env: dict, timeout: float) -> tuple[int | None, str, str]:
    """Run ``command`` (a launcher and the ranks it starts) in its own process session: ``(exit code or None if it
    timed out, stdout, stderr)``. On a timeout the whole session is killed, so no rank is left behind (a rank
    orphaned by killing only the launcher waits in its collective for ever)."""
    import os
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()
