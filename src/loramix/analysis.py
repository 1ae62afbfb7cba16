"""Seeing the routers: expert usage, router entropy and load balance of a loramix model.

Statistics come back as plain data (dicts of lists and floats, JSON-serialisable, no pandas);
the plots use matplotlib (``pip install loramix[plots]``), imported only when a plot is drawn.

* **MoR** routes every token: each adapted linear layer has its own router ``G(x) = softmax(W_r x)``
  (MoR paper Eq. 11; the mixture is Eq. 15). A *row* is one (non-padding) token; a *layer* is one adapted module
  (``model.layers.3.mlp.gate_proj``); the experts are the N rank experts ``E1 .. EN``.
* **MiLoRA** routes every prompt: one router per transformer block picks the top-k of the block's
  LoRA modules (MiLoRA paper Eq. 2-3). A row is one prompt, a layer one block, and the experts are
  the block's modules (``q_proj`` ... ``down_proj``).

For every layer the statistics are

* ``usage[e]``: the fraction of rows whose top-k selection contains expert ``e`` (k = 1 for MoR, whose
  router is soft; ``top_k`` for MiLoRA): the papers' "distribution of activated experts";
* ``mean_prob[e]``: the mean router probability of expert ``e`` (MoR paper Fig. 7);
* ``entropy``: the mean per-row entropy of the router distribution, in nats (``log N`` is uniform);
* ``balance``: the Switch-Transformer balance ``N · Σ_e f_e · p̂_e`` over the data, with ``f`` the
  top-1 fractions and ``p̂ = mean_prob`` (Fedus et al. Eq. 4; MiLoRA Eq. 4-5): 1 is perfectly balanced,
  N means every row goes to one expert.

Typical use::

    from loramix.analysis import router_statistics, plot_routing

    stats = router_statistics(model, batches)     # batches: dicts of model inputs, optional "task": [...]
    plot_routing(stats, "out/")                   # out/routing_heatmap.png, out/routing_tasks.png

:class:`RoutingRecorder` is the building block: it accumulates the same statistics from every forward
pass of a model (it is what :class:`loramix.callbacks.RouterStatsCallback` uses during training).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .method import Method, method_of
from .routing import subscribe

__all__ = [
    "RoutingRecorder",
    "plot_routing",
    "plot_routing_heatmap",
    "plot_task_bars",
    "router_statistics",
    "summarize",
]

ALL = "all"  # the key of the statistics over every row, whatever its task


def _peft_config(model: nn.Module, adapter_name: str | None):
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError(
            "router statistics need a loramix PEFT model (from get_peft_model or PeftModel.from_pretrained); "
            f"{type(model).__name__} has no `peft_config`."
        )
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", None)
        if isinstance(adapter_name, (list, tuple)):
            adapter_name = adapter_name[0]
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {sorted(configs)}.")
    return adapter_name, configs[adapter_name]


class _Accumulator:
    """Running sums of one layer's statistics, per task. Tensors stay on the device of the router."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        # per task key: one float64 row [count, Σp (N), Σselected (N), Σtop1 (N), Σentropy]
        self.sums: dict[str, torch.Tensor] = {}

    def add(
        self, probs: torch.Tensor, selected: torch.Tensor, task_ids: torch.Tensor | None, task_names: Sequence[str]
    ) -> None:
        """``probs`` (rows, N) float32; ``selected`` (rows, N) 0/1; ``task_ids`` (rows,) indices into
        ``task_names``, or None. Vectorised: a few kernels per call whatever the number of tasks."""
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1, keepdim=True)
        top1 = torch.nn.functional.one_hot(probs.argmax(-1), self.num_experts).to(probs.dtype)
        ones = probs.new_ones(probs.shape[0], 1)
        stats = torch.cat([ones, probs, selected.to(probs.dtype), top1, entropy], dim=-1).double()  # (rows, 3N+2)
        groups = [(ALL, stats.sum(0))]
        if task_ids is not None and len(task_names):
            per_task = stats.new_zeros(len(task_names), stats.shape[1]).index_add_(0, task_ids, stats)
            groups += [(name, per_task[i]) for i, name in enumerate(task_names)]
        for key, row in groups:
            acc = self.sums.get(key)
            self.sums[key] = row.clone() if acc is None else acc + row

    def _get(self, key: str) -> dict[str, torch.Tensor] | None:
        row = self.sums.get(key)
        if row is None:
            return None
        n = self.num_experts
        return {
            "rows": row[0],
            "prob": row[1 : 1 + n],
            "selected": row[1 + n : 1 + 2 * n],
            "top1": row[1 + 2 * n : 1 + 3 * n],
            "entropy": row[1 + 3 * n],
        }

    def summary(self, key: str) -> dict[str, Any] | None:
        acc = self._get(key)
        if acc is None or acc["rows"].item() == 0:
            return None
        rows = acc["rows"].item()
        mean_prob = (acc["prob"] / rows).cpu()
        top1 = (acc["top1"] / rows).cpu()
        return {
            "rows": int(rows),
            "usage": (acc["selected"] / rows).cpu().tolist(),
            "mean_prob": mean_prob.tolist(),
            "entropy": acc["entropy"].item() / rows,
            "balance": float(self.num_experts * (top1 * mean_prob).sum()),
        }


