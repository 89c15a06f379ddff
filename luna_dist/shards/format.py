"""The shard format, owned in one place: names, keys, checksums, the manifest, what a task cuts.

A shard set is a folder (or URL) holding `manifest.json` and tar files
`fold{K}-{label}-NNNNNN.tar` (labels `pos`, `neg` and, for segmentation, `val`). Every
sample carries `crc32.json`, the CRC-32 of each of its other members. The writer
(`luna_dist.shards.build`) and every reader (`luna_dist.data.streams`, the sample modules)
import their names from here; what each kind of sample holds, and how it is cut, lives in
its sample module (`luna_dist.shards.chunk_samples`, `seg_samples`), how its arrays are
encoded and decoded in `luna_dist.shards.codecs`, and how its samples make batches in
`luna_dist.data.batches`. docs/shard-format.md is the contract in words.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from isal import isal_zlib

from luna_dist.tables.candidates import Annotation, Candidate

FORMAT = "luna_dist-shards"
FORMAT_VERSION = 4  # 2: every sample carries crc32.json; 3: arrays may be compressed (zstd); 4: or lz4 (CODECS)
READABLE_VERSIONS = (2, 3, 4)
"""The versions readers take: a version 2 build holds plain `.npy` members, 3 plain or zstd ones, 4 any codec's."""
MANIFEST = "manifest.json"
CHECKSUMS = "crc32.json"
LABELS = ("pos", "neg", "val")
REBUILD = "rebuild the shards with `python -m luna_dist.shard ... --overwrite`"


class ShardSetError(Exception):
    """A shard set that training must not use; the message says why and what to do."""


def sample_key(series_uid: str, row: int) -> str:
    """WebDataset splits keys at the first dot, and UIDs are full of dots."""
    return f"{series_uid.replace('.', '_')}_{row}"


def shard_name(fold: int, label: str, number: int) -> str:
    return f"fold{fold}-{label}-{number:06d}.tar"


# -- what a build's task cuts from a CT -----------------------------------------------------------
@dataclass
class SeriesInputs:
    """What a cutter reads of one CT besides its voxels: its candidates and annotations, and its fold."""

    series_uid: str
    fold: int
    candidates: list[Candidate]
    annotations: list[Annotation]


@dataclass
class Cut:
    """What a task cut from one CT, encoded for the tar: positives (packed per fold once every CT
    is done), the negatives the plan counted, and validation samples (one shard per CT)."""

    pos: list[dict]
    neg: list[dict]
    val: list[dict] = field(default_factory=list)
    outside_volume: int = 0  # samples padded because they reach outside the CT
    val_slices: int = 0


class Cutter(Protocol):
    """A task's part of the build: what it cuts from a CT. The machinery around it (`luna_dist.shards.build`) is
    shared."""

    task: ClassVar[str]
    sample_bytes: ClassVar[int]  # upper bound of a pos/neg sample in a tar, for --max-mb
    per_ct_validation: ClassVar[bool]  # writes one fold{K}-val-NNNNNN.tar per CT

    def planned_negatives(self, candidates: list[Candidate]) -> int: ...  # known before the CT is read
    def planned_samples(self, series: SeriesInputs, shape: tuple[int, int, int], geometry) -> tuple[int, int]: ...
    # (training samples, validation slices) from the CT's header alone, for `--plan`
    def identity(self) -> dict: ...  # what makes two builds of this task the same, beside the inputs
    def layout(self) -> dict: ...  # the manifest's description of the samples
    def cut(self, series: SeriesInputs, ct) -> Cut: ...  # ct: a luna_dist.imaging.ct.Ct


def member_checksums(sample: dict) -> dict[str, int]:
    """CRC-32 of every member of a sample but its checksums; any shard kind, any members.

    CRC-32 catches the random damage of disks and transfers; the manifest's sha256 per shard
    covers the rest. ISA-L computes the same CRC-32 as zlib 22× faster (3 µs against 67 µs
    for a 147 kB chunk on the machine of docs/benchmarks.md): zlib's took a fifth of a
    loader worker's time.
    """
    return {name: isal_zlib.crc32(value) for name, value in sorted(sample.items())
            if not name.startswith("__") and name != CHECKSUMS}


