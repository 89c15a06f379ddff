"""What every command shares: its exit codes, its logging, and flag checks worded one way.

Exit codes of every `python -m luna_dist.*` command:

    0    done
    1    the command could not do its work: bad input, a failed CT or run, a full disk. One
         line `error: ...` on stderr names the file, flag or rank and what to do; finished
         work is kept and a rerun resumes it
    2    the command line itself is wrong (argparse's usage message), before anything starts
    130  interrupted (Ctrl-C); what is kept and how to go on is said in one line
    143  stopped by SIGTERM (`kill`, a batch system's time limit): as Ctrl-C
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def setup_logging() -> None:
    """Time-stamped lines on stderr; accelerate's per-file checkpoint lines are left out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)


_stopped_by: int | None = None
"""The signal that stopped the command (see `interrupts`), if one did."""


@contextmanager
def interrupts() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, and are noted so that `raise_if_interrupted` raises it again.

    Python raises a Ctrl-C's KeyboardInterrupt wherever the main thread is. Raised inside a
    finalizer (a `__del__`, a weakref callback, a generator the garbage collector closes) it
    is printed and dropped, and a training run went on to its end with exit 0. Training
    calls `raise_if_interrupted` once a step, the analysis once a CT. SIGTERM (`kill`, a
    batch system's time limit, a container stopped) is handled the same way: it ended the
    process at once, saying nothing of what was kept, and without ending its data workers.
    The previous handlers come back on leaving; a signal the process was started ignoring
    (Ctrl-C under nohup or in a background job) is still ignored, as Python does.
    """
    global _stopped_by
    _stopped_by = None
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    handled = [signum for signum, handler in previous.items() if handler is not signal.SIG_IGN]
    for signum in handled:
        signal.signal(signum, _note_and_raise)
    try:
        yield
    finally:
        for signum in handled:
            signal.signal(signum, previous[signum])


def _note_and_raise(signum: int, frame: object) -> None:
    global _stopped_by
    _stopped_by = signum
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """KeyboardInterrupt when a Ctrl-C or SIGTERM came (see `interrupts`), even one that Python dropped."""
    if interrupted():
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a Ctrl-C or SIGTERM came (see `interrupts`)."""
    return _stopped_by is not None


def interruption() -> tuple[str, int]:
    """How an interrupted command's line begins, and its exit code: Ctrl-C's, or SIGTERM's."""
    if _stopped_by == signal.SIGTERM:
        return "stopped by SIGTERM", EXIT_TERMINATED
    return "interrupted", EXIT_INTERRUPTED


def below(flag: str, value, least) -> str | None:
    """The message for a flag's value below its least, worded as every command words it; None when it is not."""
    if value is not None and value < least:
        return f"{flag} must be at least {least}, got {value}"
    return None


def check_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, least: dict[str, float]) -> None:
    """parser.error for the first flag (by its dest name) of `least` whose value is below its least."""
    for name, minimum in least.items():
        if (problem := below(f"--{name.replace('_', '-')}", getattr(args, name), minimum)) is not None:
            parser.error(problem)


def outside(flag: str, value, low, high) -> str | None:
    """The message for a flag's value outside [low, high], worded as every command words it; None when inside."""
    if value is not None and not low <= value <= high:
        return f"{flag} must be in [{low:g}, {high:g}], got {value}"
    return None


def check_in_range(parser: argparse.ArgumentParser, flag: str, value: float, low: float, high: float) -> None:
    """parser.error where `value` of `flag` is outside [low, high]."""
    if (problem := outside(flag, value, low, high)) is not None:
        parser.error(problem)


def byte_size(text: str) -> int:
    """A flag's size in bytes (argparse's `type`): 40GB, 500MB, 1.5TB, 40G (powers of 1000), 40GiB (of 1024), or a
    number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(i?))?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give e.g. 40GB, 500MB or 40GiB")
    number, prefix, binary = match.groups()
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def arguments_json(arguments: dict) -> dict:
    """A command's arguments as its outputs record them (`produced_by`, a manifest): paths, alone or in a
    list, as strings; every other value as it is."""
    def as_json(value):
        if isinstance(value, list):
            return [as_json(v) for v in value]
        return str(value) if isinstance(value, Path) else value
    return {name: as_json(value) for name, value in arguments.items()}


def fail(message: str) -> int:
    """Print the one line of a failed command and return its exit code."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILED
