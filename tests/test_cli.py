"""The command line: help that covers every option, and one-line errors for bad input that leave
nothing behind."""

import os
import subprocess
import sys

import pytest

from cluster.cli import parser


def vismem(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": os.getcwd()})


def subcommands(p):
    for action in p._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in subcommands(sub))


def test_every_option_has_help():
    for name, sub in [("vismem", parser()), *subcommands(parser())]:
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"


def test_help_texts():
    top = vismem("--help")
    assert top.returncode == 0
    for command in ("demo", "encoder", "embed", "index", "memory", "serve", "classify", "query"):
        assert command in top.stdout
    demo = vismem("demo", "--help")
    assert demo.returncode == 0
    for option in ("--store", "--train-minutes", "--train-steps", "--preset", "--workers", "--generators", "--seed",
                   "--shards", "--port", "--fresh", "--json", "--address"):
        assert option in demo.stdout


@pytest.mark.parametrize("args, message", [
    (["embed", "--collection", "/no/such/folder", "--encoder", "raw-pixels:8", "--out", "OUT"], "/no/such/folder"),
    (["embed", "--collection", "EMPTY", "--encoder", "raw-pixels:8", "--out", "OUT"], "no images under"),
    (["embed", "--collection", "EMPTY", "--encoder", "/no/encoder", "--out", "OUT"], "no encoder checkpoint at /no/encoder"),
    (["memory", "info", "--memory", "/no/memory"], "no memory at /no/memory"),
    (["index", "build", "--embeddings", "/no/emb", "--memory", "OUT"], "no embeddings at /no/emb"),
    (["demo", "--generators", "kml,nope"], "unknown generator 'nope'"),
    (["demo", "--shards", "0"], "--shards must be positive"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("no images here")
    result = vismem(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "vismem" in line and "error" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "vismem-demo").exists()
