"""Training MiLoRA's rational activations: jointly, or by the paper's bi-level alternation.

The paper (§3.4, Appendix A) treats the coefficients of the routers' rational activations as
*architecture* parameters Θ and everything else (LoRA experts, routers, pool queries) as *weights* Ω,
and approximates ``min_Θ L(D_val; Ω*(Θ), Θ)`` s.t. ``Ω* = argmin_Ω L(D_train; Ω, Θ)`` by alternating:
Ω takes its steps on training batches, Θ on validation batches at its own learning rate (paper: 1e-6,
AdamW, otherwise the training hyper-parameters).

* **Joint training** (the default, nothing to do): Θ are ordinary trainable parameters and every
  optimizer step updates them with the weights.
* **Bi-level** with ``transformers.Trainer`` (or TRL's trainers, which subclass it)::

      from loramix.milora.bilevel import MiLoRABilevelCallback
      trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
                        callbacks=[MiLoRABilevelCallback(val_loader, lr=1e-6)])

  The callback removes Θ's gradients before each optimizer step (so the Trainer's optimizer never
  moves them) and, after the step, takes one step of its own optimizer on Θ with the loss of the next
  validation batch (``val_loader`` yields model inputs with labels; it is cycled).
* **Bi-level in your own loop**: :func:`split_milora_parameters` gives ``(architecture, weights)`` for
  two optimizers, and :func:`architecture_step` does one Θ step on a validation batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

ARCHITECTURE_PARAMETER_NAMES = ("milora_rational_num", "milora_rational_den")


def _is_architecture(name: str) -> bool:
    return any(f".{attr}." in f".{name}." for attr in ARCHITECTURE_PARAMETER_NAMES)


def split_milora_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(architecture, weights)``: the trainable rational coefficients, and every other trainable parameter."""
    architecture, weights = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (architecture if _is_architecture(name) else weights).append(param)
    return architecture, weights


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def architecture_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, parameters) -> float:
    """One step of ``optimizer`` on the architecture ``parameters`` with the loss of a validation ``batch``.

    Only ``parameters`` receive gradients (``torch.autograd.grad``); the weights' ``.grad`` are untouched.
    Returns the validation loss.
    """
    parameters = list(parameters)
    device = parameters[0].device if parameters else torch.device("cpu")
    loss = model(**_to_device(batch, device)).loss
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    for param, grad in zip(parameters, grads, strict=True):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


class MiLoRABilevelCallback(TrainerCallback):
    """``transformers.Trainer`` callback for the paper's bi-level training of the rational activations.

    Args:
        val_batches: an iterable of validation batches (e.g. a ``DataLoader``), cycled.
        lr: learning rate of the architecture parameters (paper: 1e-6).
        every: take an architecture step after every ``every``-th optimizer step.
        optimizer_cls: optimizer for the architecture parameters (AdamW, as the paper's training).
    """

    def __init__(self, val_batches: Iterable[dict], lr: float = 1e-6, every: int = 1, optimizer_cls=None) -> None:
        self.val_batches = val_batches
        self.lr = lr
        self.every = every
        self.optimizer_cls = optimizer_cls or torch.optim.AdamW
        self.parameters: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.val_losses: list[float] = []
        self._iterator: Iterator[dict] | None = None

    def _next_batch(self) -> dict:
        try:
            return next(self._iterator)
        except (StopIteration, TypeError):
            self._iterator = iter(self.val_batches)
            return next(self._iterator)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.parameters, _ = split_milora_parameters(model)
        if not self.parameters:
            raise ValueError(
                "MiLoRABilevelCallback: the model has no trainable rational-activation coefficients "
                "(MiLoRAConfig(activation='rational') and an active, trainable adapter are needed)."
            )
        self.optimizer = self.optimizer_cls(self.parameters, lr=self.lr)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for param in self.parameters:  # the Trainer's optimizer skips parameters without a gradient
            param.grad = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.optimizer is None or state.global_step % self.every:
            return
        self.val_losses.append(architecture_step(model, self._next_batch(), self.optimizer, self.parameters))