class RoutingRecorder:
    """Accumulates router statistics from the forward passes of a loramix model.

    ``with RoutingRecorder(model) as rec: model(**batch)`` ... then ``rec.summary()``. It subscribes to the
    records the routers write into each forward's :class:`~loramix.routing.session.RoutingSession` (no router is
    computed twice); forward passes re-run by activation checkpointing during backward record nothing, and
    decoding steps that reuse a prompt's routing neither. Padding (``attention_mask`` 0) is left out.
    Set ``rec.tasks`` to one label per sequence of the next batch for per-task statistics
    (:func:`router_statistics` does it from a ``"task"`` entry of each batch).

    Args:
        model: a ``PeftModel`` (or its ``base_model``) with a MoR or MiLoRA adapter.
        adapter_name: which adapter's routers to watch (default: the active one).
        training_only: count only forward passes in training mode (what the Trainer callback wants).
    """

    def __init__(self, model: nn.Module, adapter_name: str | None = None, training_only: bool = False) -> None:
        self.model = model
        self.adapter_name, self.config = _peft_config(model, adapter_name)
        method = method_of(self.config)
        if method is None or method.router_view is None:
            kind = str(getattr(self.config.peft_type, "value", self.config.peft_type)).lower()
            raise ValueError(f"router statistics are for loramix adapters with routers, not {kind!r}.")
        self.method: str = method.name
        self._view = method.router_view
        self.training_only = training_only
        self.record_routing = True  # False: only aux_loss is recorded (the callback's steps in between)
        self.tasks: Sequence[str] | None = None
        self._layers: dict[str, _Accumulator] = {}
        self._aux_sum: torch.Tensor | None = None
        self._aux_count = 0
        self._handle: Any = None
        self._names: dict[nn.Module, str] = {}
        self._task_names: list[str] = []
        self._task_cache: tuple | None = None
        self.expert_names: list[str] | None = None

    # -- subscription ----------------------------------------------------------------------------
    def attach(self) -> RoutingRecorder:
        """Subscribe to the model's routing records (idempotent)."""
        if self._handle is not None:
            return self
        base = getattr(self.model, "base_model", self.model)
        root = getattr(base, "model", base)
        view = self._view
        routers = {m: n for n, m in root.named_modules() if self.adapter_name in (getattr(m, view.param, None) or {})}
        if not routers:
            raise ValueError(f"adapter {self.adapter_name!r} has no {view.absent} in this model.")
        self._names = {m: view.layer_name(n) for m, n in routers.items()}
        self.expert_names = view.experts(next(iter(routers)), self.adapter_name, self.config)
        self._handle = subscribe(self.model, self._on_forward)
        return self

    def detach(self) -> None:
        """Stop recording; the statistics gathered so far stay."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> RoutingRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _on_forward(self, records: list, outputs: Any) -> None:
        """A forward of the model ran routers (decoding steps that reuse a routing bring no records)."""
        if not (self.model.training or not self.training_only):
            return
        aux = outputs.get("aux_loss") if isinstance(outputs, Mapping) else None
        if isinstance(aux, torch.Tensor):
            aux = aux.detach().float()
            self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux
            self._aux_count += 1
        if not self.record_routing:
            return
        for record in records:
            layer = self._names.get(record.layer)
            if layer is None or record.adapter != self.adapter_name:
                continue
            selected = None if record.selected is None else record.selected.detach().float()
            self._add(layer, record.probs.detach().float(), mask=record.mask, selected=selected)

    def _add(
        self,
        layer: str,
        probs: torch.Tensor,
        mask: torch.Tensor | None,
        k: int = 1,
        selected: torch.Tensor | None = None,
    ) -> None:
        n = probs.shape[-1]
        flat = probs.reshape(-1, n).float()
        if selected is None:
            selected = torch.zeros_like(flat).scatter_(-1, flat.topk(min(k, n), dim=-1).indices, 1.0)
        selected = selected.reshape(-1, n)
        task_ids = self._task_ids(probs.shape[:-1], flat.device)
        if mask is not None and mask.numel() == flat.shape[0]:
            keep = mask.reshape(-1).to(device=flat.device, dtype=torch.bool)
            flat, selected = flat[keep], selected[keep]
            task_ids = None if task_ids is None else task_ids[keep]
        self._layers.setdefault(layer, _Accumulator(n)).add(flat, selected, task_ids, self._task_names)

    def _task_ids(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """Row -> task index for rows of ``shape`` (B,) or (B, T); cached for the layers of one forward."""
        tasks = self.tasks
        if tasks is None or len(shape) == 0 or shape[0] != len(tasks):
            return None  # no labels, or labels that do not match the rows (packed batches): overall only
        key = (id(tasks), tuple(shape), device)
        if self._task_cache is not None and self._task_cache[0] == key:
            return self._task_cache[1]
        for task in tasks:
            if task not in self._task_names:
                self._task_names.append(task)
        ids = torch.tensor([self._task_names.index(t) for t in tasks], device=device)
        if len(shape) == 2:
            ids = ids.repeat_interleave(shape[1])
        self._task_cache = (key, ids, tasks)  # keep `tasks` alive so that its id is not reused
        return ids

    # -- results ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the statistics gathered so far."""
        self._layers.clear()
        self._aux_sum, self._aux_count = None, 0

    def mean_aux_loss(self) -> torch.Tensor | None:
        """Mean ``outputs.aux_loss`` over the recorded forward passes (a 0-d tensor), or None."""
        return None if self._aux_sum is None else self._aux_sum / self._aux_count

    def summary(self) -> dict[str, Any]:
        """The statistics gathered so far as plain data; see the module docstring and :func:`summarize`."""
        layers = list(self._layers)
        result: dict[str, Any] = {
            "method": self.method,
            "unit": self._view.unit,
            "adapter": self.adapter_name,
            "num_experts": len(self.expert_names or []),
            "expert_names": list(self.expert_names or []),
            "top_k": self._view.top_k(self.config),
            "layers": layers,
        }
        result.update(_group(self._layers, layers, ALL))
        task_keys = [k for acc in self._layers.values() for k in acc.sums if k != ALL]
        result["tasks"] = {task: _group(self._layers, layers, task) for task in dict.fromkeys(task_keys)}
        aux = self.mean_aux_loss()
        result["aux_loss"] = None if aux is None else aux.item()
        if not result["expert_names"] and self._layers:
            result["expert_names"] = [f"E{i + 1}" for i in range(next(iter(self._layers.values())).num_experts)]
            result["num_experts"] = len(result["expert_names"])
        return result


