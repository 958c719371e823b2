"""Moved to ``common.policy`` (both sides load the policy); kept until every caller is updated."""
from common.policy import load_policy, resolve_path  # noqa: F401
