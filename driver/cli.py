"""`unmask` command line: parse, then import the heavy modules the chosen command needs."""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line user errors: ``unmask: <what to fix>``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"unmask: {message} (see `{self.prog} --help`)\n")


def _step_counts(text: str) -> list[int]:
    """``--steps 4,8,16``: comma-separated positive integers."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated positive integers such as 4,8,16, not {text!r}")
    return steps


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="tiny_countdown",
                   help="YAML path or preset name in configs/ (default: tiny_countdown)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set learner.lr=1e-5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from common.tasks.protocols import PROTOCOLS  # torch-free: --help stays instant

    parser = _Parser(prog="unmask", description="Distributed RL for masked diffusion LMs.")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="run RL (default: tiny Countdown on local Ray, CPU)")
    _add_config_args(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")

    sft = sub.add_parser("sft", help="masked-diffusion SFT of a base model on solver-made completions")
    _add_config_args(sft)

    ev = sub.add_parser("eval", help="held-out accuracy of a checkpoint per sampling-step count")
    _add_config_args(ev)
    ev.add_argument("--model", help="checkpoint directory (overrides model.path)")
    ev.add_argument("--task", help="task name (overrides task.name)")
    ev.add_argument("--steps", type=_step_counts, default=None, help="comma-separated sampling-step counts, e.g. 8,16,32")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out items")
    ev.add_argument("--out", default=None, help="directory for eval.json and accuracy_vs_steps.png")
    ev.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                    help="evaluate as a paper did (its prompts, lengths, steps, subset and grader; ours beside it): "
                         "d1 = 128/256/512 tokens, block 32, steps = length/2; agrpo = 256 tokens, 128 steps")

    scale = sub.add_parser("scale", help="change the number of rollout workers of a running run")
    scale.add_argument("run_dir", metavar="RUN")
    scale.add_argument("--rollout-workers", type=int, required=True)

    stop = sub.add_parser("stop", help="finish a running run early: the current step, then the final "
                          "evaluation, checkpoint and export (resumable with train --resume)")
    stop.add_argument("run_dir", metavar="RUN")

    show = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    return parser


class _UserError(Exception):
    """A mistake the user can fix: printed as ``unmask: <message>``, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command in ("scale", "stop"):
            _scale(args.run_dir, args.rollout_workers) if args.command == "scale" else _stop(args.run_dir)
            return 0
        cfg = _config(args)
        if args.command == "config":
            from common.config.loader import dump_config

            print(dump_config(cfg), end="")
            return 0
        _check_before_start(args, cfg)
    except _UserError as e:
        print(f"unmask: {e}", file=sys.stderr)
        return 2
    return _run(args, cfg)


def _config(args):
    """The resolved config of ``args`` (a resumed run keeps its own, plus any --set given now)."""
    from pathlib import Path

    from common.config import ConfigError, load_config

    if args.command == "eval":
        _eval_overrides(args)
    if getattr(args, "resume", None):
        if not _is_run_dir(args.resume):
            raise _UserError(f"{args.resume} is not a run directory (no config.yaml)")
        args.config = str(Path(args.resume) / "config.yaml")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "eval":  # every step count must make a valid sampler with this config
            for steps in args.steps or ():
                load_config(args.config, args.overrides + [f"sampler.steps={steps}"])
    except ConfigError as e:
        raise _UserError(str(e)) from None
    return cfg


def _eval_overrides(args) -> None:
    from pathlib import Path

    from common.tasks.protocols import get_protocol

    if args.protocol and args.steps and get_protocol(args.protocol).decoding is not None:
        raise _UserError(f"--protocol {args.protocol} fixes the steps (length/2); drop --steps")
    args.overrides = list(args.overrides)
    if args.model:
        if not (Path(args.model) / "config.json").is_file():
            raise _UserError(f"--model {args.model} is not a checkpoint directory (no config.json there)")
        args.overrides += [f"model.path={args.model}", "model.preset=null"]
    if args.task:
        args.overrides.append(f"task.name={args.task}")


def _check_before_start(args, cfg) -> None:
    """What can fail in a second, before Ray starts and before a run directory exists."""
    from pathlib import Path

    from common.policy import check_decoding
    from common.tasks import check_data
    from driver.runtime import resume_problem

    if getattr(args, "resume", None):
        problem = resume_problem(Path(args.resume).resolve(), cfg.run.total_steps)
        if problem:
            raise _UserError(problem)
    try:
        check_data(cfg.task, ("eval",) if args.command == "eval" else ("train", "eval"))
        check_decoding(cfg.model, cfg.sampler)
    except ValueError as e:
        raise _UserError(str(e)) from None


def _run(args, cfg) -> int:
    if args.command == "sft":
        from driver.sft import sft

        return sft(cfg)
    if args.command == "eval" and args.protocol:
        from driver.eval_protocol import evaluate_protocol

        evaluate_protocol(cfg, args.protocol, out_dir=args.out, limit=args.limit)
        return 0
    if args.command == "eval":
        from driver.evaluate import evaluate_checkpoint

        evaluate_checkpoint(cfg, args.steps or [cfg.sampler.steps], out_dir=args.out, limit=args.limit)
        return 0
    from driver.train import train

    return train(cfg, resume=args.resume)


def _is_run_dir(run_dir: str) -> bool:
    from pathlib import Path

    return (Path(run_dir) / "config.yaml").is_file()


def _running_run(run_dir: str, command: str):
    """``run_dir`` as a Path when it holds a run that has not finished (``scale`` and ``stop`` act on those)."""
    from pathlib import Path

    from driver.runtime import finished_step

    if not _is_run_dir(run_dir):
        raise _UserError(f"{run_dir} is not a run directory (no config.yaml)")
    step = finished_step(Path(run_dir))
    if step is not None:
        raise _UserError(f"{run_dir} finished at step {step}; `unmask {command}` applies to running runs only "
                         "(nothing changed)")
    return Path(run_dir)


def _stop(run_dir: str) -> None:
    from driver.runtime import write_control

    write_control(_running_run(run_dir, "stop"), stop=True)
    print(f"{run_dir}: stopping after the current step (final evaluation, checkpoint and export follow)")


def _scale(run_dir: str, n: int) -> None:
    from driver.runtime import write_control

    if n < 0:
        raise _UserError("--rollout-workers must be >= 0")
    write_control(_running_run(run_dir, "scale"), rollout_workers=n)
    print(f"{run_dir}: rollout workers -> {n} (the driver applies it within a second)")
