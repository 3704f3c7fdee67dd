"""README's "On a cluster" names only commands that exist: `ray` and `serve` sub-commands and their
options (Ray's own click commands), the cluster/ files they name, the `python -m cluster.*`
commands and their options, and the `vismem` commands a `ray job submit` runs (vismem's parser).
Its plain `vismem ...` lines are tests/docs/test_examples.py's."""

import contextlib
import io
import os
import re
import shlex

import pytest

from cluster import kuberay, launcher, rayjob
from cluster.rayjob import ROOT, vismem_problems

MODULES = {"cluster.kuberay": kuberay.main, "cluster.rayjob": rayjob.main, "cluster.launcher": launcher.main}


def section_lines() -> list[str]:
    """The command lines of the code blocks in README's "On a cluster" (continuations joined, comments cut)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## On a cluster\n"):]
    section = section[:section.index("\n## ", 1)]
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", section, flags=re.M | re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


LINES = section_lines()


def click_options(command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts}


def help_of(main, argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return out.getvalue()


def test_the_section_has_each_kind_of_command():
    firsts = {tuple(shlex.split(line)[:2]) for line in LINES}
    for expected in [("ray", "up"), ("ray", "job"), ("serve", "deploy"), ("kubectl", "apply"), ("python", "-m")]:
        assert expected in firsts


@pytest.mark.parametrize("line", [line for line in LINES if line.split()[0] in ("ray", "serve")])
def test_ray_and_serve_commands_exist_with_their_options(line):
    from ray.scripts.scripts import cli as ray_cli          # Ray's own command line
    from ray.serve.scripts import cli as serve_cli
    words = shlex.split(line)
    group, rest = (ray_cli, words[1:]) if words[0] == "ray" else (serve_cli, words[1:])
    command = group.commands[rest[0]]                       # KeyError: no such command
    if rest[0] == "job":
        command, rest = command.commands[rest[1]], rest[1:]
    args = rest[1:rest.index("--")] if "--" in rest else rest[1:]
    assert {w.split("=")[0] for w in args if w.startswith("-")} <= click_options(command)
    for word in args:
        if word.startswith("cluster/"):
            assert os.path.exists(os.path.join(ROOT, word)), word
    if "--" in rest:                                        # the job's entrypoint
        entry = rest[rest.index("--") + 1:]
        if entry[:3] == ["python", "-m", "cluster.cli"]:
            entry = ["vismem", *entry[3:]]
        assert vismem_problems(shlex.join(entry), line) == []


@pytest.mark.parametrize("line", [line for line in LINES if line.startswith("python -m cluster.")])
def test_python_module_commands_exist_with_their_options(line):
    words = shlex.split(line)
    module = words[2]
    if module == "cluster.cli":
        assert vismem_problems(shlex.join(["vismem", *words[3:]]), line) == []
        return
    main = MODULES[module]
    sub = [words[3]] if module == "cluster.rayjob" else []
    shown = help_of(main, sub)
    assert all(re.search(rf"(?<![\w-]){w}(?![\w-])", shown) for w in words[3:] if w.startswith("--")), line
    for word in words[3:]:
        if word.startswith("cluster/"):
            assert os.path.exists(os.path.join(ROOT, word)), word


def test_kubectl_applies_files_that_exist_or_are_rendered_just_before():
    rendered = {w for line in LINES for w in re.findall(r"--out(?:-file)? (\S+\.yaml)", line)}
    for line in LINES:
        if line.startswith("kubectl apply -f "):
            path = line.split()[3]
            assert path in rendered or os.path.exists(os.path.join(ROOT, path)), path
