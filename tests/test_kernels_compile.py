"""Every Triton kernel, in every variant the launcher can have the JIT build, compiles for sm_80 and
sm_90 within the target's limits (issue 27: GPU code that has never run still compiles). No GPU: ptxas
ships with Triton. Variants come from ``triton_sampling.launch_configs``, which the launcher shares."""
import os

import pytest

pytest.importorskip("triton", reason="Triton is not installed")
from rollout.kernels import compile_check  # noqa: E402
from rollout.kernels.triton_sampling import LOGIT_DTYPES, MAX_SPLITS, launch_configs  # noqa: E402

if (_why := compile_check.toolchain_missing()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def compiled():
    """All variants, compiled once for the module (~25 s on 2 cores)."""
    return compile_check.compile_all(workers=min(2, os.cpu_count() or 1))


def test_every_kernel_has_variants_for_every_dtype_and_split_count():
    names = {launch.kernel.__name__ for launch in launch_configs()}
    assert names == {"_partial_kernel", "_finish_kernel"}
    x_types = {launch.signature["x_ptr"] for launch in launch_configs()}
    assert x_types == {f"*{t}" for t in LOGIT_DTYPES.values()}
    s_blocks = {launch.constexprs["S_BLOCK"] for launch in launch_configs() if "S_BLOCK" in launch.constexprs}
    assert max(s_blocks) == MAX_SPLITS


def test_every_variant_compiles_for_both_archs(compiled):
    assert len(compiled) == len(compile_check.variants())
    assert {r.arch for r in compiled} == set(compile_check.ARCHS)


def test_registers_and_no_spills(compiled):
    bad = [f"{r.name} sm_{r.arch} aligned={r.caller_aligned}: {r.regs} regs, spills {r.spill_stores}/"
           f"{r.spill_loads} B, stack {r.stack} B" for r in compiled
           if r.regs > compile_check.MAX_REGS or r.spill_stores or r.spill_loads or r.stack]
    assert not bad, "\n".join(bad)


def test_shared_memory_within_the_target(compiled):
    bad = [f"{r.name} sm_{r.arch}: {r.shared} B > {compile_check.SHARED_PER_BLOCK[r.arch]} B" for r in compiled
           if r.shared > compile_check.SHARED_PER_BLOCK[r.arch]]
    assert not bad, "\n".join(bad)


def test_registers_allow_the_tuned_occupancy(compiled):
    # the partial kernel runs 8 warps for 2 programs per SM: above 128 registers only 1 fits
    bad = [f"{r.name} sm_{r.arch} aligned={r.caller_aligned}: {r.regs} regs fit {r.resident_programs()} programs "
           f"per SM, tuned for {r.programs_per_sm}" for r in compiled if r.resident_programs() < r.programs_per_sm]
    assert not bad, "\n".join(bad)


@pytest.mark.gpu
def test_jit_on_a_gpu_builds_only_listed_variants():
    """What the JIT compiles at run time (seen by its cache hook) is in ``launch_configs``, aligned as listed."""
    import torch
    from triton import knobs

    from rollout.kernels.triton_sampling import sample_rows_triton

    def key(name, signature, constexprs, num_warps):
        return name, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())), num_warps

    listed = {key(la.kernel.__name__, la.signature, la.constexprs, la.num_warps): la for la in launch_configs()}
    seen = []

    def before_compile(*, fn, compile, **_):
        seen.append((fn.jit_function, compile))
        return False  # go on compiling

    with knobs.runtime.scope():
        knobs.runtime.jit_cache_hook = before_compile
        gen = torch.Generator(device="cuda").manual_seed(0)
        for dtype in LOGIT_DTYPES:
            base = (torch.randn(4, 50_016, device="cuda", generator=gen) * 3).to(dtype)
            for logits in (base, base[:, 1:]):  # 16-aligned rows; misaligned rows of odd length
                rows = torch.arange(4, device="cuda")
                for temperature in (0.0, 0.9, 1.0):
                    for cutoff in (None, logits.float().topk(5, -1).values[:, -1]):
                        sample_rows_triton(logits, temperature, 3, rows, cutoff)
    assert seen, "no compile seen: were the kernels compiled earlier in this process?"
    for kernel, info in seen:
        names = kernel.arg_names
        signature = {a: t for a, t in info["signature"].items() if t != "constexpr"}
        constexprs = {names[path[0]]: value for path, value in info["constants"].items()}
        k = key(kernel.__name__, signature, constexprs, info["num_warps"])
        assert k in listed, k
        divisible = {names[path[0]] for path, attr in info["configs"][0].items() if attr}  # [] for "not"
        launch = listed[k]
        assert set(launch.aligned) <= divisible <= set(launch.aligned + launch.caller_aligned), (k, divisible)
