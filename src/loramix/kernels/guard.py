"""The guard of the ``auto`` backend: a kernel is trusted on a device only after it matched PyTorch there.

The Triton kernels were verified under Triton's CPU interpreter and compiled for sm_90 by ptxas, but a
GPU can still miscompile or mis-execute them (triton-lang/triton issue 9433 is one such SM90 bug in this
family of kernels). So the first time a kernel family runs for a given *key* —

    (family, device, compute capability, dtype, training / inference, variant)

where the variant holds what changes the compiled kernel (rank, expert count, router, extra inputs, and the
class of each size Triton specialises its integer arguments on: 1, a multiple of 16, or neither) —
:func:`run` runs the kernel and the PyTorch maths (:mod:`loramix.kernels.reference`) on the same inputs,
forward and, in training, backward, and compares them within a tolerance derived from the dtype
(:func:`tolerance`). On a mismatch, an exception or a compile failure it warns once
(:class:`KernelFallbackWarning`, naming kernel, device, dtype and the error) and that key uses the
PyTorch path for the rest of the process; otherwise the kernel runs from then on without further checks.
Decisions are kept per process (:func:`decisions`, :func:`reset`).

The inputs of the check are the call's shapes, dtypes and flags with values drawn by the guard
(seeded), not the caller's tensors: a freshly initialised LoRA has ``B = 0``, which would make the
forward comparison vacuous, and in-place kernels must not touch the caller's output twice. Long
token dimensions are shortened (:data:`CHECK_TOKENS`), keeping their remainder modulo 16 (which Triton
specialises on), so the check's memory stays small next to the real call. The reference runs in
float64 with autocast off: what is measured is the kernel's own rounding, not PyTorch's.

The first call of each key pays for the check: one extra kernel call, its backward in training, the
float64 reference and a device synchronisation (section ``guard`` of ``benchmarks/gpu_check.py`` measures
it). Later calls pay one small-tuple dictionary look-up (a few µs of host time). Under ``torch.compile`` the
check itself runs eagerly (a graph break, first call only).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference
from .hardware import capability

logger = logging.getLogger("loramix.kernels")

FAMILIES = ("mor_linear", "segmented_lora", "grouped_lora")

#: Token rows (MoR) / tokens per sequence (segmented, grouped) of the check's inputs, before the remainder mod 16.
CHECK_TOKENS = {"mor_linear": 512, "segmented_lora": 64, "grouped_lora": 64}

#: Headroom of :func:`tolerance` over the rounding expected from a correct kernel (see there).
SAFETY = 8.0

_SEED = 1234


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed its first-use check under ``LORAMIX_KERNELS=auto``: the PyTorch path replaces it."""


@dataclass(frozen=True)
class GuardKey:
    """What a decision holds for: one kernel family on one device, dtype, mode and compiled variant."""

    family: str
    device: str
    capability: tuple[int, int] | None
    dtype: str
    mode: str  # "training" (forward and backward checked) or "inference"
    variant: str

    def describe(self) -> str:
        cap = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        return f"{self.family} on {self.device}{cap}, {self.dtype}, {self.mode} ({self.variant})"


@dataclass
class Decision:
    """The verdict of one check: ``use_kernel``, and the evidence."""

    key: GuardKey
    use_kernel: bool
    reason: str
    errors: dict[str, float] = field(default_factory=dict)  # relative error of each output / gradient
    tolerance: float = 0.0
    seconds: float = 0.0  # wall time of the check (kernel compile included on a cold cache)

    def as_dict(self) -> dict:
        return {
            "key": self.key.describe(),
            "family": self.key.family,
            "device": self.key.device,
            "capability": self.key.capability,
            "dtype": self.key.dtype,
            "mode": self.key.mode,
            "variant": self.key.variant,
            "use_kernel": self.use_kernel,
            "reason": self.reason,
            "errors": self.errors,
            "tolerance": self.tolerance,
            "seconds": self.seconds,
        }


