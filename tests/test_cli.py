"""The conventions every command shares: flag checks worded one way, one `error:` line and exit 1 for work that
could not be done, exit 2 for a wrong command line."""

from __future__ import annotations

import argparse
import importlib
import signal

import pytest

from luna_dist.common import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--cts", type=int)
    parser.add_argument("--rate", type=float)
    return parser


def test_below_words_every_least_alike():
    assert cli.below("--cts", 0, 1) == "--cts must be at least 1, got 0"
    assert cli.below("--cts", 1, 1) is None
    assert cli.below("--cts", None, 1) is None  # an optional flag not given


def test_check_at_least_names_the_first_flag_below_its_least(capsys):
    parser = _parser()
    cli.check_at_least(parser, parser.parse_args(["--cts", "3", "--rate", "0.5"]), {"cts": 1, "rate": 0})
    with pytest.raises(SystemExit) as exit_:
        cli.check_at_least(parser, parser.parse_args(["--cts", "0", "--rate", "-1"]), {"cts": 1, "rate": 0})
    assert exit_.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().endswith("demo: error: --cts must be at least 1, got 0")


def test_check_in_range_includes_both_ends(capsys):
    parser = _parser()
    for value in (0.0, 0.5, 1.0):
        cli.check_in_range(parser, "--rate", value, 0.0, 1.0)
    with pytest.raises(SystemExit):
        cli.check_in_range(parser, "--rate", 1.5, 0.0, 1.0)
    assert "--rate must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_fail_is_one_error_line_and_exit_1(capsys):
    assert cli.fail("data/x.mhd: not a CT") == cli.EXIT_FAILED == 1
    assert capsys.readouterr().err == "error: data/x.mhd: not a CT\n"


@pytest.mark.parametrize("module", ["luna_dist.synth", "luna_dist.shard", "luna_dist.evaluate", "luna_dist.analyze",
                                    "luna_dist.bench"])
def test_every_command_exits_2_on_a_wrong_command_line(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--no-such-flag"])
    assert exit_.value.code == cli.EXIT_USAGE
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("python -m luna_dist.") and ": error: " in last, last


def test_training_exits_2_on_an_unknown_flag():
    from luna_dist.training.options import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--shards", "s", "--no-such-flag"])
    assert exit_.value.code == cli.EXIT_USAGE


def test_interrupts_notes_a_ctrl_c_and_keeps_one_ignored_ignored(ctrl_c_raises):
    with cli.interrupts():
        cli.raise_if_interrupted()  # no Ctrl-C yet
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # noted: raised again
            cli.raise_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # started under nohup
    with cli.interrupts():
        signal.raise_signal(signal.SIGINT)
        cli.raise_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_interrupts_takes_a_sigterm_as_a_ctrl_c_that_says_so(sigterm_raises):
    """SIGTERM (`kill`, a batch system's time limit) ended a command at once, saying nothing of what it kept."""
    assert cli.interruption() == ("interrupted", 130)
    before = signal.getsignal(signal.SIGTERM)
    with cli.interrupts():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):  # noted: raised again
            cli.raise_if_interrupted()
    assert cli.interruption() == ("stopped by SIGTERM", 143)
    assert signal.getsignal(signal.SIGTERM) is before
    with cli.interrupts():  # the next command starts with no signal noted
        cli.raise_if_interrupted()
    assert cli.interruption() == ("interrupted", 130)
