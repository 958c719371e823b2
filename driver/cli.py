"""`unmask` command line: parse, then import the heavy modules the chosen command needs."""
from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="tiny_countdown",
                   help="YAML path or preset name in configs/ (default: tiny_countdown)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set learner.lr=1e-5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unmask", description="Distributed RL for masked diffusion LMs.")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="run RL (default: tiny Countdown on local Ray, CPU)")
    _add_config_args(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")

    show = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv if argv is not None else (sys.argv[1:] or ["train"]))
    from common.config import ConfigError, load_config
    from common.config.loader import dump_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"unmask: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    from driver.train import train

    return train(cfg, resume=args.resume)
