"""Compile every variant of the Triton kernels for sm_80 and sm_90 without a GPU, and read its resources.

ptxas ships inside the Triton wheel, so a CPU machine builds the cubins a GPU's JIT would (the target
is a compute capability) and reads ptxas's report (registers, spills) and Triton's shared memory per
block. ``tests/test_kernels_compile.py`` holds them to the limits below; ``python -m
rollout.kernels.compile_check`` prints the table.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

from rollout.kernels.triton_sampling import launch_configs

ARCHS = (80, 90)  # A100, H100/H200
SHARED_PER_BLOCK = {80: 166912, 90: 232448}  # bytes a block may opt into (163 KiB, 227 KiB)
REGS_PER_SM = 65536  # both archs; a warp's registers are allocated in units of 256
MAX_WARPS_PER_SM = 64
MAX_PROGRAMS_PER_SM = 32
MAX_REGS = 255

_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Variant:
    """One cubin: a launch of ``launch_configs()``, an arch, and whether the caller's logits are aligned."""

    launch: int
    arch: int
    caller_aligned: bool


@dataclass(frozen=True)
class Resources:
    """What ptxas and Triton report for one variant."""

    name: str
    arch: int
    caller_aligned: bool
    num_warps: int
    programs_per_sm: int  # the occupancy the launch is tuned for
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int

    def resident_programs(self) -> int:
        """Programs per SM the registers allow."""
        per_warp = -(-self.regs * 32 // 256) * 256
        return min(REGS_PER_SM // (per_warp * self.num_warps), MAX_WARPS_PER_SM // self.num_warps, MAX_PROGRAMS_PER_SM)


def toolchain_missing() -> str | None:
    """Why this machine cannot compile for CUDA targets, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        return f"Triton's CUDA backend is missing ({err})"
    for arch in ARCHS:
        try:
            get_ptxas(arch)
        except RuntimeError as err:
            return f"no ptxas for sm_{arch} ({err})"
    return None


def variants() -> list[Variant]:
    """Every (launch, arch, caller alignment) the JIT can build; unaligned only where the caller decides."""
    out = []
    for i, launch in enumerate(launch_configs()):
        for arch in ARCHS:
            out += [Variant(i, arch, aligned) for aligned in ((True, False) if launch.caller_aligned else (True,))]
    return out


def compile_variant(variant: Variant) -> Resources:
    """Compile one variant as the JIT would (same signature, constexprs, alignment attributes, warps)."""
    launch = launch_configs()[variant.launch]
    fn = launch.kernel
    assert set(fn.arg_names) == set(launch.signature) | set(launch.constexprs), launch.name
    signature = {a: launch.signature.get(a, "constexpr") for a in fn.arg_names}
    target = GPUTarget("cuda", variant.arch, 32)
    divisible = launch.aligned + (launch.caller_aligned if variant.caller_aligned else ())
    d_attr = make_backend(target).parse_attr("D")  # the JIT's mark of an argument divisible by 16
    attrs = {(fn.arg_names.index(a),): d_attr for a in divisible}
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # a cache hit runs no ptxas, so prints no report
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(ASTSource(fn, signature, launch.constexprs, attrs), target=target,
                                options=dict(num_warps=launch.num_warps))
    report = log.getvalue()
    regs, frame = _REGS.search(report), _FRAME.search(report)
    assert regs and frame, f"{launch.name} sm_{variant.arch}: no resource report from ptxas in {report!r}"
    stack, spill_stores, spill_loads = map(int, frame.groups())
    return Resources(launch.name, variant.arch, variant.caller_aligned, launch.num_warps, launch.programs_per_sm,
                     int(regs.group(1)), spill_stores, spill_loads, stack, kernel.metadata.shared)


def compile_all(workers: int = 2) -> list[Resources]:
    """``compile_variant`` of every variant, on ``workers`` processes (Triton's compile holds the GIL)."""
    todo = variants()
    if workers == 1:
        return [compile_variant(v) for v in todo]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_variant, todo, chunksize=4))


def table(results: list[Resources]) -> str:
    rows = ["| kernel variant | arch | caller aligned | warps | regs | spill st/ld B | stack B | shared B "
            "| programs/SM |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.name} | sm_{r.arch} | {'yes' if r.caller_aligned else 'no'} | {r.num_warps} | {r.regs} | "
                    f"{r.spill_stores}/{r.spill_loads} | {r.stack} | {r.shared} | {r.resident_programs()} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(compile_all()))
