"""Names of a series' files, and paths below --out: whatever a uid holds, its files stay inside --out."""

from __future__ import annotations

import re

import pytest

from luna_dist.common.out_folder import OutsideError, below, file_name

KEPT = ["1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860", "tiny.1", "scan", "Smith_John-2",
        "9" * 128]
CHANGED = ["../../../victim", "/home/someone/victim", "Smith, John", "a\nb", ".", "..", ".hidden", "", "9" * 129,
           "séance", "a/b", "a\\b", "con:1", "x~0123456789abcdef"]


@pytest.mark.parametrize("uid", KEPT)
def test_a_uid_that_is_a_safe_file_name_is_kept_as_it_is(uid):
    """So the result folders of LUNA16's uids keep their names, and a rerun resumes them."""
    assert file_name(uid) == uid


def test_any_other_uid_becomes_one_safe_recognisable_component_of_its_own():
    names = [file_name(uid) for uid in CHANGED]
    for uid, name in zip(CHANGED, names):
        assert re.fullmatch(r"[A-Za-z0-9_.-]*~[0-9a-f]{16}", name) and not name.startswith("."), (uid, name)
        assert len(name) <= 64 + 1 + 16
    assert file_name("../../../victim").startswith("_.._.._victim~")
    assert file_name("Smith, John").startswith("Smith__John~")
    assert len(set(names)) == len(names) and not set(names) & set(KEPT)  # a "~" is in no name kept as it is


def test_below_refuses_a_path_that_a_link_takes_outside(tmp_path):
    out = tmp_path / "out"
    (out / "ct").mkdir(parents=True)
    assert below(out, "ct", "a.json") == out / "ct" / "a.json"
    (out / "ct" / "elsewhere").symlink_to(tmp_path)
    with pytest.raises(OutsideError, match=r"elsewhere/a.png: resolves to .*, outside --out"):
        below(out, "ct", "elsewhere", "a.png")
    with pytest.raises(OutsideError):
        below(out, "..", "a.json")
