"""``transformers.Trainer`` integration: log the router aux loss and router statistics while training.

The loss a loramix model returns already contains ``router_aux_loss_coef * aux_loss`` whenever labels
are given (transformers' MoE convention), so ``Trainer`` optimises it with no change. What ``Trainer``
does not do is log the aux loss on its own: transformers' MoE models fold it into ``loss`` and
``Trainer`` logs only that. :class:`RouterStatsCallback` adds it, and a summary of the routers, to
every training log::

    from loramix.callbacks import RouterStatsCallback

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[RouterStatsCallback()])
    trainer.train()
    trainer.state.log_history[-2]   # {..., "loss": ..., "aux_loss": ..., "router_entropy": ..., ...}

It works the same with TRL's ``SFTTrainer`` and under ``accelerate`` (values are averaged over processes).

TRL's trainers (``SFTTrainer`` 1.x and others) compute the loss themselves from the model's
log-probabilities, so the aux loss the model adds to ``outputs.loss`` is *not* optimised there.
:func:`with_router_aux_loss` (or :class:`RouterAuxLossMixin`) adds it back, as TRL does for
transformers' MoE models::

    from trl import SFTTrainer
    from loramix.callbacks import with_router_aux_loss

    trainer = with_router_aux_loss(SFTTrainer)(model=base, peft_config=MoRConfig(...), ...)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from loramix.analysis import RoutingRecorder, summarize

__all__ = ["RouterAuxLossMixin", "RouterStatsCallback", "add_router_stats_callback", "with_router_aux_loss"]


class RouterStatsCallback(TrainerCallback):
    """Adds router metrics to every training log of a ``Trainer``.

    Logged keys, each averaged over the training forward passes since the previous log (and over
    processes in distributed training):

    * ``aux_loss``: the unweighted router balance loss ``outputs.aux_loss`` (MoR: Switch loss per token,
      MiLoRA: per prompt, paper Eq. 4-5), present when ``router_aux_loss_coef > 0``;
    * ``router_entropy``: mean router entropy in nats over layers (``log N``: uniform routing);
    * ``router_balance``: Switch balance ``N · Σ f_i p̂_i``, mean over layers (1: balanced, N: collapsed);
    * ``router_max_usage``: the largest share of rows any expert gets, mean over layers.

    With ``per_layer=True`` it also logs ``router_entropy/<layer>`` and ``router_balance/<layer>``.
    Statistics are read from the routers' own records of each forward (no extra router product);
    ``every_n_steps=n`` gathers them on every n-th optimizer step only (``aux_loss`` is recorded on
    every step). An adapter without a learnable
    router (plain LoRA, MoR ``router="mean"``) makes the callback warn once and log nothing.

    Reporting integrations (TensorBoard, W&B, ...) see these values only if this callback runs before
    them: use :func:`add_router_stats_callback`, which puts it first. ``trainer.state.log_history`` and
    the console logs always have them.
    """

    def __init__(self, adapter_name: str | None = None, per_layer: bool = False, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.adapter_name = adapter_name
        self.per_layer = per_layer
        self.every_n_steps = every_n_steps
        self.recorder: RoutingRecorder | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        """Attach a :class:`~loramix.analysis.RoutingRecorder` to the trainer's model."""
        if model is None:
            return
        if self.recorder is not None:
            self.recorder.detach()
        try:
            self.recorder = RoutingRecorder(model, self.adapter_name, training_only=True).attach()
        except ValueError as err:  # not a routed loramix adapter (plain LoRA, MoR router="mean", ...)
            warnings.warn(f"RouterStatsCallback logs nothing: {err}", stacklevel=2)
            self.recorder = None

    def on_step_begin(self, args, state, control, **kwargs: Any):
        """Switch router statistics on for every ``every_n_steps``-th optimizer step."""
        if self.recorder is not None:
            # Router statistics only every n-th step (aux_loss always): their cost then vanishes on long runs.
            self.recorder.record_routing = state.global_step % self.every_n_steps == 0

    def on_train_end(self, args, state, control, **kwargs: Any):
        """Remove the hooks."""
        if self.recorder is not None:
            self.recorder.detach()

    def metrics(self) -> dict[str, float]:
        """The metrics since the last reset (without averaging over processes)."""
        if self.recorder is None:
            return {}
        metrics: dict[str, float] = {}
        aux = self.recorder.mean_aux_loss()
        if aux is not None:
            metrics["aux_loss"] = aux.item()
        stats = self.recorder.summary()
        if stats["rows"]:
            summary = summarize(stats)
            metrics["router_entropy"] = summary["entropy"]
            metrics["router_balance"] = summary["balance"]
            metrics["router_max_usage"] = summary["max_usage"]
            if self.per_layer:
                for layer, entropy, balance in zip(stats["layers"], stats["entropy"], stats["balance"], strict=True):
                    if entropy is not None:
                        metrics[f"router_entropy/{layer}"] = entropy
                        metrics[f"router_balance/{layer}"] = balance
        return metrics

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        """Add the metrics since the previous log to ``logs`` and to ``state.log_history``, then reset."""
        # Training logs carry "loss"; evaluation logs carry "eval_loss" and are left alone.
        if self.recorder is None or logs is None or "loss" not in logs:
            return
        metrics = _mean_over_processes(self.metrics(), args)
        self.recorder.reset()
        if not metrics:
            return
        logs.update(metrics)
        # Trainer appends a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def _mean_over_processes(metrics: dict[str, float], args) -> dict[str, float]:
    """Average ``metrics`` over the processes of a distributed run (every process logs the same keys)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return metrics
    world = torch.distributed.get_world_size()
    if world == 1:
        return metrics
    keys = sorted(metrics)
    # The key sets agree on every process (same model, same steps); their count is checked first.
    device = getattr(args, "device", torch.device("cpu"))
    count = torch.tensor([float(len(keys))], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    if any(c.item() != len(keys) for c in counts):
        return metrics
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    return {k: v / world for k, v in zip(keys, values.tolist(), strict=True) if not math.isnan(v)}


def add_router_stats_callback(trainer, **kwargs: Any) -> RouterStatsCallback:
    """Create a :class:`RouterStatsCallback` and make it the trainer's *first* callback, so that the
    reporting integrations (TensorBoard, W&B, ...) log its metrics too. Returns the callback."""
    callback = RouterStatsCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


class RouterAuxLossMixin:
    """Trainer mixin: optimise ``router_aux_loss_coef * aux_loss`` when the trainer's own loss lacks it.

    A loramix model adds the weighted aux loss to ``outputs.loss``. Trainers that compute the loss
    themselves (TRL's ``SFTTrainer`` from the log-probabilities of its fused LM head, ``Trainer`` with
    label smoothing or ``compute_loss_func``) drop it. This mixin watches the forward passes of
    ``compute_loss``; if the loss returned is not the model's own ``outputs.loss`` tensor, it adds the
    weighted aux loss of the forward passes that carry a gradient, divided by the gradient-accumulation
    steps when the loss is normalised over the accumulated batch (as TRL does for MoE models). With a
    plain ``Trainer`` nothing is added twice. Put it first: ``class T(RouterAuxLossMixin, SFTTrainer)``.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The parent's loss, plus ``router_aux_loss_coef * aux_loss`` if it does not contain it yet."""
        captured: list[Any] = []
        unwrapped = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        handle = unwrapped.register_forward_hook(lambda module, args, outputs: captured.append(outputs))
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        if any(_get(out, "loss") is loss for out in captured):
            return result  # the model's loss, aux term included
        extra = [
            _get(out, "aux_loss")
            for out in captured
            if isinstance(_get(out, "aux_loss"), torch.Tensor) and _get(out, "aux_loss").requires_grad
        ]
        if not extra:
            return result
        coef = _aux_coef(unwrapped)
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        loss = loss + coef * torch.stack(extra).mean().to(loss.dtype) / steps
        return (loss, outputs) if return_outputs else loss


def _get(outputs: Any, key: str) -> Any:
    if isinstance(outputs, dict):
        return outputs.get(key)
    return getattr(outputs, key, None)


def _aux_coef(model) -> float:
    configs = getattr(model, "peft_config", {}) or {}
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
    coefs = [getattr(configs.get(name), "router_aux_loss_coef", 0.0) for name in active if name in configs]
    return sum(coefs) / len(coefs) if coefs else 0.0


def with_router_aux_loss(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`RouterAuxLossMixin` in front, e.g. ``with_router_aux_loss(trl.SFTTrainer)``."""
    if issubclass(trainer_cls, RouterAuxLossMixin):
        return trainer_cls
    return type(f"{trainer_cls.__name__}WithRouterAuxLoss", (RouterAuxLossMixin, trainer_cls), {})