def with_checksums(sample: dict) -> dict:
    return {**sample, CHECKSUMS: json.dumps(member_checksums(sample)).encode()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- decoding ---------------------------------------------------------------------------------------
def damaged(sample: dict, problem: str) -> ShardSetError:
    """A reader error names the shard and the sample."""
    return ShardSetError(f"{sample.get('__url__', 'unknown shard')}: sample {sample.get('__key__')}: {problem}; "
                         f"the shard is damaged: {REBUILD}")


def require(samples: list[dict], *fields: str) -> None:
    """A sample cut short (zeroed blocks end a tar early) lacks fields: name it rather than a KeyError."""
    for sample in samples:
        missing = [name for name in fields if name not in sample]
        if missing:
            raise damaged(sample, f"no {' and no '.join(missing)}")


def check_sample(sample: dict) -> None:
    """Every member's CRC-32 against the sample's own `crc32.json`."""
    if CHECKSUMS not in sample:
        members = sorted(name for name in sample if not name.startswith("__"))
        raise damaged(sample, f"no {CHECKSUMS} (cut short? it holds only {', '.join(members) or 'nothing'})")
    try:
        stored = json.loads(sample[CHECKSUMS])
    except ValueError:
        raise damaged(sample, f"{CHECKSUMS} unreadable") from None
    if stored != (computed := member_checksums(sample)):
        missing = [name for name in stored if name not in sample]
        if missing:
            raise damaged(sample, f"no {' and no '.join(missing)}")
        changed = [name for name in stored if stored[name] != computed[name]] or sorted(set(computed) - set(stored))
        raise damaged(sample, f"{', '.join(changed)} does not match its CRC-32 (changed in place)")


# -- the manifest ---------------------------------------------------------------------------------
_MANIFEST_FIELDS = ("folds", "shards", "failed")
_SHARD_FIELDS = ("name", "fold", "label", "samples", "bytes")
_SHARD_TEXT = {"name": (re.compile(r"fold[0-9]+-(pos|neg|val)-[0-9]{6,}\.tar"),
                        "shard's name (foldK-LABEL-NNNNNN.tar)"),
               "sha256": (re.compile(r"[0-9a-f]{64}"), "sha256 (64 hex digits)")}
"""The manifest's text that reaches a file name, a URL or a `pipe:` command's shell line, as the build writes it:
anything else (a `;`, a `/`) would have the manifest's sender choose a command to run or a file to write."""


def check_manifest(manifest, location: str, task: str, reads: dict[str, dict]) -> None:
    """Refuse a manifest this version cannot read for `task`: format, task, the sample layout the
    reader relies on (`reads`: manifest section -> the fields it must have, as a sample module
    declares them), and every field the readers use."""
    if not isinstance(manifest, dict):
        raise ShardSetError(f"{location}: not a shard manifest (a JSON {type(manifest).__name__}); rebuild the shards")
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ShardSetError(f"{location}: format {manifest.get('format')} v{manifest.get('format_version')}, "
                            f"this version reads {FORMAT} v{' and v'.join(map(str, READABLE_VERSIONS))}; "
                            "rebuild the shards (or use the luna_dist that built them)")
    if manifest.get("task") != task:
        raise ShardSetError(f"{location}: shards built with --task {manifest.get('task')}, this run needs --task "
                            f"{task} shards (`python -m luna_dist.shard --task {task} --data DIR --out OUT`)")
    for section, wanted in reads.items():
        found = manifest.get(section, {})
        if any(found.get(key) != value for key, value in wanted.items()):
            shown = {key: found.get(key) for key in wanted}
            raise ShardSetError(f"{location}: samples are {shown}, this version reads {wanted}; rebuild the shards")
    missing = [name for name in _MANIFEST_FIELDS if name not in manifest]
    if missing:
        raise ShardSetError(f"{location}: no {', '.join(missing)} in the manifest (damaged?); rebuild the shards")
    for n, shard in enumerate(manifest["shards"]):
        missing = [name for name in _SHARD_FIELDS if not isinstance(shard, dict) or name not in shard]
        if missing:
            raise ShardSetError(f"{location}: shard entry {n} has no {', '.join(missing)} (damaged?); "
                                "rebuild the shards")
        for key, (pattern, meaning) in _SHARD_TEXT.items():
            value = shard.get(key)
            if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
                shown = ascii(value)[:80]
                raise ShardSetError(f"{location}: shard entry {n} has a {key} that is no {meaning}: {shown}; "
                                    "it is not used (a damaged manifest, or one not written by a build)")
