"""Shared by rollout and learner: config, model, tokenizers, tasks, schema, queue, metrics.

Nothing in this package imports from ``rollout`` or ``learner``.
"""
