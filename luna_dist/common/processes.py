"""Processes that end with the one that started them, however it ends."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
"""prctl's option: the signal a process gets when its parent ends (Linux)."""


def killed_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have the kernel send this process `signum` (SIGKILL) when its parent ends (Linux; elsewhere nothing): a
    SIGKILLed parent runs no cleanup of its own, and a stopped child ends too. SIGTERM instead lets a child
    that starts processes of its own (a launcher) end them."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signum)
