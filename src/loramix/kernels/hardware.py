"""Device facts the kernels' launches depend on, and the SM90 pipelining mitigation.

Imports neither Triton nor the kernel modules, so the guard and the launch code can both use it.

**SM90 (Hopper: H100, H200, H20) and register operands.** Triton issue 9433 (triton-lang/triton) is a
read-after-write hazard on SM90: when a dot inside a software-pipelined loop (``num_stages > 1``) takes
its left operand from *registers* (a tile computed in the kernel, or a loaded tile cast to another
dtype) rather than from shared memory, the asynchronous ``wgmma`` of one iteration can still be reading
those registers while the next iteration's prologue overwrites them; with the ptxas releases that ship
with Triton this gives wrong results, and intermittently, since it is a race. vLLM's Punica-style LoRA
kernels hit it in their *expand* kernel (its left operand is the shrink output, cast to the weight dtype
in registers), and vLLM launches that kernel with ``num_stages=1`` on compute capability (9, 0): a
single stage waits for each ``wgmma`` before the registers are reused. (Verified in the vLLM 0.34.0 wheel,
``vllm/lora/ops/triton_ops/lora_expand_op.py`` l. 230-238: when the float32 input is cast to float16/bfloat16
weights, ``NUM_STAGES = 1`` on capability 90, "miscompiled by ptxas < 13.3 on SM90 (triton-lang/triton#9433)".
loramix applies it whatever the ptxas version: the affected loops are short.)

Our kernels share the pattern in these launches, which therefore take ``num_stages=1`` on SM90
(:func:`pipeline_options`), everywhere else Triton's default:

* the segmented / grouped *expand* (``segmented.py``): the float32 shrink output cast in registers,
  the very kernel vLLM works around;
* the MoR output kernel (``_mor_out_kernel``): ``y`` is rebuilt in registers from ``G``, ``Ω_A`` and
  ``z`` for every block of the rank dimension, then multiplied;
* the MoR kernels whose left operand is cast in registers for this call: the ``dA`` reduction (the
  float32 ``dz`` cast to the half compute dtype), and ``proj`` / ``bwd_rows`` when their input is not
  already in the compute dtype (autocast).

The loops affected are short (``N·r / 64`` blocks for the output kernel, none for the expand), so a
single stage costs little there. ``benchmarks/gpu_check.py`` measures the kernels with and without it.
"""

from __future__ import annotations

import functools

import torch

SM90 = (9, 0)

#: The mitigation switch, for measurements only (``benchmarks/gpu_check.py`` turns it off to compare).
SM90_SINGLE_STAGE = True


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` compute capability of a CUDA device (cached per device); ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


def pipeline_options(device: torch.device, *, lhs_in_registers: bool) -> dict[str, int]:
    """Extra launch options for a kernel: ``{"num_stages": 1}`` for a pipelined dot with a register left
    operand on SM90 (see the module docstring: triton-lang/triton issue 9433, vLLM's workaround), else none."""
    if lhs_in_registers and SM90_SINGLE_STAGE and capability(device) == SM90:
        return {"num_stages": 1}
    return {}


__all__ = ["SM90", "SM90_SINGLE_STAGE", "capability", "pipeline_options"]
