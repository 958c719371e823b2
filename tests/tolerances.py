"""Tolerances relative to a quantity's fp32 precision, for values that reach the test through different
summation orders (micro-batches, ranks, a resumed optimizer): an absolute 1e-6 is below fp32's resolution
for a gradient norm of 15.7 (one ulp there is 9.5e-7), so it fails on machines that sum in another order."""
import pytest
import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp at 1.0
SUMMATION_ULPS = 64  # reordering a sum of a few hundred fp32 terms moves it by a few tens of ulps at most


def fp32_approx(expected: float, ulps: int = SUMMATION_ULPS, floor: float = 1e-6):
    """``pytest.approx`` within ``ulps`` fp32 ulps of ``expected``'s magnitude (``floor`` near zero)."""
    return pytest.approx(expected, rel=ulps * FP32_EPS, abs=floor)
