"""The command line: help for every command, clear errors, planned commands say so."""

import subprocess
import sys

import pytest

from medformer.cli import NOT_AVAILABLE, build_parser, main

COMMANDS = [
    "data",
    "pretrain",
    "finetune",
    "evaluate",
    "predict",
    "demo",
    "generate",
    "adapt",
    "benchmark",
    "templates",
]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", [*COMMANDS, "data inspect"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd.split(), "--help"])
    assert e.value.code == 0
    assert "usage: medformer" in capsys.readouterr().out


def test_shared_options_parse_the_same_everywhere():
    parser = build_parser()
    for cmd in ["pretrain", "finetune", "adapt"]:
        args = parser.parse_args([cmd, "--device", "cpu", "--seed", "5", "--output", "x", "--set", "a.b=1"])
        assert (args.device, args.seed, args.output, args.overrides) == ("cpu", 5, "x", ["a.b=1"])


def test_console_script_and_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "medformer", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("medformer ")


def test_inspect_missing_path_is_one_line_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nothing_here"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "nothing_here" in err and "does not exist" in err and "Traceback" not in err


def test_planned_command_says_so_and_fails(capsys):
    assert main(["benchmark"]) == NOT_AVAILABLE
    assert "not available yet" in capsys.readouterr().err