def _group(layers: Mapping[str, _Accumulator], names: list[str], key: str) -> dict[str, Any]:
    per_layer = [layers[name].summary(key) for name in names]
    present = [s for s in per_layer if s is not None]
    return {
        "rows": max((s["rows"] for s in present), default=0),
        "usage": [s["usage"] if s else None for s in per_layer],
        "mean_prob": [s["mean_prob"] if s else None for s in per_layer],
        "entropy": [s["entropy"] if s else None for s in per_layer],
        "balance": [s["balance"] if s else None for s in per_layer],
    }


def _method(stats: Mapping[str, Any]) -> Method:
    method = method_of(stats["method"])
    if method is None or method.router_view is None:
        raise ValueError(f"statistics of an unknown method {stats['method']!r}; was its package imported?")
    return method


def router_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``batches`` (no grad, eval mode) and return its router statistics as plain data.

    Args:
        model: a ``PeftModel`` with a MoR or MiLoRA adapter.
        batches: dicts of model inputs (``input_ids``, ``attention_mask``, ...). A ``"task"`` entry (one
            label per sequence) adds per-task statistics; it is removed before the forward pass.
        adapter_name: the adapter whose routers to read (default: the active one).

    Returns:
        ``{"method", "unit", "adapter", "num_experts", "expert_names", "top_k", "layers", "rows",
        "usage", "mean_prob", "entropy", "balance", "tasks": {task: {...}}, "aux_loss"}`` where
        ``usage`` and ``mean_prob`` are ``layers x experts`` lists and ``entropy``/``balance`` one value
        per layer (module docstring); ``tasks`` repeats ``rows`` to ``balance`` per task label.
    """
    was_training = model.training
    model.eval()
    recorder = RoutingRecorder(model, adapter_name)
    try:
        with recorder, torch.no_grad():
            for batch in batches:
                batch = dict(batch)
                tasks = batch.pop("task", None)
                recorder.tasks = [tasks] * len(batch["input_ids"]) if isinstance(tasks, str) else tasks
                device = next(model.parameters()).device
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    finally:
        model.train(was_training)
    return recorder.summary()


def summarize(stats: Mapping[str, Any]) -> dict[str, Any]:
    """One number per statistic, averaged over layers: ``{"entropy", "normalized_entropy", "balance",
    "max_usage"}`` (``max_usage``: the largest share any expert gets, averaged over layers)."""
    entropies = [e for e in stats["entropy"] if e is not None]
    balances = [b for b in stats["balance"] if b is not None]
    usages = [max(u) for u in stats["usage"] if u]
    n = stats["num_experts"]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "entropy": mean(entropies),
        "normalized_entropy": mean(entropies) / math.log(n) if n > 1 else float("nan"),
        "balance": mean(balances),
        "max_usage": mean(usages),
    }


# -- plots -----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'loramix[plots]'") from err
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _short(layer: str) -> str:
    """``base_model.model.model.layers.3.mlp.gate_proj`` -> ``3.gate_proj``; block names -> ``3``."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            tail = parts[-1] if i < len(parts) - 1 else ""
            return f"{part}.{tail}" if tail else part
    return layer


