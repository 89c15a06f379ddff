"""Where the analysis writes: every path below `--out`, and a series' name as a file name.

A series' uid comes from its input (a DICOM tag, an image header's `0020|000e` line, a
file's name), so it may hold anything: `../../x`, an absolute path, 300 characters. It
names its outputs (`ct/<name>.json`, `ct/<name>.html`, the images in `ct/<name>/`) only
through `file_name`, and every path the analysis writes below `--out` is made by `below`,
which refuses one that resolves outside it (through a link in it, say).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

KEPT = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""A uid used as it is for its file names: letters, digits, `_`, `.`, `-`, at most 128 characters (every
LUNA16 and DICOM uid; a DICOM uid has at most 64), not starting with `.`."""

PREFIX_LENGTH = 64
"""Characters of a uid kept, made safe, at the start of its file name where it is not used as it is."""

HASH_LENGTH = 16
"""Hex digits of the uid's sha256 that end such a name, after a `~`, which no name used as it is holds."""


class OutsideError(ValueError):
    """A path that would lie outside `--out`; nothing is written there."""


def file_name(uid: str) -> str:
    """The name of a series' files: the uid itself where `KEPT` takes it as it is, so result folders of
    such uids keep their names; else its first PREFIX_LENGTH characters, each outside `KEPT`'s set made `_`,
    then `~` and the sha256 of the whole uid (`../../victim` -> `.._.._victim~…` without its leading dots):
    recognisable, one path component, and another for every other uid."""
    if KEPT.fullmatch(uid) and not uid.startswith("."):
        return uid
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", uid[:PREFIX_LENGTH]).lstrip(".")
    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LENGTH]
    return f"{prefix}~{digest}"


def below(out: Path, *parts: str) -> Path:
    """`out` / `parts`, checked to resolve inside `out` (links followed); OutsideError otherwise."""
    path = Path(out).joinpath(*parts)
    resolved = path.resolve()
    if not resolved.is_relative_to(Path(out).resolve()):
        raise OutsideError(f"{path}: resolves to {resolved}, outside --out {out}: not written there")
    return path
