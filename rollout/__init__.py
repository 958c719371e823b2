"""Rollout side: the iterative-unmasking sampler, its fused kernels, and the rollout actor."""