def _expert_labels(stats: Mapping[str, Any], count: int) -> list[str]:
    """Expert names for axes: MiLoRA's ``self_attn.q_proj`` -> ``q_proj``."""
    names = stats["expert_names"] or [f"E{i + 1}" for i in range(count)]
    return [str(n).rsplit(".", 1)[-1] for n in names]


def plot_routing_heatmap(
    stats: Mapping[str, Any],
    path: str | Path,
    value: str = "usage",
    task: str | None = None,
    modules: str | Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save a ``layers x experts`` heatmap of ``value`` (``"usage"`` or ``"mean_prob"``) as a PNG.

    Like MiLoRA's Fig. 2 (distribution of activated experts across layers). ``task`` restricts it to
    one task's rows; ``modules`` keeps only layers whose name contains one of these strings (MoR:
    e.g. ``"gate_proj"``, one router per block as in MoR's Fig. 7). Returns the path written.
    """
    if value not in ("usage", "mean_prob"):
        raise ValueError(f"value must be 'usage' or 'mean_prob', got {value!r}.")
    group = stats if task is None else stats["tasks"][task]
    names = list(stats["layers"])
    rows = [(n, r) for n, r in zip(names, group[value], strict=True) if r is not None]
    if modules is not None:
        wanted = [modules] if isinstance(modules, str) else list(modules)
        rows = [(n, r) for n, r in rows if any(w in n for w in wanted)]
    if not rows:
        raise ValueError("no layer has router statistics to plot (were any routed rows recorded?).")
    import numpy as np

    data = np.array([r for _, r in rows], dtype=float)
    experts = _expert_labels(stats, data.shape[1])
    fig = _figure(2.6 + 0.6 * data.shape[1], max(3.2, 1.6 + 0.2 * data.shape[0]))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-9))
    ax.set_xticks(range(len(experts)), experts, rotation=45 if len(max(experts, key=len)) > 3 else 0, ha="right")
    step = max(1, len(rows) // 40)
    ax.set_yticks(range(0, len(rows), step), [_short(n) for n, _ in rows][::step], fontsize=7)
    ax.set_xlabel(_method(stats).router_view.expert_label)
    ax.set_ylabel("layer")
    label = {"usage": f"share of {stats['unit']}s routed (top-{stats['top_k']})", "mean_prob": "mean router weight"}
    fig.colorbar(image, ax=ax, label=label[value], fraction=0.05)
    scope = f" — task {task}" if task else ""
    ax.set_title(title or f"{_method(stats).display_name} routing per layer{scope}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_task_bars(
    stats: Mapping[str, Any],
    path: str | Path,
    layer: int | str = -1,
    value: str = "mean_prob",
    title: str | None = None,
) -> Path:
    """Save grouped bars of ``value`` per expert, one bar per task, for one layer, as a PNG.

    Like MoR's Fig. 7 (router weights of one layer's gate on different tasks). ``layer`` is an index
    into ``stats["layers"]``, a layer name (or a unique part of one), or ``"mean"`` for the average
    over layers. Needs per-task statistics (a ``"task"`` entry in the batches).
    """
    tasks = list(stats["tasks"])
    if not tasks:
        raise ValueError("no per-task statistics: give each batch a 'task' entry (one label per sequence).")
    names = list(stats["layers"])

    def pick(values):
        if layer == "mean":
            present = [v for v in values if v is not None]
            return [sum(col) / len(present) for col in zip(*present, strict=True)]
        if isinstance(layer, int):
            return values[layer]
        matches = [i for i, n in enumerate(names) if layer == n or layer in n]
        if len(matches) != 1:
            raise ValueError(f"layer {layer!r} matches {len(matches)} layers; give an index or a unique name.")
        return values[matches[0]]

    experts = _expert_labels(stats, stats["num_experts"])
    width = 0.8 / len(tasks)
    fig = _figure(max(5.0, 0.45 * len(experts) * max(2, len(tasks)) / 2 + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for j, task in enumerate(tasks):
        values = pick(stats["tasks"][task][value])
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(values))]
        ax.bar(xs, values, width=width, label=task)
    ax.set_xticks(range(len(experts)), experts)
    ax.set_xlabel(_method(stats).router_view.expert_label)
    ax.set_ylabel({"usage": f"share of {stats['unit']}s routed", "mean_prob": "mean router weight"}[value])
    where = (
        "mean over layers" if layer == "mean" else "layer " + _short(names[layer] if isinstance(layer, int) else layer)
    )
    ax.set_title(title or f"{_method(stats).display_name} routing per task ({where})", fontsize=10)
    top = max(max(pick(stats["tasks"][task][value])) for task in tasks)
    ax.set_ylim(0, top * 1.3 if top > 0 else 1)  # room for the legend above the bars
    ax.legend(fontsize=8, ncols=min(4, len(tasks)), loc="upper center")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_routing(stats: Mapping[str, Any], out_dir: str | Path, prefix: str = "routing") -> dict[str, Path]:
    """Write the heatmap (``<prefix>_heatmap.png``) and, with tasks, the per-task bars of the last layer
    (``<prefix>_tasks.png``) into ``out_dir``; returns ``{"heatmap": path, "tasks": path}``. A model with a router
    per adapted module (MoR) and more than 40 of them gets one heatmap row per block (its first module kind)."""
    out_dir = Path(out_dir)
    modules = None
    if _method(stats).router_view.per_module and len(stats["layers"]) > 40:
        # One row per block, like the paper's figures: keep one module kind (the first, e.g. gate_proj).
        modules = "." + stats["layers"][0].rsplit(".", 1)[-1]
    paths = {"heatmap": plot_routing_heatmap(stats, out_dir / f"{prefix}_heatmap.png", modules=modules)}
    if stats["tasks"]:
        paths["tasks"] = plot_task_bars(stats, out_dir / f"{prefix}_tasks.png", layer=-1)
    return paths
