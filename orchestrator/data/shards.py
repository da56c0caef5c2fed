"""argparse wiring of `dinoray shards build|verify` (until orchestrator/cli.py holds every parser).

The commands live in orchestrator/data/build.py (`cmd_build`) and orchestrator/data/verify.py
(`cmd_verify`); this module only adds their parsers and goes away when cli.py takes them over.

    dinoray shards build SRC DST
    dinoray shards verify DST
"""

from __future__ import annotations

from orchestrator.data.build import cmd_build
from orchestrator.data.verify import cmd_verify


def add_commands(subparsers) -> None:
    """Add the `shards` command group (build, verify) to an argparse subparsers object."""
    p = subparsers.add_parser("shards", help="build / verify WebDataset shards")
    sub = p.add_subparsers(dest="shards_cmd", required=True)
    b = sub.add_parser("build", help="images (folder, .tar or list file) -> DST/shard-*.tar + index.json")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--samples-per-shard", type=int, default=1000)
    b.add_argument("--bytes-per-shard", default="0", help="e.g. 256MB; 0 = by count only")
    b.add_argument("--writers", type=int, default=4, help="shards written in parallel")
    b.add_argument("--shuffle-seed", type=int, default=0)
    b.add_argument("--no-shuffle", action="store_true", help="keep sorted source order")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_build)
    v = sub.add_parser("verify", help="check every shard against index.json (count, sha256, decodable)")
    v.add_argument("dst")
    v.add_argument("--workers", type=int, default=4)
    v.set_defaults(func=cmd_verify)
