"""The run's checkpoints and its exported policy: a checkpoint is the learner's weights and optimizer plus the
run state (``driver.ledger.RunState``); ``--resume`` and a learner rebuild restore both together, so each prompt
is trained once in the weights' history."""
from __future__ import annotations

import logging
from pathlib import Path

from common.config import UnmaskConfig
from driver.ledger import RunState
from driver.runtime import RunError

log = logging.getLogger("unmask")


def save(learner, run_dir: Path, state: RunState) -> str:
    """Checkpoint the learner's weights and optimizer with ``state``; returns the checkpoint's path."""
    return learner.save(str(run_dir / "checkpoints"), run_state=state.to_dict())


def resume(learner, run_dir: Path) -> RunState:
    """Restore weights, optimizer and run state from the last checkpoint, as a new driver incarnation.

    The dead driver's queued and in-flight groups are not recovered: the prompts they answer are not in
    the restored state's trained set, so they are dispatched again (to the restored weights) and each
    prompt is trained exactly once. Its spill files move to ``trajectories/driver-<n>/`` (plots read them).
    """
    record = learner.load(str(run_dir / "checkpoints"))
    if "run_state" not in record:
        raise RunError(f"{run_dir}: the checkpoint has no run state (written by an older Unmask); "
                       "start a new run from its exported policy")
    state = RunState.from_dict(record["run_state"])
    state.incarnation += 1
    spill = run_dir / "trajectories"
    old = spill / f"driver-{state.incarnation - 1}"
    old.mkdir(parents=True, exist_ok=True)
    for path in list(spill.iterdir()):
        if path.is_file():
            path.rename(old / path.name)
    log.info("resumed: step %d, version %d; %d prompt(s) trained so far, the rest are dispatched again",
             state.step, state.version, state.trained_below + len(state.trained_above))
    return state


def restore(learner, run_dir: Path) -> RunState:
    """A rebuilt learner group: the last checkpoint's weights and run state, or the start's when there is none."""
    if not any((run_dir / "checkpoints").glob("step_*")):
        return RunState()
    return RunState.from_dict(learner.load(str(run_dir / "checkpoints"))["run_state"])


def export_policy(learner, tokenizer, cfg: UnmaskConfig, run_dir: Path) -> Path:
    """The trained policy as a HF checkpoint directory with its tokenizer and model card: ``<run_dir>/policy``."""
    from common.metrics import read_metrics
    from driver.model_card import write_model_card

    policy = run_dir / "policy"
    learner.export_hf(str(policy))
    tokenizer.save(policy)
    write_model_card(policy, cfg, read_metrics(run_dir / "metrics.jsonl"), run_dir.name)
    return policy
