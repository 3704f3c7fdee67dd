"""Every command-line example in the help texts, README.md and the Makefile still works.

The examples are read from the texts themselves: every ``examples:`` epilog of ``vismem --help``
and its commands; README lines in code blocks that start with ``vismem `` (or ``python -m
cluster.cli``), with continuations joined; inline ``vismem ...`` spans; ``make demo ARGS="..."``
in README and the Makefile. A concrete example must parse with ``parser()`` (a renamed or missing
option fails here); a synopsis (``[--opt X]``, ``a|b``, ``URL``) must name commands and options
that exist; the cheap ones (``--help``, ``procdata preview``) run as real subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import parser

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = re.compile(r"[A-Z][A-Z_=]*(\.\.\.)?")


def needs_one(p) -> bool:
    """Whether ``p`` runs only with a sub-command (``vismem serve`` runs alone; ``serve bench`` is optional)."""
    return any(a.__class__.__name__ == "_SubParsersAction" and a.required for a in p._actions)


def subparsers(p):
    """(name, parser) of the direct sub-commands of ``p``."""
    for action in p._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


def all_parsers(p=None, path=()):
    p = p or parser()
    yield path, p
    for name, sub in subparsers(p).items():
        yield from all_parsers(sub, (*path, name))


def join_continuations(lines):
    """One line per command: a trailing ``\\`` joins the next line, and so does an indented line
    after a ``vismem`` line (a synopsis wrapped under its command)."""
    joined, buf = [], ""
    for line in lines:
        if not buf and joined and joined[-1].startswith("vismem ") and line[:1].isspace() and line.strip():
            buf = joined.pop()
        buf = f"{buf} {line.strip()}" if buf else line.strip()
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        joined.append(buf)
        buf = ""
    return joined + ([buf] if buf else [])


def without_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def readme_examples(text: str) -> list[tuple[str, str]]:
    """(where, the arguments after ``vismem``) of every example in README's code blocks and prose."""
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        for line in join_continuations(block.splitlines()):
            if line.startswith("vismem "):
                found.append(("README", without_comment(line.removeprefix("vismem "))))
            elif "python -m cluster.cli " in line:
                found.append(("README", without_comment(line.split("python -m cluster.cli ", 1)[1])))
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    found += [("README prose", e) for e in re.findall(r"`vismem ([^`]+)`", prose)]
    found += [("README prose", f"demo {args}") for args in re.findall(r'`make demo ARGS="([^"]*)"`', prose)]
    return found


def epilog_examples() -> list[str]:
    found = []
    for _, p in all_parsers():
        if p.epilog and p.epilog.startswith("examples:"):
            found += [without_comment(line.strip().removeprefix("vismem ")) for line in p.epilog.splitlines()[1:]
                      if line.strip().startswith("vismem ")]
    return found


def words_of(example: str) -> list[str]:
    return shlex.split(example.replace("[", " ").replace("]", " "), comments=True)


def is_synopsis(example: str) -> bool:
    """A usage line (``[--opt X]``, ``a|b``, ``URL``, ``IMAGE...``) rather than a command to run."""
    return "[" in example or any("|" in w or w.endswith("...") or PLACEHOLDER.fullmatch(w) for w in words_of(example))


def makefile_examples() -> list[tuple[str, str]]:
    text = (ROOT / "Makefile").read_text()
    return [("Makefile", f"demo {args}") for args in re.findall(r'make demo ARGS="([^"]*)"', text)]


README = (ROOT / "README.md").read_text()
EXAMPLES = readme_examples(README) + [("--help", e) for e in epilog_examples()] + makefile_examples()


def test_examples_were_found():
    """The extraction itself: the texts hold examples of every kind it reads."""
    readme = [e for source, e in EXAMPLES if source.startswith("README")]
    assert len(readme) >= 20 and len(epilog_examples()) >= 10 and makefile_examples()
    assert any(e.startswith("encoder eval-knn") and "--queries" in e for e in readme)     # a joined continuation
    assert any(e.startswith("encoder train --out URL") and "--real-data" in e for e in readme)   # a wrapped synopsis
    assert any(e.startswith("demo ") and "--store" in e for e in readme)                 # python -m cluster.cli
    assert any(is_synopsis(e) for e in readme) and not all(is_synopsis(e) for e in readme)


def check_synopsis(words: list[str]) -> None:
    """Commands (``a|b`` alternatives, ``COMMAND`` for any) exist and every option is known to each."""
    parsers, i = [("vismem", parser())], 0
    while i < len(words) and not words[i].startswith("-") and all(subparsers(p) for _, p in parsers):
        word, nxt = words[i], []
        for name, p in parsers:
            choices = subparsers(p)
            names = list(choices) if PLACEHOLDER.fullmatch(word) else word.split("|")
            for n in names:
                assert n in choices, f"{name} has no command {n!r} (commands: {', '.join(choices)})"
                nxt.append((f"{name} {n}", choices[n]))
        parsers, i = nxt, i + 1
    options = {word.split("=", 1)[0] for word in words[i:] if word.startswith("-")}
    for name, p in parsers:
        if subparsers(p) and needs_one(p) and not options <= {"-h", "--help"}:   # `vismem encoder --help` is fine
            pytest.fail(f"{name} needs one of: {', '.join(subparsers(p))}")
        for option in sorted(options - set(p._option_string_actions)):
            pytest.fail(f"{name} has no option {option}")


def parse(words: list[str]):
    """``parser().parse_args(words)``; a failure shows argparse's own message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser().parse_args(words)
    except SystemExit as e:
        if e.code != 0:
            pytest.fail(f"vismem {shlex.join(words)}: {err.getvalue().strip().splitlines()[-1]}")
        return None                                                     # --help


def runs_here(words: list[str]) -> bool:
    """Examples cheap enough to run for real: help texts and the preview grid."""
    return "--help" in words or words[:2] == ["procdata", "preview"]


@pytest.mark.parametrize("source, example", EXAMPLES, ids=[f"{s}: {e[:70]}" for s, e in EXAMPLES])
def test_example_parses(source, example):
    words = words_of(example)
    mention = source == "README prose" and not any(w.startswith("-") for w in words)   # "`vismem embed` writes ..."
    if is_synopsis(example) or mention:
        check_synopsis(words)
    else:
        parse(words)


RUNNABLE = sorted({e for _, e in EXAMPLES if not is_synopsis(e) and runs_here(words_of(e))})


@pytest.mark.parametrize("example", RUNNABLE)
def test_cheap_example_runs(tmp_path, example):
    words = words_of(example)
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *words], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    if "--help" in words:
        assert result.stdout.startswith("usage: vismem")
    else:
        out = tmp_path / words[words.index("--out") + 1]
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runnable_examples_exist():
    assert any("--help" in e for e in RUNNABLE) and any(e.startswith("procdata preview") for e in RUNNABLE)


def test_every_command_help_renders():
    """``vismem ... --help`` of every command and group exits 0 and lists each of its options."""
    for path, p in all_parsers():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            parser().parse_args([*path, "--help"])
        assert exit_.value.code == 0, path
        for action in p._actions:
            for option in action.option_strings:
                assert option in out.getvalue(), f"vismem {' '.join(path)} --help does not show {option}"
