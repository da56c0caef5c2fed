"""The `dinoray` command line: every command and argument, with help text and defaults.

    dinoray --help
    dinoray validate jobs/smoke_cpu.yaml [--show [PHASE]]
    dinoray run jobs/smoke_cpu.yaml [--set a.b=c] [--restart-from PHASE] [--verbose]
    dinoray status RUN_URL [--json]
    dinoray shards build SRC DST | dinoray shards verify DST
    dinoray curate JOB [--phase NAME]
    dinoray bench data URL [--seconds S] [--workers N] [--json]
    dinoray eval knn|linear|retrieval --weights W ...
    dinoray export RUN_URL --phase P --format dinov2|hf|safetensors OUT

The parser imports nothing heavy: each command's module (and torch, where it needs it) is imported
only when that command runs, so `--help` and `validate` answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from orchestrator.pipeline.schema import EvalCfg

EXPORT_FORMATS = ("dinov2", "hf", "safetensors")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each argument's default and keeps the descriptions' line breaks."""


def _version() -> str:
    try:
        return version("dinoray")
    except PackageNotFoundError:
        return "unknown (not installed: run `make setup`)"


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job spec YAML (see jobs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key; repeatable, e.g. --set phases.pretrain.steps=100")


def _add_pipeline(sub) -> None:
    p = sub.add_parser("validate", help="check a job file without running it", formatter_class=_Formatter)
    _job_args(p)
    p.add_argument("--show", nargs="?", const="", default=None, metavar="PHASE",
                   help="print the effective settings of PHASE (all phases without a name)")
    p = sub.add_parser("run", help="run (or continue) every phase of a job", formatter_class=_Formatter)
    _job_args(p)
    p.add_argument("--restart-from", metavar="PHASE", default=None,
                   help="redo PHASE and every later phase (their files are deleted)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's and the workers' own output")
    p.add_argument("--base-dir", default=None, metavar="DIR",
                   help="resolve the job file's relative paths against DIR (default: the current directory); "
                        "pass \"$PWD\" with `ray job submit`")
    p = sub.add_parser("status", help="a run's phases and live progress, read from its storage",
                       formatter_class=_Formatter)
    p.add_argument("run_url", help="the run's folder: {storage}/{name}, local path or fsspec URL")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("curate", help="deduplicate and retrieve a training set (a job's curate phase)",
                       formatter_class=_Formatter)
    _job_args(p)
    p.add_argument("--phase", default=None, help="the curate phase to run (default: the job's only one)")


def _add_shards(sub) -> None:
    shards = sub.add_parser("shards", help="build / verify WebDataset shards", formatter_class=_Formatter)
    ssub = shards.add_subparsers(dest="shards_command", metavar="SUBCOMMAND", help="what to do with shards")
    p = ssub.add_parser("build", help="images (folder, .tar or list file) -> DST/shard-*.tar + index.json",
                        formatter_class=_Formatter)
    p.add_argument("src", help="image folder (class subfolders become labels), a .tar, or a file listing paths/URLs")
    p.add_argument("dst", help="output shard folder: local path or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="images per shard")
    p.add_argument("--bytes-per-shard", default="0", help="size cap per shard, e.g. 256MB; 0 = by count only")
    p.add_argument("--writers", type=int, default=4, help="shards written in parallel")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the order of images across shards")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted source order")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p = ssub.add_parser("verify", help="check every shard against index.json (count, sha256, decodable)",
                        formatter_class=_Formatter)
    p.add_argument("dst", help="shard folder (or its index.json): local path or fsspec URL")
    p.add_argument("--workers", type=int, default=4, help="shards checked in parallel")
    bench = sub.add_parser("bench", help="benchmarks", formatter_class=_Formatter)
    bsub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", help="what to measure")
    p = bsub.add_parser("data", help="multi-crop loader images/s on shards (total and per core)",
                        formatter_class=_Formatter)
    p.add_argument("url", help="shard folder or index.json (local path or fsspec URL)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to measure")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--config", default=None, help="YAML with crops: {...} (or a job spec); default: the job defaults")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _eval_common(p: argparse.ArgumentParser, defaults: EvalCfg) -> None:
    p.add_argument("--weights", required=True, help="exported backbone file or a phase's final/ folder")
    p.add_argument("--image-size", type=int, default=None, help="eval resolution; default: the weights' training size")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per embedding batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_eval(sub) -> None:
    defaults = EvalCfg()
    ev = sub.add_parser("eval", help="evaluate a backbone", formatter_class=_Formatter)
    esub = ev.add_subparsers(dest="eval_command", metavar="METHOD", help="the evaluation to run")
    p = esub.add_parser("knn", help="weighted k-NN on labelled shards", formatter_class=_Formatter)
    _eval_common(p, defaults)
    p.add_argument("--train", required=True, help="labelled shards URL (memory bank)")
    p.add_argument("--test", required=True, help="labelled shards URL (queries)")
    p.add_argument("--k", default=",".join(map(str, defaults.ks)), help="comma-separated k values")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="softmax temperature of the neighbours' votes")
    p = esub.add_parser("linear", help="linear probe: a grid of heads on frozen features, chosen on held-out train",
                        formatter_class=_Formatter)
    _eval_common(p, defaults)
    p.add_argument("--train", required=True, help="labelled shards URL (heads are trained and chosen here)")
    p.add_argument("--test", required=True, help="labelled shards URL (read once, after the choice)")
    p.add_argument("--epochs", type=int, default=defaults.linear_epochs, help="epochs over the cached features")
    p = esub.add_parser("retrieval", help="copy-detection retrieval: mAP and recall@1 of edited copies",
                        formatter_class=_Formatter)
    _eval_common(p, defaults)
    p.add_argument("--test", required=True, help="labelled or unlabelled shards URL: queries and database")
    p.add_argument("--queries", type=int, default=defaults.retrieval_queries, help="query images")
    p.add_argument("--copies", type=int, default=defaults.retrieval_copies, help="edited copies per query")
    p.add_argument("--distractors", type=int, default=defaults.retrieval_distractors,
                   help="other images in the database")
    p = sub.add_parser("export", help="export a phase's backbone (dinov2 / hf / safetensors)",
                       formatter_class=_Formatter)
    p.add_argument("run_url", help="{storage}/{name} of the run")
    p.add_argument("--phase", required=True, help="phase name (distill students: PHASE-ARCH)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="dinov2",
                   help="dinov2: torch.hub key names at the released 518 px grid; hf: a transformers "
                        "Dinov2Model folder; safetensors: dinov2 keys, safetensors file")
    p.add_argument("out", help="output file (hf: a folder); local path or fsspec URL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoray", description="Train DINOv2 backbones on Ray.",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="run `dinoray COMMAND --help` for its arguments")
    _add_pipeline(sub)
    _add_shards(sub)
    _add_eval(sub)
    return parser


