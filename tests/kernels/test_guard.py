"""The ``auto`` backend's guard (kernels/guard.py), on CPU tensors through Triton's interpreter.

Under ``auto`` the library only sends CUDA tensors to the kernels; the entry points themselves guard any
tensor, so the guard's logic runs here exactly as on a GPU: a correct kernel passes and is used from then
on; a wrong, a wrong-in-backward-only or a raising kernel is replaced by the PyTorch path with one warning;
decisions are cached per key; ``triton`` skips the check and ``torch`` never calls a kernel.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from loramix import kernels
from loramix.kernels import guard, hardware, mor_triton, reference, segmented
from loramix.kernels.guard import KernelFallbackWarning


@pytest.fixture(autouse=True)
def fresh_guard(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend(None)
    kernels.reset_guard()
    yield
    kernels.reset_guard()


def mor_args(dtype=torch.float32, grad=True, T=37, d_in=45, d_out=29, r=4, n=3, seed=0):
    """A MoR call as the MoR layer makes it (B = 0: a fresh adapter), positional + keywords."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_(grad)

    x = rand(T, d_in)
    args = (x, rand(r, d_in, scale=d_in**-0.5), torch.zeros(d_out, r, dtype=dtype, requires_grad=grad),
            rand(n, r), rand(n, d_out), rand(n, d_in), 2.0)  # fmt: skip
    return args, {"x_router": x, "residual": torch.randn(T, d_out, generator=g).to(dtype)}


def segmented_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 40, generator=g).to(dtype)
    lora_A, lora_B = torch.randn(5, 40, generator=g).to(dtype), torch.randn(30, 5, generator=g).to(dtype)
    return (x, lora_A, lora_B, torch.tensor([1, 4]), torch.rand(2, generator=g), 2.0), {
        "out": torch.randn(6, 3, 30, generator=g).to(dtype)
    }


def grouped_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 40, generator=g).to(dtype)
    stack_A, stack_B = torch.randn(2, 40, 5, generator=g).to(dtype), torch.randn(2, 5, 30, generator=g).to(dtype)
    gather, counts = torch.tensor([[0, 2, 2], [1, 5, 5]]), torch.tensor([2, 1])
    return (x, stack_A, stack_B, gather, counts, torch.rand(2, 3, generator=g)), {
        "out": torch.randn(6, 2, 30, generator=g).to(dtype)
    }


class Spy:
    """Wraps a kernel entry point: counts calls, optionally corrupts the result or raises."""

    def __init__(self, impl, corrupt=None, error=None):
        self.impl, self.corrupt, self.error, self.calls = impl, corrupt, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.error is not None:
            raise self.error
        result = self.impl(*args, **kwargs)
        return result if self.corrupt is None else self.corrupt(result)


def install(monkeypatch, family: str, spy: Spy) -> Spy:
    module = mor_triton if family == "mor_linear" else segmented
    monkeypatch.setattr(module, family, spy)
    return spy


def call(family: str, args, kwargs):
    return getattr(kernels, family)(*args, **kwargs)


def expected_of(family: str, args, kwargs):
    """The PyTorch maths of a call (kernels/reference.py), on copies of its tensors."""
    args, kwargs = clone_call(args, kwargs)
    return getattr(reference, family)(*args, **kwargs)


def same(family: str, result, expected) -> bool:
    return torch.equal(result[0], expected[0]) if family == "mor_linear" else torch.equal(result, expected)


def clone_call(args, kwargs):
    """Fresh copies of a call's tensors (the segmented kernels write into ``out`` in place)."""

    def fresh(v):
        return v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v

    return tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


