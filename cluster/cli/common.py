"""What every command shares: the help formatter, option helpers, value checks, one-line errors and
the signal handling of long-running commands.

Imports inside the commands are on purpose: ``vismem --help`` and each command import no Ray, FAISS or
torch they do not use (see ``cluster.cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys



class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where there is one worth reading (not None, False or []),
    and an ``examples:`` epilog as written, one command a line."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A sub-command that takes options only by their full names (``--max-min`` is not
    ``--max-minutes``: one name per option, so a renamed option fails loudly)."""
    return sub.add_parser(name, help=help, formatter_class=DefaultsHelp, allow_abbrev=False, **kwargs)


def add_group(sub, name: str, help: str) -> argparse._SubParsersAction:
    """A command group (``vismem encoder ...``) and the sub-parsers of its actions."""
    group = sub.add_parser(name, help=help, allow_abbrev=False)
    return group.add_subparsers(dest="action", metavar="ACTION", required=True)


def add_common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    if ray:
        p.add_argument("--address", default=None,
                       help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def add_k(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("-k", "--k", type=int, default=default, help="neighbours per query")


def add_device(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE", help=help)


def add_nprobe(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help=help + "; more lists is slower and closer to exact search (a Flat memory ignores it)")


def one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 400 else text[:400] + " ... (run with -v for the whole error)"


class Stopped(Exception):
    """SIGINT or SIGTERM asked a long-running command to stop; raised in the main thread."""

    def __init__(self, signum: int, cleanup: str):
        super().__init__(f"{signal.Signals(signum).name}; {cleanup}")
        self.signum = signum


def stop_on_signals(cleanup: str) -> None:
    """Turn the first SIGINT or SIGTERM into ``Stopped``, so ``with`` blocks shut down what they
    started (``cleanup`` says what, for the last line); a second signal while that runs exits at
    once. Call it after Ray is up: ``ray.init`` installs its own SIGTERM handler."""
    def first(signum, frame):
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)
        raise Stopped(signum, cleanup)

    def again(signum, frame):
        print(f"vismem: {signal.Signals(signum).name} again: exiting before the shutdown finished", file=sys.stderr)
        os._exit(130 if signum == signal.SIGINT else 1)

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{option} needs positive numbers, got {text!r}")
    return values


def parse_generators(text: str, option: str = "--generators") -> tuple[str, ...]:
    """Comma-separated generator names, each checked (an unknown name fails before Ray starts)."""
    from procdata.generators import get_generator
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError(f"{option} needs at least one generator, got {text!r}")
    for name in names:
        get_generator(name)
    return names


def check_positive(args, *options: str) -> None:
    """Each named option, when given, is a positive number (``max_minutes`` is ``--max-minutes``)."""
    for dest in options:
        value = getattr(args, dest)
        if value is not None and value <= 0:
            raise ValueError(f"--{dest.replace('_', '-')} must be positive, got {value}")


def record_printer(args):
    """Prints a benchmark's records as they come: one JSON object per line with --json (the
    command then prints no summary object after them), else ``key=value`` pairs."""
    as_json, args.json = args.json, False

    def emit(record: dict) -> None:
        print(json.dumps(record) if as_json else "  ".join(f"{k}={v}" for k, v in record.items()), flush=True)

    return emit
