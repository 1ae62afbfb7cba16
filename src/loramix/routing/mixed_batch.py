"""Mixed-adapter batches: PEFT's ``adapter_names=[...]``, one adapter per row, for loramix methods.

``model(**inputs, adapter_names=names)`` and ``model.generate(**inputs, adapter_names=names)`` (a
``PeftModel`` holding several adapters of one loramix method) compute each row with its own adapter;
``"__base__"`` rows get the base model. As in PEFT, it is for inference only. The flow::

    tuner (_enable_peft_forward_hooks)  checks the names (check_adapter_names) and opens adapters_per_row()
    routing session (each forward)      turns them into the batch's AdapterRows (expanding them for beams)
    MoR layer / MiLoRA router + expert  compute each adapter on its rows only, never a loop over rows:
                                        the layers' adapters together, in one grouped computation
                                        (``grouped_mor``, ``grouped_lora``), routers per adapter group

Each row equals that row run alone with ``set_adapter(name)``; a MiLoRA row is routed by its own
adapter's routers, once per prompt, and keeps that routing for the whole ``generate`` call.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "BASE",
    "AdapterRows",
    "adapters_per_row",
    "check_adapter_names",
    "check_names_per_input",
    "padding_fits",
    "rows_for_batch",
]

BASE = "__base__"  # PEFT's name for "no adapter on this row"
# Token rows of padding a grouped computation may add whatever the batch (see padding_fits): at most 64 MiB of
# extra activations per layer at width 4096 in float32; decoding steps (one token per row) of any batch under
# 4096 rows stay within it.
PADDING_BUDGET = 4096

_PER_ROW: contextvars.ContextVar[Requested | None] = contextvars.ContextVar("loramix_adapter_names", default=None)


class AdapterRows:
    """The adapter of each row of one batch, grouped by adapter.

    ``names`` has one entry per row; :meth:`groups` gives, per adapter other than ``"__base__"``, the
    (sorted) indices of its rows on a device. Built once per ``generate`` call (or forward), so decoding
    steps reuse the index tensors.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        rows: dict[str, list[int]] = {}
        for index, name in enumerate(self.names):
            if name != BASE:
                rows.setdefault(name, []).append(index)
        self.host = {name: tuple(indices) for name, indices in rows.items()}
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return len(self.names)

    def groups(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """``{adapter: rows}`` with ``rows`` a long tensor on ``device``, or ``None`` when the adapter has every
        row (then layers take their plain path, without gathering); ``"__base__"`` rows are in none."""
        on = self._on.get(device)
        if on is None:
            every = tuple(range(self.batch_size))
            on = {
                name: None if rows == every else torch.tensor(rows, dtype=torch.long, device=device)
                for name, rows in self.host.items()
            }
            self._on[device] = on
        return on

    def check_batch(self, batch: int, where: str) -> None:
        if batch != self.batch_size:
            raise RuntimeError(
                f"loramix: {where} got a batch of {batch} rows, but `adapter_names` assigns adapters to "
                f"{self.batch_size} rows; the rows cannot be matched to their adapters."
            )


class Requested:
    """What the caller asked for: ``names`` (one per prompt) and the factors generation may expand them by."""

    __slots__ = ("names", "expansions")

    def __init__(self, names: tuple[str, ...], expansions: frozenset[int]) -> None:
        self.names, self.expansions = names, expansions


def check_adapter_names(names: Any, known: Sequence[str], training: bool, merged: Sequence[str]) -> tuple[str, ...]:
    """PEFT's rules for ``adapter_names``, checked before anything runs; returns the names as a tuple."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`adapter_names` must be a list of adapter names (str), one per row; got {names!r}.")
    if not names:
        raise ValueError("`adapter_names` is empty; give one adapter name (or '__base__') per row.")
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call `model.eval()` first.")
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. This model has {list(known)} "
            f"(and '{BASE}' for the base model)."
        )
    if merged:
        raise ValueError(
            f"Cannot pass `adapter_names` when there are merged adapters ({sorted(set(merged))}), please call "
            "`unmerge_adapter` first."
        )
    return tuple(names)


def check_names_per_input(names: Sequence[str], inputs: int | None) -> None:
    """One adapter name per input (prompt), as PEFT's LoRA requires: beams and returned sequences of a prompt
    always share its adapter, so a list sized for them is refused."""
    if inputs is not None and len(names) != inputs:
        raise ValueError(
            f"Length of `adapter_names` should be the same as the number of inputs, but got {len(names)} and {inputs} "
            "respectively."
        )


def generation_expansions(kwargs: dict[str, Any], generation_config: Any) -> frozenset[int]:
    """The factors by which ``generate`` may repeat each prompt (``repeat_interleave``): beams, returned sequences.

    Read from the call's ``num_beams`` / ``num_return_sequences`` / ``generation_config`` arguments, else the
    model's generation config. A plain forward passes none of them, so its batch must match the names exactly
    (unless the model's generation config itself asks for beams; the copies check still applies).
    """
    config = kwargs.get("generation_config") or generation_config
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return frozenset({1, int(beams), int(returned), max(int(beams), int(returned))})


@contextmanager
def adapters_per_row(names: tuple[str, ...], expansions: frozenset[int] = frozenset({1})) -> Iterator[None]:
    """Within this context, the adapted model's forwards compute row ``i`` with adapter ``names[i]``."""
    token = _PER_ROW.set(Requested(names, expansions))
    try:
        yield
    finally:
        _PER_ROW.reset(token)


def requested() -> Requested | None:
    """The ``adapter_names`` of the call being computed in this thread, if any."""
    return _PER_ROW.get()


def rows_for_batch(request: Requested, tokens: torch.Tensor | None, attention_mask: Any) -> AdapterRows:
    """The :class:`AdapterRows` of the first forward of a call, whose input is ``tokens`` (B, T[, d]).

    ``generate`` repeats each prompt ``k`` times in a row for beams and returned sequences; the names are
    repeated the same way, after checking that the rows really are ``k`` copies of each prompt (a routing
    that cannot be matched raises rather than mixing rows up).
    """
    names = request.names
    batch = None if tokens is None else tokens.shape[0]
    if batch is None or batch == len(names):
        return AdapterRows(names)
    factor, rest = divmod(batch, len(names))
    if rest or factor not in request.expansions:
        raise ValueError(
            f"Length of `adapter_names` should be the same as the number of inputs, but got {len(names)} and {batch} "
            "respectively."
        )
    for value in (tokens, attention_mask):
        if isinstance(value, torch.Tensor) and value.shape[0] == batch:
            grouped = value.reshape(len(names), factor, *value.shape[1:])
            if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
                raise ValueError(
                    f"loramix: the batch has {batch} rows for {len(names)} `adapter_names`, but its rows are not "
                    f"{factor} consecutive copies of each prompt (as generate makes for beams), so the rows cannot "
                    "be matched to their adapters."
                )
    return AdapterRows([name for name in names for _ in range(factor)])


def padding_fits(sizes: Sequence[int], tokens_per_row: int) -> bool:
    """Whether computing adapters of ``sizes`` rows together, each padded to the largest, is worth it.

    The grouped computations (MoR's ``grouped_mor``, MiLoRA's ``grouped_lora`` in PyTorch) pad every adapter
    to the largest group. The padding may add as many token rows as are real, or ``PADDING_BUDGET``; beyond
    that (very uneven groups at a long prefill) each adapter runs on its own rows, so activations never grow
    with the busiest adapter times the number of adapters.
    """
    padding = (len(sizes) * max(sizes) - sum(sizes)) * tokens_per_row
    return padding <= max(sum(sizes) * tokens_per_row, PADDING_BUDGET)