CASES = {"mor_linear": mor_args, "segmented_lora": segmented_args, "grouped_lora": grouped_args}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", list(CASES))
def test_a_correct_kernel_passes_and_is_used(monkeypatch, family, dtype):
    spy = install(monkeypatch, family, Spy(getattr(mor_triton if family == "mor_linear" else segmented, family)))
    args, kwargs = CASES[family](dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        result = call(family, *clone_call(args, kwargs))
        again = call(family, *clone_call(args, kwargs))
    (decision,) = kernels.guard_decisions()
    assert decision["use_kernel"] and decision["family"] == family and decision["mode"] == "inference"
    assert decision["dtype"] == str(dtype).removeprefix("torch.") and decision["device"] == "cpu"
    assert max(decision["errors"].values()) <= decision["tolerance"]
    assert spy.calls == 3  # the check's call, then each real call: the second one is not checked again
    first = result[0] if family == "mor_linear" else result
    second = again[0] if family == "mor_linear" else again
    assert torch.equal(first, second)


def test_training_checks_the_backward_too(monkeypatch):
    spy = install(monkeypatch, "mor_linear", Spy(mor_triton.mor_linear))
    args, kwargs = mor_args()
    out, probs = kernels.mor_linear(*args, **kwargs)
    out.sum().backward()
    (decision,) = kernels.guard_decisions()
    assert decision["use_kernel"] and decision["mode"] == "training"
    assert {"grad x", "grad lora_A", "grad lora_B", "grad omega_A", "grad omega_B", "grad router"} <= set(
        decision["errors"]
    )
    assert spy.calls == 2 and args[2].grad is not None and args[2].grad.abs().sum() > 0


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward scales the gradient (a kernel wrong only in its backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 1.5 * grad


def wrong_backward(result):
    out, probs = result
    return _ScaleGradient.apply(out), probs


def one_wrong_element(out):
    out.view(-1)[7] += 0.5  # a single element: the max-norm part of the error measure catches it
    return out


WRONG = {
    "mor_linear": lambda result: (result[0] * 1.001, result[1]),
    "segmented_lora": lambda out: out.add_(1e-3),
    "grouped_lora": one_wrong_element,
}


@pytest.mark.parametrize("family", list(CASES))
def test_a_wrong_kernel_falls_back_with_one_warning(monkeypatch, family):
    impl = getattr(mor_triton if family == "mor_linear" else segmented, family)
    spy = install(monkeypatch, family, Spy(impl, corrupt=WRONG[family]))
    args, kwargs = CASES[family]()
    pattern = rf"Triton kernel {family} failed its first-use check on cpu, dtype float32, inference .*mismatch"
    with torch.no_grad(), pytest.warns(KernelFallbackWarning, match=pattern):
        result = call(family, *clone_call(args, kwargs))
    expected = expected_of(family, args, kwargs)
    assert spy.calls == 1  # the check only: the call itself took the PyTorch path
    assert same(family, result, expected)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        call(family, *clone_call(args, kwargs))
    assert spy.calls == 1
    (decision,) = kernels.guard_decisions()
    assert not decision["use_kernel"] and "mismatch" in decision["reason"]


def test_a_kernel_wrong_only_in_backward_is_caught_in_training_not_in_inference(monkeypatch):
    install(monkeypatch, "mor_linear", Spy(mor_triton.mor_linear, corrupt=wrong_backward))
    args, kwargs = mor_args()
    with torch.no_grad():
        kernels.mor_linear(*args, **kwargs)
    with pytest.warns(KernelFallbackWarning, match=r"mor_linear .* training .*mismatch: grad"):
        out, _ = kernels.mor_linear(*args, **kwargs)
    out.sum().backward()  # the PyTorch path's gradients
    expected = expected_of("mor_linear", args, kwargs)[0]
    assert torch.allclose(out, expected)
    modes = {d["mode"]: d["use_kernel"] for d in kernels.guard_decisions()}
    assert modes == {"inference": True, "training": False}


@pytest.mark.parametrize("family", list(CASES))
def test_a_raising_kernel_falls_back_with_the_error_in_the_warning(monkeypatch, family):
    spy = install(monkeypatch, family, Spy(None, error=RuntimeError("PTXAS error: boom")))
    args, kwargs = CASES[family]()
    with (
        torch.no_grad(),
        pytest.warns(KernelFallbackWarning, match=r"raised \(kernel.*RuntimeError: PTXAS error: boom"),
    ):
        result = call(family, *clone_call(args, kwargs))
    expected = expected_of(family, args, kwargs)
    assert same(family, result, expected)
    with torch.no_grad():
        call(family, *clone_call(args, kwargs))
    assert spy.calls == 1


def test_decisions_are_per_key(monkeypatch):
    """dtype, mode and variant (here the rank) each get their own check; one key's fallback leaves the others."""
    install(monkeypatch, "mor_linear", Spy(mor_triton.mor_linear))
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            for r in (2, 4):
                args, kwargs = mor_args(dtype, r=r)
                kernels.mor_linear(*args, **kwargs)
                kernels.mor_linear(*args, **kwargs)
        # decoding (one token per sequence) and prefill compile to different kernels: checked apart
        x, lora_A, lora_B, rows, weights, scaling = segmented_args()[0]
        for seq in (1, 3, 1):
            kernels.segmented_lora(x[:, :seq], lora_A, lora_B, rows, weights, scaling)
    keys = {(d["family"], d["dtype"], d["variant"]) for d in kernels.guard_decisions()}
    assert len(keys) == 6 and all(d["use_kernel"] for d in kernels.guard_decisions())
    assert {v for f, _, v in keys if f == "segmented_lora"} == {
        "r=5, 3-D input, seq=1, rows%16≠0, d_in%16≠0, d_out%16≠0",
        "r=5, 3-D input, seq%16≠0, rows%16≠0, d_in%16≠0, d_out%16≠0",
    }


def test_forced_triton_skips_the_check_and_torch_never_calls_a_kernel(monkeypatch):
    spy = install(monkeypatch, "mor_linear", Spy(mor_triton.mor_linear, corrupt=WRONG["mor_linear"]))
    args, kwargs = mor_args(grad=False)
    with kernels.backend("triton"):
        forced, _ = kernels.mor_linear(*args, **kwargs)
    assert spy.calls == 1 and kernels.guard_decisions() == []  # run as asked, wrong as it is
    expected, _ = reference.mor_linear(*args, **kwargs)
    assert not torch.equal(forced, expected)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    for family, make in CASES.items():
        raising = install(monkeypatch, family, Spy(None, error=AssertionError("a kernel ran")))
        with torch.no_grad():
            result = call(family, *clone_call(*make()))
        expected = expected_of(family, *make())
        assert same(family, result, expected)
        assert raising.calls == 0
    assert kernels.guard_decisions() == []


def test_calls_that_launch_nothing_decide_nothing(monkeypatch):
    spy = install(monkeypatch, "segmented_lora", Spy(segmented.segmented_lora))
    args, kwargs = segmented_args()
    with torch.no_grad():
        kernels.segmented_lora(args[0], args[1], args[2], torch.tensor([], dtype=torch.long), out=kwargs["out"])
    assert kernels.guard_decisions() == [] and spy.calls == 1
    gspy = install(monkeypatch, "grouped_lora", Spy(segmented.grouped_lora))
    gargs, gkwargs = grouped_args()
    with torch.no_grad():
        kernels.grouped_lora(*gargs[:4], torch.zeros(2, dtype=torch.long), *gargs[5:], **gkwargs)
    assert kernels.guard_decisions() == [] and gspy.calls == 1


def test_autocast_is_part_of_the_key():
    args, kwargs = mor_args(grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs = kernels.mor_linear(*args, **kwargs)
    (decision,) = kernels.guard_decisions()
    assert decision["use_kernel"] and decision["dtype"] == "bfloat16 (autocast from float32)"
    assert out.dtype == torch.float32 and probs.dtype == torch.float32  # residual float32: out takes its dtype


def test_the_fallback_is_the_library_pytorch_path():
    """reference.* equal the PyTorch paths the callers take when the kernels are off (same ops, same bits)."""
    from loramix.milora import functional as milora_f
    from loramix.mor import functional as mor_f

    args, kwargs = mor_args(grad=False)
    x, lora_A, lora_B, omega_A, omega_B, router, scaling = args
    lora_B = torch.randn_like(lora_B)
    with kernels.backend("torch"):
        expected = mor_f.mor_linear(x, kwargs["residual"], lora_A, lora_B, omega_A, omega_B, router, scaling,
                                    torch.nn.Identity())  # fmt: skip
    actual = reference.mor_linear(x, lora_A, lora_B, omega_A, omega_B, router, scaling, **kwargs)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])

    (x, stack_A, stack_B, gather, counts, factor), gkw = grouped_args()
    factor = factor * (torch.arange(3) < counts[:, None])  # the callers' padding slots carry factor 0
    with torch.no_grad(), kernels.backend("torch"):
        expected = milora_f.grouped_lora(x, gkw["out"], stack_A, stack_B, gather, counts, factor)
    actual = reference.grouped_lora(x, stack_A, stack_B, gather, counts, factor, gkw["out"].clone())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)

    (x, lora_A, lora_B, rows, weights, scaling), skw = segmented_args()
    with torch.no_grad(), kernels.backend("torch"):
        expected = milora_f.gated_lora(x, skw["out"], lora_A, lora_B, rows, (weights * scaling).view(-1, 1, 1))
    actual = reference.segmented_lora(x, lora_A, lora_B, rows, weights, scaling, out=skw["out"].clone())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_tolerance_formula():
    cpu = torch.device("cpu")
    assert guard.tolerance(torch.bfloat16, cpu, 1) == pytest.approx(8 * (2**-7 + 2**-23))
    assert guard.tolerance(torch.float16, cpu, 4096) == pytest.approx(8 * (2**-10 + 64 * 2**-23))
    assert guard.tolerance(torch.float32, cpu, 11008) == pytest.approx(8 * 2**-23 * (1 + math.sqrt(11008)))
    e = torch.ones(1000, dtype=torch.float64)
    assert guard.relative_error(e, e) == 0
    bumped = e.clone()
    bumped[3] = 1.5
    assert guard.relative_error(bumped, e) == pytest.approx(0.5)  # max-norm: one element is enough
    assert guard.relative_error(torch.full_like(e, math.nan), e) == math.inf


