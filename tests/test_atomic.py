"""Files appear complete or not at all."""

from __future__ import annotations

import errno
import json
import os

import pytest

from luna_dist.common.atomic import atomic_open, write_json


def test_the_file_appears_only_when_complete(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with atomic_open(path) as f:
        f.write("new\n")
        f.flush()
        assert path.read_text() == "old\n"  # the old file stays until the new one is whole
        assert (tmp_path / "out.csv.partial").read_text() == "new\n"
    assert path.read_text() == "new\n"
    assert not (tmp_path / "out.csv.partial").exists()


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"version": 1})
    with pytest.raises(TypeError):
        write_json(path, {"version": object()})  # not serialisable: fails half-way
    assert json.loads(path.read_text()) == {"version": 1}


def test_binary_mode_and_options_pass_through(tmp_path):
    with atomic_open(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    with atomic_open(tmp_path / "c.csv", newline="") as f:
        f.write("a\r\n")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.csv").read_bytes() == b"a\r\n"


def test_a_write_that_fails_leaves_no_partial_and_names_the_file(tmp_path):
    """A full disk fails a write with no file name in its error ("No space left on device: None")."""
    path = tmp_path / "report.html"
    with pytest.raises(OSError) as err:
        with atomic_open(path) as f:
            f.write("<html>")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write to a full disk raises it
    assert err.value.filename == str(path) and err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