def _group_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of a command group (`dinoray eval` -> the eval parser)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


# What each command runs. Each imports its module when it runs (torch only for commands that need it).
def _validate(args):
    from orchestrator.pipeline import controller
    return controller.cmd_validate(args)


def _run(args):
    from orchestrator.pipeline import controller
    return controller.cmd_run(args)


def _status(args):
    from orchestrator.pipeline import progress
    return progress.cmd_status(args)


def _curate(args):
    from orchestrator.curate import phase
    return phase.cmd_curate(args)


def _shards_build(args):
    from orchestrator.data import build
    return build.cmd_build(args)


def _shards_verify(args):
    from orchestrator.data import verify
    return verify.cmd_verify(args)


def _bench_data(args):
    from orchestrator.data import bench
    return bench.cmd_bench(args)


def _eval_knn(args):
    from orchestrator.eval import knn
    return knn.cmd_knn(args)


def _eval_linear(args):
    from orchestrator.eval import linear
    return linear.cmd_linear(args)


def _eval_retrieval(args):
    from orchestrator.eval import retrieval
    return retrieval.cmd_retrieval(args)


def _export(args):
    from orchestrator.eval import export
    return export.cmd_export(args)


COMMANDS = {"validate": _validate, "run": _run, "status": _status, "curate": _curate,
            "shards build": _shards_build, "shards verify": _shards_verify, "bench data": _bench_data,
            "eval knn": _eval_knn, "eval linear": _eval_linear, "eval retrieval": _eval_retrieval,
            "export": _export}
GROUPS = ("shards", "bench", "eval")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    sub = getattr(args, f"{args.command}_command") if args.command in GROUPS else ""
    if sub is None:  # a group without its subcommand: that group's own help
        _group_parser(parser, args.command).print_help()
        return 2
    return int(COMMANDS[f"{args.command} {sub}".strip()](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
