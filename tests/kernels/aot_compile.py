"""Compile every loramix Triton kernel for a CUDA GPU without one (Triton -> PTX -> cubin, via ptxas).

Run as a script in a fresh process, without ``TRITON_INTERPRET`` (``test_gpu_compile.py`` does that):
it catches errors that only the GPU compiler sees (dot shapes and dtypes, constexpr handling, shared
memory) on a machine with no GPU. Exit status 0: all compiled; 77: no CUDA backend / ptxas here.
"""

from __future__ import annotations

import inspect
import os
import sys


def main(arch: int = 90) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from loramix.kernels import mor_triton as m
    from loramix.kernels import segmented as sg

    target = GPUTarget("cuda", arch, 32)
    failures = []

    def build(kernel, pointers: dict[str, str], constexprs: dict, label: str, options: dict | None = None) -> None:
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = pointers[name]
            else:
                signature[name] = "fp32" if name == "scaling" else "i32"
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            assert compiled.asm.get("cubin"), "no cubin produced"
            print(f"ok   {label} (shared memory {compiled.metadata.shared} B)")
        except Exception as error:  # report every kernel, then fail
            failures.append(label)
            print(f"FAIL {label}: {type(error).__name__}: {str(error)[:2000]}")

    try:
        triton.compile  # noqa: B018
        from triton.backends import backends

        if "nvidia" not in backends:
            print("no NVIDIA backend in this Triton build")
            return 77
    except Exception as error:
        print(f"Triton CUDA backend unavailable: {error}")
        return 77

    dt, dot = "bf16", tl.bfloat16  # the production case: bfloat16 tiles, float32 accumulation

    def half(*names):
        return {n: f"*{dt}" for n in names}

    def f32(*names):
        return {n: "*fp32" for n in names}

    common = dict(R=8, N=8, DOT=dot, PREC=None)
    tiles = dict(BLOCK_R=16, BLOCK_N=16)
    build(
        m._mor_proj_kernel,
        {**half("X", "XR", "A", "WR"), **f32("Z", "P")},
        dict(common, HAS_ROUTER=True, SAME_X=True, BLOCK_T=64, BLOCK_K=64, **tiles),
        "MoR proj (router + A x)",
    )
    build(
        m._mor_proj_kernel,
        {**half("X", "XR", "A", "WR"), **f32("Z", "P")},
        dict(common, HAS_ROUTER=True, SAME_X=False, BLOCK_T=64, BLOCK_K=64, **tiles),
        "MoR proj, separate router input",
    )
    build(
        m._mor_out_kernel,
        {**f32("P", "Z"), **half("OA", "OB", "B", "RES", "OUT")},
        dict(common, HAS_RES=True, BLOCK_T=64, BLOCK_O=64, BLOCK_J=64),
        "MoR out (rank-N·r product + residual)",
    )
    build(
        m._mor_bwd_rows_kernel,
        {**half("G", "OA", "OB", "B"), **f32("P", "Z", "GP", "DZ", "DL", "DOA_PART")},
        dict(common, HAS_ROUTER=True, HAS_GP=True, BLOCK_T=64, BLOCK_O=64, BLOCK_J=64, **tiles),
        "MoR bwd rows",
    )
    build(
        m._mor_bwd_m_kernel,
        {**half("G", "OA"), **f32("P", "Z", "M_PART")},
        dict(common, BLOCK_T=64, BLOCK_O=64, BLOCK_J=64),
        "MoR bwd gᵀy",
    )
    build(
        m._mor_bwd_dx_kernel,
        {**f32("DZ", "DL"), **half("A", "WR", "DX", "DXR")},
        dict(common, HAS_ROUTER=True, SAME_X=True, BLOCK_T=64, BLOCK_I=64, **tiles),
        "MoR bwd dx",
    )
    build(
        m._mor_bwd_dw_kernel,
        {**half("X", "XR"), **f32("DZ", "DL", "DA_PART", "DW_PART")},
        dict(common, HAS_ROUTER=True, SAME_X=False, BLOCK_T=64, BLOCK_I=64, **tiles),
        "MoR bwd dA, dW_r",
    )
    build(
        sg._grouped_shrink_kernel,
        {**half("X", "A"), "GATHER": "*i32", "COUNTS": "*i32", "FACTOR": "*fp32", "Z": "*fp32"},
        dict(R=32, BLOCK_G=16, BLOCK_K=64, BLOCK_R=32, DOT=dot, PREC=None),
        "segmented / grouped LoRA shrink",
    )
    build(
        sg._grouped_expand_kernel,
        {"Z": "*fp32", "GATHER": "*i32", "COUNTS": "*i32", **half("B", "OUT")},
        dict(R=32, BLOCK_G=16, BLOCK_O=64, BLOCK_R=32, DOT=dot, PREC=None),
        "segmented / grouped LoRA expand",
    )

    # On SM90 these launches run with num_stages=1 (kernels/hardware.py: triton-lang/triton issue 9433):
    # that is the code an H100 / H200 executes, so it must compile too.
    single = {"num_stages": 1}
    build(
        m._mor_proj_kernel,
        {**f32("X", "XR", "A", "WR", "Z", "P")},
        dict(common, HAS_ROUTER=True, SAME_X=True, BLOCK_T=64, BLOCK_K=64, **tiles),
        "MoR proj, autocast (float32 in, bfloat16 tiles), num_stages=1",
        single,
    )
    build(
        m._mor_out_kernel,
        {**f32("P", "Z"), **half("OA", "OB", "B", "RES", "OUT")},
        dict(common, HAS_RES=True, BLOCK_T=64, BLOCK_O=64, BLOCK_J=64),
        "MoR out, num_stages=1",
        single,
    )
    build(
        m._mor_bwd_dw_kernel,
        {**half("X", "XR"), **f32("DZ", "DL", "DA_PART", "DW_PART")},
        dict(common, HAS_ROUTER=True, SAME_X=False, BLOCK_T=64, BLOCK_I=64, **tiles),
        "MoR bwd dA, dW_r, num_stages=1",
        single,
    )
    build(
        sg._grouped_expand_kernel,
        {"Z": "*fp32", "GATHER": "*i32", "COUNTS": "*i32", **half("B", "OUT")},
        dict(R=32, BLOCK_G=16, BLOCK_O=64, BLOCK_R=32, DOT=dot, PREC=None),
        "segmented / grouped LoRA expand, num_stages=1",
        single,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