_decisions: dict[GuardKey, Decision] = {}
_fast: dict[tuple, Decision] = {}  # a call's cheap key -> its decision: the hot path's one dictionary look-up
_lock = threading.RLock()


def decisions() -> dict[GuardKey, Decision]:
    """The decisions taken so far in this process (a copy)."""
    with _lock:
        return dict(_decisions)


def reset() -> None:
    """Forget every decision: the next call of each key is checked again (tests, benchmarks)."""
    with _lock:
        _decisions.clear()
        _fast.clear()


# --------------------------------------------------------------------------------------------- tolerance


def product_eps(compute_dtype: torch.dtype, device: torch.device) -> float:
    """Machine epsilon of the tile products' operands: the half dtype's, TF32's where PyTorch allows TF32
    matmuls on CUDA (the kernels then use it too), else float32's."""
    if compute_dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(compute_dtype).eps
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-10  # TF32 keeps 10 mantissa bits
    return torch.finfo(torch.float32).eps


def tolerance(compute_dtype: torch.dtype, device: torch.device, reduction: int) -> float:
    """The relative error (:func:`relative_error`, against float64) a correct kernel stays within::

        tol = SAFETY · (ε_p + ε_32 · √K)

    ``ε_p`` (:func:`product_eps`): every tile product rounds its operands once to the compute dtype, and
    the kernels round a few intermediates (``y``, ``B_eff``, the output) the same way; with float32
    accumulation this is a relative error of a few ``ε_p`` whatever the reduction length. ``ε_32 · √K``:
    float32 accumulation over the longest reduction ``K`` of the family (random-sign rounding errors of a
    K-term sum grow like √K). ``SAFETY = 8`` covers the few roundings in series (the correct kernels measure
    0.2-1 ``ε_p`` under Triton's interpreter; ``benchmarks/gpu_check.py`` reports the margins on a GPU) and
    stays far below what a miscompiled tile or a race gives (O(1) relative errors, NaN). bfloat16: 0.0625, float16: 0.008, float32 (IEEE) at K = 11008: 1e-4.
    """
    return SAFETY * (product_eps(compute_dtype, device) + torch.finfo(torch.float32).eps * math.sqrt(reduction))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The larger of the normwise and the largest-element relative errors, in float64; inf if not finite.

    ``max(‖a − e‖_F / ‖e‖_F, ‖a − e‖_∞ / ‖e‖_∞)``: the Frobenius ratio measures the rounding spread over the
    whole tensor, the max-norm ratio catches a single wrong tile or element, which a Frobenius norm over a
    large output dilutes (one bad 64 x 64 tile of a 512 x 11008 output is 3% in Frobenius norm). Absolute
    errors where ``expected`` is all zeros.
    """
    a, e = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    diff = a - e
    worst = 0.0
    for order in ("fro", math.inf):
        scale = torch.linalg.vector_norm(e, ord=2 if order == "fro" else order).item()
        err = torch.linalg.vector_norm(diff, ord=2 if order == "fro" else order).item()
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


# --------------------------------------------------------------------------------------------- keys


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _dtype_label(x: torch.Tensor, weight: torch.Tensor) -> str:
    compute = _compute_dtype(x)
    label = str(compute).removeprefix("torch.")
    if x.dtype != compute or weight.dtype != compute:
        kinds = sorted({str(x.dtype).removeprefix("torch."), str(weight.dtype).removeprefix("torch.")})
        label += f" (autocast from {'/'.join(kinds)})" if x.dtype != compute else f" (weights {'/'.join(kinds)})"
    return label


# ``torch.is_autocast_enabled(device)`` costs microseconds; this private flag is what ``torch.autocast`` reads
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, or ``None`` (the hot path: cheap when autocast is off)."""
    if _any_autocast() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _requires_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad


