"""Every command line in the cluster configs, rendered for a given memory and encoder, is a real
`vismem` command: the CLI's parser takes it whole, and its `--help` works in a process of its own
(`python -m cluster.cli`, what the `vismem` console script runs)."""

import argparse
import json
import os
import subprocess
import sys
import tomllib

import pytest

from cluster.kuberay import check_rayservice, rayservice
from cluster.launcher import COMMAND_KEYS, LAUNCHER, load
from cluster.rayjob import ROOT, check_rayjob, commands, embed_build_job, train_job, vismem_problems
from cluster.serve_app import ServeArgs
from cluster.serve_config import serve_config

CODE = "s3://bucket/code/vismem.zip"
ENCODER = "s3://bucket/runs/enc1/encoder"
# Runs `python -m cluster.cli ARGS` for each ARGS as the interpreter would, in one process (the
# imports are shared: each --help alone costs seconds of start-up), and reports exit code and output.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = ["vismem", *argv]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("cluster.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
    print(json.dumps({"argv": argv, "code": code, "out": out.getvalue()}))
"""


def subcommand(argv: list[str]) -> list[str]:
    """The words of ``vismem ARGV`` that name its (sub)command, e.g. ['index', 'build']."""
    from cluster.cli import parser    # as the CLI builds it
    words, current = [], parser()
    for word in argv:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        words.append(word)
        current = actions[0].choices[word]
    return words


@pytest.fixture(scope="module")
def rendered(memory) -> dict[str, list[str]]:
    """{config: its command lines}, each config rendered for the test memory and ENCODER and checked."""
    train = train_job(os.path.dirname(ENCODER), CODE)
    embed = embed_build_job("s3://bucket/images", ENCODER, "s3://bucket/emb", memory, CODE)
    service = rayservice(serve_config(ServeArgs(memory=memory, token_env="VISMEM_TOKEN"), shards=3, autoscale=(1, 4)))
    for job in (train, embed):
        check_rayjob(job)
    check_rayservice(service)                          # a RayService runs no command: Serve builds the app
    launcher = load(LAUNCHER)
    return {"rayjob train": [train["spec"]["entrypoint"]], "rayjob embed-build": [embed["spec"]["entrypoint"]],
            "ray-cluster.yaml": [line for key in COMMAND_KEYS for line in launcher.get(key) or []]}


def test_the_console_script_is_the_module_the_test_runs():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"] == {"vismem": "cluster.cli:main"}


def test_every_vismem_command_in_the_configs_parses_and_its_help_works(rendered, memory):
    lines = [argv for config in rendered.values() for line in config for argv in commands(line)]
    found = [argv for argv in lines if argv[0] == "vismem"]
    assert {tuple(subcommand(a[1:])) for a in found} == {("encoder", "train"), ("embed",), ("index", "build"), ()}
    assert memory in {word for argv in found for word in argv} and ENCODER in {w for a in found for w in a}
    for config, config_lines in rendered.items():
        assert all(not vismem_problems(line, config, only_vismem=False) for line in config_lines)
    paths = sorted({tuple(subcommand(argv[1:])) for argv in found})
    done = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps([[*p, "--help"] for p in paths])],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    helps = {tuple(r["argv"][:-1]): r for r in map(json.loads, done.stdout.splitlines())}
    assert set(helps) == set(paths)
    for argv in found:
        shown = helps[tuple(subcommand(argv[1:]))]
        assert shown["code"] == 0 and shown["out"].startswith(f"usage: {' '.join(['vismem', *subcommand(argv[1:])])}")
        options = [w.split("=")[0] for w in argv[1:] if w.startswith("--")]
        assert all(option in shown["out"] for option in options), (argv, options)   # each option is documented


def test_a_command_that_is_not_vismems_is_found():
    assert "invalid choice: 'biuld'" in vismem_problems("vismem index biuld --memory m", "x")[0]
    assert "required: COMMAND" in vismem_problems("vismem", "x")[0]
    assert vismem_problems("ray start --head", "x") == ["x: 'ray start --head' is not a vismem command"]
    assert vismem_problems("ray start --head; vismem --help", "x", only_vismem=False) == []
