"""Fused masked-logit sampling: a Triton kernel on CUDA and its pure-torch reference elsewhere."""
from rollout.kernels.reference import RowStats, sample_rows_reference, support_cutoff

__all__ = ["RowStats", "sample_rows", "sample_rows_reference", "support_cutoff"]

_KERNELS = ("auto", "triton", "torch")


def sample_rows(logits_NV, temperature, seed, row_ids_N, cutoff_N=None, kernel: str = "auto") -> RowStats:
    """Dispatch to the Triton kernel or the reference; same signature, same Philox stream and semantics.

    ``kernel``: "triton" (error if Triton or CUDA is missing), "torch" (reference), "auto" (Triton
    when the logits are on CUDA, else the reference).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = "triton" if logits_NV.is_cuda else "torch"
    if kernel == "torch":
        return sample_rows_reference(logits_NV, temperature, seed, row_ids_N, cutoff_N)
    try:
        from rollout.kernels.triton_sampling import sample_rows_triton
    except ImportError as err:
        raise ValueError(f"kernel='triton' needs Triton installed ({err}); use kernel='torch'") from err
    if not logits_NV.is_cuda and not _interpreting():
        raise ValueError("kernel='triton' needs CUDA logits (or TRITON_INTERPRET=1); use kernel='torch'")
    return sample_rows_triton(logits_NV, temperature, seed, row_ids_N, cutoff_N)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