def _training(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _base_key(family: str, x: torch.Tensor, weight: torch.Tensor, mode: str, variant: str) -> GuardKey:
    device = str(x.device)
    if x.device.type == "cuda" and x.device.index is None:
        device = f"cuda:{torch.cuda.current_device()}"
    return GuardKey(family, device, capability(x.device), _dtype_label(x, weight), mode, variant)


def _int_class(n: int) -> int:
    """What Triton specialises an integer argument on: 1, a multiple of 16 (16), or neither (0)."""
    return 1 if n == 1 else (16 if n % 16 == 0 else 0)


def _classes(**sizes: int) -> str:
    """``"T%16=0, d_in=1, ..."``: the specialisation class of each size, for a key's description."""
    names = {1: "=1", 16: "%16=0", 0: "%16≠0"}
    return ", ".join(f"{name}{names[_int_class(n)]}" for name, n in sizes.items())


def _fit(n: int, cap: int) -> int:
    """``n`` shortened to about ``cap`` with the same remainder mod 16 (Triton specialises integers on it)."""
    return n if n <= cap + 16 else cap + n % 16


# --------------------------------------------------------------------------------------------- families


def _positions(signature: inspect.Signature, *names: str) -> tuple[tuple[int, str], ...]:
    """``(index, name)`` of the parameters ``names`` of ``signature``: what :func:`_pick` reads of a call."""
    order = list(signature.parameters)
    return tuple((order.index(name), name) for name in names)


def _pick(args: tuple, kwargs: dict, positions: tuple[tuple[int, str], ...]) -> list:
    """The arguments at ``positions`` (:func:`_positions`) of a call, each given by position or by name (``None``
    if not given), without binding the signature (the hot path: a loop is faster than a comprehension here)."""
    given, picked = len(args), []
    for index, name in positions:
        picked.append(args[index] if index < given else kwargs.get(name))
    return picked


class _Family:
    """How to key, feed and compare one kernel family. Subclasses fill in the hooks."""

    name = ""
    signature: inspect.Signature

    def __init__(self, kernel: Callable) -> None:
        self.kernel = kernel

    def bind(self, args: tuple, kwargs: dict) -> dict:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    @staticmethod
    def fast_key(args: tuple, kwargs: dict) -> tuple | None:
        """A cheap hashable key of the call (every call computes it), or ``None`` to call the kernel unchecked:
        a call that launches nothing, or one the kernel refuses (its error is the caller's)."""
        raise NotImplementedError

    def key(self, a: dict) -> GuardKey:
        """The descriptive key of a call (built once per decision)."""
        raise NotImplementedError

    def launches(self, a: dict) -> bool:
        """Whether the call launches anything: a call that does not teaches nothing (checked once per key)."""
        return True

    def check(self, a: dict, training: bool, max_tokens: int | None = None) -> tuple[dict[str, float], float]:
        """Run kernel and float64 reference on inputs drawn for the call (forward; backward too in training);
        return the relative error of each output / gradient and the tolerance. ``max_tokens``: the token
        dimension's cap (default :data:`CHECK_TOKENS`)."""
        raise NotImplementedError


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_SEED)


