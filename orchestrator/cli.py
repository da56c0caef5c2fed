"""The `dinoray` command line.

    dinoray --help
    dinoray validate jobs/smoke_cpu.yaml
    dinoray run jobs/smoke_cpu.yaml [--set a.b=c] [--restart-from PHASE]
    dinoray status RUN_URL [--json]
    dinoray shards build SRC DST | dinoray shards verify DST
    dinoray bench data URL [--seconds S] [--workers N] [--json]
    dinoray eval knn --weights W --train URL --test URL [--json]
    dinoray export RUN_URL --phase P --format dinov2|timm|safetensors OUT

Each command lives in its own module, which adds its parsers with `add_commands(subparsers)`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "orchestrator.pipeline.controller",   # validate, run, status
    "orchestrator.data.shards",       # shards build / verify
    "orchestrator.data.bench",    # bench data
    "orchestrator.eval.knn",     # eval knn
    "orchestrator.eval.export",       # export
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoray", description="Train DINOv2 backbones on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