def test_sm90_launches_take_a_single_stage(monkeypatch):
    """On compute capability (9, 0) the launches with a register left operand get num_stages=1 (triton#9433)."""
    assert hardware.pipeline_options(torch.device("cpu"), lhs_in_registers=True) == {}
    monkeypatch.setattr(hardware, "capability", lambda device: (9, 0))
    assert hardware.pipeline_options(torch.device("cpu"), lhs_in_registers=True) == {"num_stages": 1}
    assert hardware.pipeline_options(torch.device("cpu"), lhs_in_registers=False) == {}
    monkeypatch.setattr(hardware, "SM90_SINGLE_STAGE", False)
    assert hardware.pipeline_options(torch.device("cpu"), lhs_in_registers=True) == {}
    monkeypatch.setattr(hardware, "SM90_SINGLE_STAGE", True)
    monkeypatch.setattr(hardware, "capability", lambda device: (8, 0))
    assert hardware.pipeline_options(torch.device("cpu"), lhs_in_registers=True) == {}

    # which launches ask for it, and the kernels still match with num_stages=1 (the interpreter takes it)
    monkeypatch.setattr(hardware, "capability", lambda device: (9, 0))
    asked = []

    def spy(device, *, lhs_in_registers):
        asked.append(lhs_in_registers)
        return hardware.pipeline_options(device, lhs_in_registers=lhs_in_registers)

    monkeypatch.setattr(mor_triton, "pipeline_options", spy)
    monkeypatch.setattr(segmented, "pipeline_options", spy)
    args, kwargs = mor_args(torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        out, _ = kernels.mor_linear(*args, **kwargs)  # training: checked forward and backward
        out.float().sum().backward()
    # per MoR call: proj (no cast), out (y in registers), bwd rows (no cast), dA (dz cast to float16)
    assert asked[:4] == [False, True, False, True]
    asked.clear()
    with torch.no_grad():
        call("segmented_lora", *segmented_args(torch.float16))
    assert asked[-1] is True  # the expand
    assert all(d["use_kernel"] for d in kernels.guard_decisions())


def test_the_check_runs_under_inference_mode():
    """``generate`` decodes under ``torch.inference_mode()``: the first call's check must work there too."""
    with torch.inference_mode():
        for family, make in CASES.items():
            result, expected = call(family, *clone_call(*make())), expected_of(family, *make())
            if family == "mor_linear":
                result, expected = result[0], expected[0]
            torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    decisions = kernels.guard_decisions()
    assert len(decisions) == 3 and all(d["use_kernel"] and d["mode"] == "inference" for d in decisions)