def _randn(g: torch.Generator, shape, like: torch.Tensor, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    out = torch.randn(*shape, generator=g, device=like.device, dtype=torch.float32)
    return (mean + scale * out).to(like.dtype)


class _MoR(_Family):
    name = "mor_linear"
    signature = inspect.signature(reference.mor_linear)
    _FAST = _positions(signature, "x", "lora_A", "lora_B", "omega_A", "omega_B", "router", "x_router", "residual")

    @staticmethod
    def fast_key(args: tuple, kwargs: dict) -> tuple | None:
        x, lora_A, lora_B, omega_A, omega_B, router, x_router, residual = _pick(args, kwargs, _MoR._FAST)
        if x.numel() == 0:
            return None
        training = torch.is_grad_enabled() and (
            lora_A.requires_grad or lora_B.requires_grad or omega_A.requires_grad or omega_B.requires_grad
            or x.requires_grad or (router is not None and router.requires_grad)
            or (x_router is not None and x_router.requires_grad) or (residual is not None and residual.requires_grad)
        )  # fmt: skip
        d_in = x.shape[-1]
        return (
            "mor_linear", x.device, x.dtype, lora_A.dtype, _autocast(x.device.type), training, omega_A.shape,
            router is None, x_router is None or x_router is x, None if residual is None else residual.dtype,
            _int_class(x.numel() // d_in), _int_class(d_in), _int_class(lora_B.shape[0]),
        )  # fmt: skip

    def key(self, a: dict) -> GuardKey:
        x = a["x"]
        tensors = [a[k] for k in ("x", "lora_A", "lora_B", "omega_A", "omega_B", "router", "x_router", "residual")]
        num_experts, rank = a["omega_A"].shape
        variant = f"r={rank} N={num_experts} " + ("router" if a["router"] is not None else "mean router")
        if a["x_router"] is not None and a["x_router"] is not x:
            variant += ", separate router input"
        if a["residual"] is not None:
            variant += f", residual {str(a['residual'].dtype).removeprefix('torch.')}"
        variant += ", " + _classes(T=x.numel() // x.shape[-1], d_in=x.shape[-1], d_out=a["lora_B"].shape[0])
        mode = "training" if _training(*tensors) else "inference"
        return _base_key(self.name, x, a["lora_A"], mode, variant)

    def inputs(self, a: dict, training: bool, max_tokens: int | None) -> dict:
        """The check's inputs: the call's shapes and dtypes, seeded random values of realistic scale."""
        x, lora_A, lora_B, omega_A = a["x"], a["lora_A"], a["lora_B"], a["omega_A"]
        g = _generator(x.device)
        d_in, (d_out, rank), num_experts = x.shape[-1], lora_B.shape, omega_A.shape[0]
        tokens = _fit(x.shape[:-1].numel(), max_tokens or CHECK_TOKENS[self.name])
        c = {
            "x": _randn(g, (tokens, d_in), x),
            "lora_A": _randn(g, (rank, d_in), lora_A, d_in**-0.5),
            "lora_B": _randn(g, (d_out, rank), lora_B, rank**-0.5),
            "omega_A": _randn(g, (num_experts, rank), omega_A, 0.5, 1.0),
            "omega_B": _randn(g, (num_experts, d_out), a["omega_B"], 0.5, 1.0),
            "router": None if a["router"] is None else _randn(g, (num_experts, d_in), a["router"], 2 * d_in**-0.5),
            "x_router": None,
            "residual": None if a["residual"] is None else _randn(g, (tokens, d_out), a["residual"]),
        }
        if a["x_router"] is not None and a["x_router"] is not x:
            c["x_router"] = _randn(g, (tokens, d_in), a["x_router"])
        if training:
            c = {k: (v.requires_grad_() if v is not None else None) for k, v in c.items()}
        c["scaling"] = a["scaling"]
        return c

    def check(self, a: dict, training: bool, max_tokens: int | None = None) -> tuple[dict[str, float], float]:
        c = self.inputs(a, training, max_tokens)
        leaves = [k for k, v in c.items() if isinstance(v, torch.Tensor)]
        x = c["x"]
        # the oracle first, forward and backward: an exception there is the caller's (bad shapes), not the kernel's
        ref = {k: (v.detach().double().requires_grad_(training) if k in leaves else v) for k, v in c.items()}
        with torch.autocast(device_type=x.device.type, enabled=False):
            ref_out, ref_probs = reference.mor_linear(**ref)
        g = _generator(x.device)
        upstream = torch.randn(ref_out.shape, generator=g, device=x.device, dtype=torch.float32)
        upstream_probs = torch.randn(ref_probs.shape, generator=g, device=x.device, dtype=torch.float32)
        use_probs = c["router"] is not None  # the mean router's probabilities are constants

        def loss(out, probs, dtype):
            value = (out.to(dtype) * upstream.to(dtype)).sum()
            return value + (probs.to(dtype) * upstream_probs.to(dtype)).sum() if use_probs else value

        if training:
            expected = torch.autograd.grad(loss(ref_out, ref_probs, torch.float64), [ref[k] for k in leaves])

        def forward():  # anything failing from here on is the kernel's: its outputs may be of any form
            k_out, k_probs = self.kernel(**c)
            return (k_out, k_probs), {
                "out": relative_error(k_out, ref_out),
                "probs": relative_error(k_probs, ref_probs),
            }

        (k_out, k_probs), errors = _stage("kernel forward", forward)
        if training:

            def backward():
                grads = torch.autograd.grad(loss(k_out, k_probs, torch.float32), [c[k] for k in leaves])
                return {f"grad {n}": relative_error(a, e) for n, a, e in zip(leaves, grads, expected, strict=True)}

            errors.update(_stage("kernel backward", backward))
        d_in, d_out = x.shape[-1], c["lora_B"].shape[0]
        reduction = max(d_in, d_out, x.shape[0], c["omega_A"].numel())
        return errors, tolerance(_compute_dtype(x), x.device, reduction)


class _Segmented(_Family):
    name = "segmented_lora"
    signature = inspect.signature(reference.segmented_lora)
    _FAST = _positions(signature, "x", "lora_A", "lora_B", "rows", "weights", "out")

    @staticmethod
    def fast_key(args: tuple, kwargs: dict) -> tuple | None:
        x, lora_A, lora_B, rows, weights, out = _pick(args, kwargs, _Segmented._FAST)
        if rows.numel() == 0:  # launches nothing
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad
            or lora_A.requires_grad
            or lora_B.requires_grad
            or (weights is not None and weights.requires_grad)
            or _requires_grad(out)
        ):
            return None  # the kernel refuses autograd: its error is the caller's
        seq = x.shape[1] if x.dim() == 3 else 1
        return ("segmented_lora", x.device, x.dtype, lora_A.dtype, lora_A.shape[0], x.dim(), _int_class(seq),
                _int_class(rows.numel()), _int_class(x.shape[-1]), _int_class(lora_B.shape[0]))  # fmt: skip

    def key(self, a: dict) -> GuardKey:
        x = a["x"]
        variant = f"r={a['lora_A'].shape[0]}, {x.dim()}-D input, " + _classes(
            seq=x.shape[1] if x.dim() == 3 else 1, rows=a["rows"].numel(), d_in=x.shape[-1], d_out=a["lora_B"].shape[0]
        )
        return _base_key(self.name, x, a["lora_A"], "inference", variant)

    def check(self, a: dict, training: bool, max_tokens: int | None = None) -> tuple[dict[str, float], float]:
        x, lora_A, lora_B = a["x"], a["lora_A"], a["lora_B"]
        g = _generator(x.device)
        rank, d_in = lora_A.shape
        d_out = lora_B.shape[0]
        shape = list(x.shape)
        if x.dim() == 3:
            shape[1] = _fit(shape[1], max_tokens or CHECK_TOKENS[self.name])
        c_x = _randn(g, shape, x)
        c_A = _randn(g, (rank, d_in), lora_A, d_in**-0.5)
        c_B = _randn(g, (d_out, rank), lora_B, rank**-0.5)
        rows = a["rows"]
        weights = None
        if a["weights"] is not None:
            weights = (0.5 + torch.rand(rows.numel(), generator=g, device=x.device)).to(a["weights"].dtype)
        out_like = a["out"] if a["out"] is not None else x
        base = _randn(g, (*shape[:-1], d_out), out_like)
        ref = reference.segmented_lora(
            c_x.double(), c_A.double(), c_B.double(), rows, None if weights is None else weights.double(),
            a["scaling"], out=base.double(),
        )  # fmt: skip

        def run() -> dict[str, float]:
            actual = self.kernel(c_x, c_A, c_B, rows, weights, a["scaling"], out=base.clone())
            return {"delta": relative_error(actual.double() - base.double(), ref - base.double())}

        errors = _stage("kernel", run)
        return errors, tolerance(_compute_dtype(x), x.device, max(d_in, d_out))


class _Grouped(_Family):
    name = "grouped_lora"
    signature = inspect.signature(reference.grouped_lora)
    _FAST = _positions(signature, "x", "stack_A", "stack_B", "factor", "out")

    @staticmethod
    def fast_key(args: tuple, kwargs: dict) -> tuple | None:
        x, stack_A, stack_B, factor, out = _pick(args, kwargs, _Grouped._FAST)
        if torch.is_grad_enabled() and (
            x.requires_grad
            or stack_A.requires_grad
            or stack_B.requires_grad
            or factor.requires_grad
            or _requires_grad(out)
        ):
            return None  # the kernel refuses autograd: its error is the caller's
        seq = x.shape[1] if x.dim() == 3 else 1
        sizes = (_int_class(seq), _int_class(factor.shape[-1]), _int_class(x.shape[-1]), _int_class(stack_B.shape[-1]))
        return ("grouped_lora", x.device, x.dtype, stack_A.dtype, stack_A.shape[0], stack_A.shape[2], x.dim(), sizes)

    def launches(self, a: dict) -> bool:
        return int(a["counts"].sum()) > 0  # one device sync, on undecided calls only

    def key(self, a: dict) -> GuardKey:
        x, stack_A = a["x"], a["stack_A"]
        variant = f"r={stack_A.shape[-1]}, {stack_A.shape[0]} LoRAs, {x.dim()}-D input, " + _classes(
            seq=x.shape[1] if x.dim() == 3 else 1, slots=a["gather"].shape[-1], d_in=x.shape[-1],
            d_out=a["stack_B"].shape[-1],
        )  # fmt: skip
        return _base_key(self.name, x, stack_A, "inference", variant)

    def check(self, a: dict, training: bool, max_tokens: int | None = None) -> tuple[dict[str, float], float]:
        x, stack_A, stack_B, factor = a["x"], a["stack_A"], a["stack_B"], a["factor"]
        g = _generator(x.device)
        num, d_in, rank = stack_A.shape
        d_out = stack_B.shape[-1]
        shape = list(x.shape)
        if x.dim() == 3:
            shape[1] = _fit(shape[1], max_tokens or CHECK_TOKENS[self.name])
        c_x = _randn(g, shape, x)
        c_A = _randn(g, (num, d_in, rank), stack_A, d_in**-0.5)
        c_B = _randn(g, (num, rank, d_out), stack_B, rank**-0.5)
        c_factor = (0.5 + torch.rand(factor.shape, generator=g, device=x.device)).to(factor.dtype)
        base = _randn(g, (*shape[:-1], d_out), a["out"])
        gather, counts = a["gather"], a["counts"]
        ref = reference.grouped_lora(
            c_x.double(), c_A.double(), c_B.double(), gather, counts, c_factor.double(), base.double()
        )

        def run() -> dict[str, float]:
            actual = self.kernel(c_x, c_A, c_B, gather, counts, c_factor, out=base.clone())
            return {"delta": relative_error(actual.double() - base.double(), ref - base.double())}

        errors = _stage("kernel", run)
        return errors, tolerance(_compute_dtype(x), x.device, max(d_in, d_out))


FAMILY_TYPES: dict[str, type[_Family]] = {"mor_linear": _MoR, "segmented_lora": _Segmented, "grouped_lora": _Grouped}


class _KernelError(Exception):
    """An exception raised by the kernel during the check, with the stage it was raised in."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"{stage}: {type(error).__name__}: {str(error).strip()[:500]}")


def _stage(stage: str, fn: Callable):
    try:
        return fn()
    except Exception as error:  # compile failures, launch errors, anything the kernel raises
        raise _KernelError(stage, error) from error


def compare(
    family_name: str, kernel: Callable, args: tuple, kwargs: dict, *, training: bool, max_tokens: int | None = None
) -> tuple[dict[str, float], float]:
    """The guard's check of one call, on its own: ``(relative errors, tolerance)`` of ``kernel`` against the
    float64 reference on inputs drawn for the shapes of ``args`` / ``kwargs`` (their values are not read).
    Raises what the kernel raises. ``benchmarks/gpu_check.py`` runs it at full size on every kernel."""
    family = FAMILY_TYPES[family_name](kernel)
    try:
        return family.check(family.bind(args, kwargs), training, max_tokens)
    except _KernelError as error:
        raise error.__cause__ from None


# --------------------------------------------------------------------------------------------- the guard


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decide(family: _Family, a: dict, key: GuardKey) -> Decision:
    """Run the check of ``key`` and turn its outcome into a decision (never raises for a kernel failure)."""
    device = a["x"].device
    _synchronize(device)
    start = time.perf_counter()
    try:
        errors, tol = family.check(a, key.mode == "training")
    except _KernelError as error:
        _synchronize_quietly(device)
        return Decision(key, False, f"the kernel raised ({error})", seconds=time.perf_counter() - start)
    _synchronize(device)
    seconds = time.perf_counter() - start
    worst = max(errors, key=errors.get)
    if errors[worst] <= tol:
        return Decision(key, True, "matched the PyTorch path", errors, tol, seconds)
    reason = f"mismatch: {worst} has relative error {errors[worst]:.3g} > tolerance {tol:.3g} (float64 reference)"
    return Decision(key, False, reason, errors, tol, seconds)


def _synchronize_quietly(device: torch.device) -> None:
    try:
        _synchronize(device)
    except Exception:  # a failed launch may leave an error to report here: the decision already records it
        pass


def _warn(decision: Decision) -> None:
    key = decision.key
    name = ""
    if key.device.startswith("cuda"):
        try:
            name = f" ({torch.cuda.get_device_name(torch.device(key.device))})"
        except Exception:
            name = ""
    warnings.warn(
        f"loramix: Triton kernel {key.family} failed its first-use check on {key.device}{name}"
        + (f", compute capability {key.capability[0]}.{key.capability[1]}" if key.capability else "")
        + f", dtype {key.dtype}, {key.mode} ({key.variant}): {decision.reason}. "
        "The PyTorch path is used for it for the rest of this process. LORAMIX_KERNELS=triton forces the kernel; "
        "LORAMIX_KERNELS=torch never uses the kernels.",
        KernelFallbackWarning,
        stacklevel=2,
    )


def run(family_name: str, kernel: Callable, fallback: Callable, args: tuple, kwargs: dict):
    """Call ``kernel(*args, **kwargs)`` if its key passed the check (checking it on first use), else ``fallback``.

    ``fallback`` has the kernel's contract (:mod:`loramix.kernels.reference`) and runs in the caller's dtype.
    After the first call of a key this costs one dictionary look-up of a small tuple.
    """
    family = FAMILY_TYPES[family_name]
    fast = family.fast_key(args, kwargs)
    if fast is None:  # the kernel's own early exit or refusal: nothing to check
        return kernel(*args, **kwargs)
    decision = _fast.get(fast)
    if decision is None:
        decision = _first_use(family(kernel), fast, args, kwargs)
        if decision is None:  # launched nothing this time: decide on a later call
            return kernel(*args, **kwargs)
    return kernel(*args, **kwargs) if decision.use_kernel else fallback(*args, **kwargs)


@torch.compiler.disable  # random inputs, host synchronisation and warnings: never traced
def _first_use(family: _Family, fast: tuple, args: tuple, kwargs: dict) -> Decision | None:
    """The decision of a key not seen yet in this process: checked now (once, whatever the threads)."""
    with _lock:
        if fast in _fast:
            return _fast[fast]
        bound = family.bind(args, kwargs)
        key = family.key(bound)
        decision = _decisions.get(key)
        if decision is None:
            if not family.launches(bound):
                return None
            decision = _decide(family, bound, key)
            _decisions[key] = decision
            if decision.use_kernel:
                logger.info("loramix kernel check passed: %s (%.2f s)", key.describe(), decision.seconds)
            else:
                _warn(decision)
        _fast[fast] = decision
        return decision


__all__ = [
    "CHECK_TOKENS",
    "FAMILIES",
    "SAFETY",
    "Decision",
    "GuardKey",
    "KernelFallbackWarning",
    "compare",
    "decisions",
    "product_eps",
    "relative_error",
    "reset",
    "run",
    "tolerance",
]
