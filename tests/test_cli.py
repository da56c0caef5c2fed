"""The command line explains itself: help for every argument, defaults shown, --version, group help,
no torch import for help, and every `dinoray` command the README shows parses."""
import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands(parser, prefix=()):
    """(words, parser) of every command and subcommand."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


def test_every_argument_has_help_and_every_command_help_exits_0(capsys):
    commands = list(_commands(cli.build_parser()))
    assert len(commands) >= 14
    for words, parser in commands:
        for action in parser._actions:
            assert action.help and action.help.strip(), f"dinoray {' '.join(words)}: {action.dest} has no help"
        with pytest.raises(SystemExit) as done:
            cli.main([*words, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: dinoray")
    with pytest.raises(SystemExit):
        cli.main(["bench", "data", "--help"])
    assert "(default: 20.0)" in capsys.readouterr().out, "defaults are shown"


def test_groups_print_their_own_help_and_version(capsys):
    for group, first in (("eval", "knn"), ("shards", "build"), ("bench", "data")):
        assert cli.main([group]) == 2
        out = capsys.readouterr().out
        assert out.startswith(f"usage: dinoray {group}") and first in out
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and re.match(r"dinoray \d+\.\d+", capsys.readouterr().out)


def test_help_and_validate_import_no_torch():
    code = ("import sys; from orchestrator import cli\n"
            "for argv in (['validate', 'jobs/smoke_cpu.yaml'], ['validate', 'jobs/vitg14_pipeline.yaml', '--show']):\n"
            "    cli.main(argv)\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=README.parent)
    assert res.returncode == 0, res.stderr
    assert "TORCH False" in res.stderr


def _readme_commands() -> list[list[str]]:
    """Every `dinoray ...` line of the README's code blocks (also after `--` of `ray job submit`)."""
    out = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not (line.startswith("dinoray ") or " -- dinoray " in line):
                continue
            words = shlex.split(line[line.index("dinoray "):])
            out.append(words[1:])
    return out


def test_every_readme_command_parses():
    commands = _readme_commands()
    assert len(commands) >= 8
    parser = cli.build_parser()
    seen = set()
    for argv in commands:
        args = parser.parse_args(argv)   # SystemExit(2) on an unknown command or argument
        seen.add(args.command)
    assert {"shards", "validate", "run", "status", "eval", "export"} <= seen
