"""The shard build end to end, read back through the tar files themselves.

Expected values are recomputed independently of luna_dist: CSVs with the csv module,
voxel indices with SimpleITK's TransformPhysicalPointToIndex, crops with fancy indexing.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import CHUNK_MEMBERS, is_running, kill_build_after
from helpers import open_cls as open_shard_set

from luna_dist.imaging import read_ahead as read_ahead_module
from luna_dist.shards import build as shard_module
from luna_dist.shards import codecs
from luna_dist.shards import output as build_output
from luna_dist.shards import writer as writer
from luna_dist.shards.build import build
from luna_dist.shards.format import MANIFEST, ShardSetError
from luna_dist.shards.inputs import InputError, left_out_summary
from luna_dist.shards.options import BuildError, BuildOptions
from luna_dist.synthetic.generator import make_dataset

CHUNK_SHAPE = (32, 48, 48)
CHUNK = "chunk.npy" + codecs.SUFFIXES[codecs.CODECS[0]]  # as the default codec names it
"""The chunk's member as the default codec stores it."""
SHARD_NAME = re.compile(r"^fold(\d+)-(pos|neg)-(\d{6})\.tar$")
JSON_FIELDS = {"series_uid", "fold", "center_xyz", "center_irc", "is_nodule", "diameter_mm", "is_malignant",
               "candidate_row", "outside_volume"}


# --- independent readers ------------------------------------------------------------------------------
def csv_rows(path: Path) -> list[dict]:
    """Data rows of a LUNA16 CSV, with their 0-based data row and 1-based file line."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return [{**row, "row": n, "line": n + 2} for n, row in enumerate(reader)]


def xyz_of(row: dict) -> tuple[float, float, float]:
    return float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])


def key_of(uid: str, row: int) -> str:
    return uid.replace(".", "_") + f"_{row}"


def expected_labels(data: Path) -> dict[str, dict]:
    """Per candidate key: series, centre, class, and the diameter/malignancy of the nearest enclosing nodule."""
    nodules = defaultdict(list)
    for row in csv_rows(data / "annotations_with_malignancy.csv"):
        nodules[row["seriesuid"]].append((np.array(xyz_of(row)), float(row["diameter_mm"]), row["mal_bool"] == "True"))
    expected = {}
    for row in csv_rows(data / "candidates.csv"):
        uid, xyz, is_nodule = row["seriesuid"], xyz_of(row), row["class"] == "1"
        diameter, malignant = 0.0, None
        if is_nodule:
            enclosing = [(np.linalg.norm(c - xyz), d, m) for c, d, m in nodules[uid] if np.linalg.norm(c - xyz) <= d / 2]
            if enclosing:
                _, diameter, malignant = min(enclosing)
        expected[key_of(uid, row["row"])] = dict(series_uid=uid, center_xyz=list(xyz), is_nodule=is_nodule,
                                                 diameter_mm=diameter, is_malignant=malignant,
                                                 candidate_row=row["row"])
    return expected


def series_paths(data: Path) -> dict[str, Path]:
    return {p.stem: p for p in data.glob("subset*/*.mhd")}


def iter_tar(path: Path):
    """(key, {extension: bytes}) for each sample of one tar, in file order; keys split at the first dot."""
    with tarfile.open(path) as tar:
        current, sample = None, {}
        for member in tar:
            assert member.isfile(), f"{path}: {member.name} is not a regular file"
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            assert len(data) == member.size
            if key != current:
                if current is not None:
                    yield current, sample
                current, sample = key, {}
            assert ext not in sample, f"{path}: {member.name} twice"
            sample[ext] = data
        if current is not None:
            yield current, sample


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("fold*.tar"))


def read_samples(out: Path) -> dict[str, dict]:
    """Every sample of every fold*.tar under out: key -> shard name, cls, parsed json, chunk sha256."""
    samples = {}
    for path in shard_files(out):
        for key, sample in iter_tar(path):
            (chunk,) = [name for name in CHUNK_MEMBERS if name in sample]  # as its build's codec names it
            assert set(sample) == {chunk, "cls", "json", "crc32.json"}, f"{path}: {key} has {sorted(sample)}"
            assert json.loads(sample["crc32.json"]) == {name: zlib.crc32(sample[name]) for name in (chunk, "cls", "json")}
            assert key not in samples, f"{key} in {path.name} and {samples.get(key, {}).get('shard')}"
            samples[key] = {
                "shard": path.name,
                "cls": sample["cls"],
                "json": json.loads(sample["json"]),
                "sha": hashlib.sha256(codecs.load_array(sample, "chunk.npy").tobytes()).hexdigest(),
            }
    return samples


def fingerprint_of(samples: dict[str, dict]) -> set[tuple[str, str, str]]:
    """(key, sha256 of chunk bytes, canonical json) of every sample: what two equal builds share."""
    return {(key, s["sha"], json.dumps(s["json"], sort_keys=True)) for key, s in samples.items()}


def fingerprint(out: Path) -> set[tuple[str, str, str]]:
    return fingerprint_of(read_samples(out))


def reference_chunk(volume: np.ndarray, irc) -> tuple[np.ndarray, bool]:
    """The (32, 48, 48) chunk at irc by fancy indexing, -1000 outside the volume, clipped; and whether it was padded."""
    axes = [int(c) - w // 2 + np.arange(w) for c, w in zip(irc, CHUNK_SHAPE)]
    valid = [(a >= 0) & (a < n) for a, n in zip(axes, volume.shape)]
    clipped = [np.clip(a, 0, n - 1) for a, n in zip(axes, volume.shape)]
    chunk = volume[np.ix_(*clipped)].astype(np.int16)
    mask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    chunk[~mask] = -1000
    return np.clip(chunk, -1000, 1000), not bool(mask.all())


def tar_is_complete(path: Path) -> None:
    """A finished tar: whole 512-byte blocks, the end-of-archive zero blocks, every member readable."""
    size = path.stat().st_size
    assert size > 0 and size % 512 == 0, f"{path}: {size} bytes"
    with open(path, "rb") as f:
        f.seek(size - 1024)
        assert f.read() == b"\0" * 1024, f"{path}: no end-of-archive marker"
    for key, sample in iter_tar(path):
        assert set(sample) == {CHUNK, "cls", "json", "crc32.json"}, f"{path}: {key}"
        assert codecs.load_array(sample, "chunk.npy").shape == CHUNK_SHAPE
        json.loads(sample["json"])


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}


def shard_cli(*args, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luna_dist.shard", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, **kwargs)


# --- the session build, read back -------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples(shard_dir) -> dict[str, dict]:
    """All samples of the session build, read through the tar files."""
    return read_samples(shard_dir)


@pytest.fixture(scope="module")
def manifest(shard_dir) -> dict:
    return json.loads((shard_dir / MANIFEST).read_text())


def check_chunks_against_the_cts(data: Path, out: Path) -> int:
    """Every sample's chunk equals the crop of its CT at SimpleITK's index of its CSV centre; returns how many padded."""
    rows = {key_of(r["seriesuid"], r["row"]): r for r in csv_rows(data / "candidates.csv")}
    paths = series_paths(data)
    images, volumes = {}, {}
    seen, padded = 0, 0
    for path in shard_files(out):
        for key, sample in iter_tar(path):
            meta = json.loads(sample["json"])
            uid = meta["series_uid"]
            if uid not in images:
                images[uid] = sitk.ReadImage(str(paths[uid]))
                volumes[uid] = sitk.GetArrayFromImage(images[uid])
            irc = images[uid].TransformPhysicalPointToIndex(xyz_of(rows[key]))[::-1]
            expected, outside = reference_chunk(volumes[uid], irc)
            chunk = codecs.load_array(sample, "chunk.npy")
            assert chunk.dtype == np.int16 and chunk.shape == CHUNK_SHAPE, key
            assert np.array_equal(chunk, expected), f"{path.name}: {key} differs from the crop at {irc}"
            assert meta["center_irc"] == list(irc), key
            assert meta["outside_volume"] is outside, key
            seen += 1
            padded += outside
    assert seen == len(rows)
    return padded


@pytest.mark.slow
def test_every_chunk_equals_a_direct_crop_of_its_ct(synth_data, shard_dir):
    padded = check_chunks_against_the_cts(synth_data, shard_dir)
    assert 0 < padded < len(csv_rows(synth_data / "candidates.csv"))  # border candidates exercised the padding


def test_every_candidate_is_one_sample_with_a_unique_key(synth_data, samples):
    expected = expected_labels(synth_data)
    assert set(samples) == set(expected)
    assert len(samples) == len(csv_rows(synth_data / "candidates.csv"))


def test_json_fields_agree_with_the_csvs(synth_data, samples):
    expected = expected_labels(synth_data)
    folds = {uid: int(path.parent.name.removeprefix("subset")) for uid, path in series_paths(synth_data).items()}
    malignant_seen = set()
    for key, sample in samples.items():
        meta, want = sample["json"], expected[key]
        assert set(meta) == JSON_FIELDS, key
        for field in ("series_uid", "center_xyz", "is_nodule", "candidate_row"):
            assert meta[field] == want[field], (key, field)
        assert meta["diameter_mm"] == want["diameter_mm"], key
        assert meta["is_malignant"] is want["is_malignant"], key
        assert meta["fold"] == folds[meta["series_uid"]], key
        assert key == meta["series_uid"].replace(".", "_") + f"_{meta['candidate_row']}"
        assert "." not in key
        assert sample["cls"] == (b"1" if meta["is_nodule"] else b"0"), key
        if meta["is_nodule"]:
            assert meta["diameter_mm"] > 0, key
            malignant_seen.add(meta["is_malignant"])
        else:
            assert meta["diameter_mm"] == 0 and meta["is_malignant"] is None, key
    assert malignant_seen == {True, False}


def test_shards_are_named_by_fold_and_class_and_hold_only_theirs(shard_dir, samples):
    names = [p.name for p in shard_files(shard_dir)]
    assert names
    # Besides shards and manifest, only the build journal; no .partial left.
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted(names + [MANIFEST, ".build"])
    assert not list(shard_dir.rglob("*.partial"))
    for name in names:
        assert SHARD_NAME.match(name), name
    by_shard = defaultdict(list)
    for sample in samples.values():
        by_shard[sample["shard"]].append(sample)
    assert set(by_shard) == set(names)  # no empty shard
    for name, members in by_shard.items():
        fold, label, _ = SHARD_NAME.match(name).groups()
        assert {m["json"]["fold"] for m in members} == {int(fold)}, name
        assert {m["json"]["is_nodule"] for m in members} == {label == "pos"}, name
        assert len(members) <= 150, name
    for fold in range(10):  # each fold's shards are numbered from 0 without gaps
        for label in ("pos", "neg"):
            numbers = sorted(int(SHARD_NAME.match(n).group(3)) for n in names if n.startswith(f"fold{fold}-{label}-"))
            assert numbers == list(range(len(numbers))), (fold, label)


def test_no_series_in_two_folds(samples, manifest):
    folds_of = defaultdict(set)
    for sample in samples.values():
        folds_of[sample["json"]["series_uid"]].add(sample["json"]["fold"])
    assert all(len(f) == 1 for f in folds_of.values())
    listed = [uid for fold in manifest["folds"].values() for uid in fold["series"]]
    assert len(listed) == len(set(listed)) == len(folds_of)
    for fold, entry in manifest["folds"].items():
        for uid in entry["series"]:
            assert folds_of[uid] == {int(fold)}


def test_manifest_counts_equal_the_csv_and_the_tars(synth_data, samples, manifest):
    rows = csv_rows(synth_data / "candidates.csv")
    folds = {uid: int(path.parent.name.removeprefix("subset")) for uid, path in series_paths(synth_data).items()}
    positives = sum(r["class"] == "1" for r in rows)
    assert manifest["counts"]["samples"] == len(rows) == len(samples)
    assert manifest["counts"]["positives"] == positives == sum(s["cls"] == b"1" for s in samples.values())
    assert manifest["counts"]["negatives"] == len(rows) - positives
    assert manifest["counts"]["outside_volume"] == sum(s["json"]["outside_volume"] for s in samples.values())
    csv_per_fold = Counter((folds[r["seriesuid"]], r["class"]) for r in rows)
    tar_per_fold = Counter((s["json"]["fold"], "1" if s["json"]["is_nodule"] else "0") for s in samples.values())
    assert csv_per_fold == tar_per_fold
    assert set(manifest["folds"]) == {str(k) for k in range(10)}
    for fold, entry in manifest["folds"].items():
        k = int(fold)
        assert entry["positives"] == csv_per_fold[(k, "1")]
        assert entry["negatives"] == csv_per_fold[(k, "0")]
        assert entry["samples"] == entry["positives"] + entry["negatives"]
        assert entry["series"] == sorted(uid for uid, f in folds.items() if f == k)
    assert manifest["skipped"] == [] and manifest["failed"] == [] and manifest["bad_rows"] == []


def test_manifest_carries_each_folds_findings_for_the_evaluation(synth_data, manifest):
    from luna_dist.evaluation.files import fold_findings

    folds = {uid: int(path.parent.name.removeprefix("subset")) for uid, path in series_paths(synth_data).items()}
    for name, csv_name in (("annotations", "annotations.csv"), ("excluded", "annotations_excluded.csv")):
        rows = csv_rows(synth_data / csv_name)
        assert rows and sum(len(entry[name]) for entry in manifest["folds"].values()) == len(rows)
        for row in rows:
            stored = [r for r in manifest["folds"][str(folds[row["seriesuid"]])][name]
                      if r[:4] == [row["seriesuid"], *(float(row[c]) for c in ("coordX", "coordY", "coordZ"))]]
            assert len(stored) == 1 and stored[0][4] == float(row["diameter_mm"])
    series, nodules, excluded = fold_findings(manifest, [3, 9])
    assert series == manifest["folds"]["3"]["series"] + manifest["folds"]["9"]["series"]
    assert set(nodules.series) | set(excluded.series) <= set(series)
    assert len(nodules.series) == len(manifest["folds"]["3"]["annotations"]) + len(manifest["folds"]["9"]["annotations"])
    assert (excluded.diameter == -1).any() and nodules.xyz.shape == (len(nodules.series), 3)


def test_manifest_shards_match_the_files(shard_dir, samples, manifest):
    per_shard = Counter(s["shard"] for s in samples.values())
    assert sorted(s["name"] for s in manifest["shards"]) == [p.name for p in shard_files(shard_dir)]
    for record in manifest["shards"]:
        path = shard_dir / record["name"]
        fold, label, _ = SHARD_NAME.match(record["name"]).groups()
        assert (record["fold"], record["label"]) == (int(fold), label)
        assert record["samples"] == per_shard[record["name"]]
        assert record["bytes"] == path.stat().st_size
        assert record["sha256"] == sha256_file(path)
    assert manifest["chunk"]["shape"] == list(CHUNK_SHAPE) and manifest["chunk"]["dtype"] == "int16"
    assert manifest["arguments"]["max_samples"] == 150 and manifest["arguments"]["workers"] == 2


def test_open_shard_set_accepts_the_build(shard_dir, manifest):
    shards = open_shard_set(shard_dir)
    assert shards.folds == list(range(10))
    assert shards.count(range(10), "pos") == manifest["counts"]["positives"]
    assert shards.count(range(10), "neg") == manifest["counts"]["negatives"]
    assert sorted(shards.shards([3], "neg")) == sorted(str(shard_dir / s["name"]) for s in manifest["shards"]
                                                       if s["fold"] == 3 and s["label"] == "neg")


# --- kill and resume ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_build_resumes_to_the_uninterrupted_result(synth_data, shard_dir, samples, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "luna_dist.shard", "--data", str(synth_data), "--out", str(out),
               "--workers", "2", "--max-samples", "150"]
    done_dir = out / ".build" / "done"
    total = len(series_paths(synth_data))
    finished_first, returncode = kill_build_after(command, done_dir, 1, tmp_path / "killed.log")
    journaled = len(list(done_dir.glob("*.json"))) if done_dir.is_dir() else 0
    if finished_first or journaled >= total:
        pytest.skip(f"the build finished before it could be killed ({journaled}/{total} CTs journaled); "
                    "this machine is too fast for the data set: use more CTs")
    assert returncode == -signal.SIGKILL
    assert 1 <= journaled < total
    assert not (out / MANIFEST).exists()
    for path in shard_files(out):  # final names only for complete tars; `.partial` files may exist
        tar_is_complete(path)

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {journaled} of {total} CTs already sharded, {total - journaled} to go" in resumed.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in shard_files(out)] + [MANIFEST, ".build"])

    resumed_samples = read_samples(out)  # also asserts no key appears twice
    assert fingerprint_of(resumed_samples) == fingerprint_of(samples)
    assert len(resumed_samples) == len(csv_rows(synth_data / "candidates.csv"))
    got, want = json.loads((out / MANIFEST).read_text()), json.loads((shard_dir / MANIFEST).read_text())
    assert got["counts"] == want["counts"] and got["folds"] == want["folds"]
    assert got["shards"] == want["shards"]  # same names, counts, sizes and checksums: byte-identical shards


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids from Linux's /proc")
def test_workers_end_when_the_build_process_is_killed(synth_data, tmp_path):
    """SIGKILL reaches the main process only: its pool workers must not go on writing."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "luna_dist.shard", "--data", str(synth_data), "--out", str(out),
               "--workers", "2", "--max-samples", "150", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(out.glob(".build/done/*.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the workers are busy with the next CTs, as in a real build
        workers = children_of(process.pid)
        if process.poll() is not None:
            pytest.skip("the build finished before it could be killed: this machine is too fast for the data set")
        assert len(workers) == 2, f"the build runs {workers} workers"
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(map(is_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if is_running(pid)], "workers outlived the killed build"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


# --- small builds that the tests may change ------------------------------------------------------------
SMALL_NEGATIVES_PER_CT = 40
SMALL_MAX_SAMPLES = 25


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """3 CTs (seed 1): two in subset0 (fold 0 shared by two CTs, as in LUNA16), one in subset1.

    Its candidates.csv keeps every positive and the first 40 negatives per CT, small
    enough that the many builds of the bad-input tests stay fast. Tests copy it
    (fixture `data`) before damaging anything.
    """
    out = tmp_path_factory.mktemp("small") / "luna"
    summary = make_dataset(out, n_cts=3, seed=1)
    moved = summary.mhd_paths[2]  # subset2 -> subset0; the header names its .raw relative to itself
    for path in (moved, moved.with_suffix(".raw")):
        path.rename(out / "subset0" / path.name)
    path = out / "candidates.csv"
    lines = path.read_text().splitlines()
    negatives = Counter()
    kept = [lines[0]]
    for line in lines[1:]:
        uid, label = line.split(",")[0], line.split(",")[-1]
        if label == "1" or negatives[uid] < SMALL_NEGATIVES_PER_CT:
            kept.append(line)
            negatives[uid] += label == "0"
    path.write_text("\n".join(kept) + "\n")
    return out


@pytest.fixture(scope="module")
def small_reference(small_data, tmp_path_factory) -> set:
    """Fingerprint of an uninterrupted, fault-free build of small_data."""
    out = tmp_path_factory.mktemp("small_ref") / "shards"
    build(options(small_data, out))
    return fingerprint(out)


def test_fold_shared_by_two_cts_keeps_every_sample(small_data, tmp_path):
    """Negative shard numbers are planned per fold across CTs: none overwrites another's."""
    out = tmp_path / "out"
    manifest = build(options(small_data, out, workers=2))
    assert [len(manifest["folds"][f]["series"]) for f in ("0", "1")] == [2, 1]
    samples = read_samples(out)
    expected = expected_labels(small_data)
    assert set(samples) == set(expected)
    folds = {uid: int(path.parent.name.removeprefix("subset")) for uid, path in series_paths(small_data).items()}
    for key, sample in samples.items():
        assert sample["json"]["fold"] == folds[sample["json"]["series_uid"]]
        assert {k: sample["json"][k] for k in expected[key]} == expected[key]
    names = [p.name for p in shard_files(out)]
    assert sorted(s["name"] for s in manifest["shards"]) == names
    neg0 = [n for n in names if n.startswith("fold0-neg-")]
    assert neg0 == [f"fold0-neg-{n:06d}.tar" for n in range(len(neg0))] and len(neg0) >= 4
    counts = Counter(s["shard"] for s in samples.values())
    assert all(0 < counts[name] <= SMALL_MAX_SAMPLES for name in names)
    assert {s["name"]: s["samples"] for s in manifest["shards"]} == dict(counts)
    check_chunks_against_the_cts(small_data, out)


@pytest.fixture
def data(small_data, tmp_path) -> Path:
    """A private copy of small_data."""
    return Path(shutil.copytree(small_data, tmp_path / "data"))


def options(data: Path, out: Path, **kwargs) -> BuildOptions:
    return BuildOptions(**{"data": data, "out": out, "workers": 1, "max_samples": SMALL_MAX_SAMPLES, "progress": False,
                           **kwargs})


def only_series(reference: set, exclude: str) -> set:
    return {s for s in reference if json.loads(s[2])["series_uid"] != exclude}


def one_series(data: Path, index: int = 1) -> tuple[str, Path]:
    mhd = sorted(series_paths(data).items())[index][1]
    return mhd.stem, mhd


def test_finished_build_rerun_does_nothing(data, tmp_path, capsys):
    out = tmp_path / "out"
    first = build(options(data, out))
    before = file_stats(out)
    capsys.readouterr()
    again = build(options(data, out))
    assert "nothing to do" in capsys.readouterr().out
    assert again == first
    assert file_stats(out) == before


def test_finished_build_rerun_writes_nothing(data, tmp_path):
    """The journal in .build/ stays for later additions, but a no-op rerun touches no file at all."""
    out = tmp_path / "out"
    build(options(data, out))
    assert (out / ".build" / "done").is_dir()
    before = file_stats(out)
    build(options(data, out))
    assert file_stats(out) == before


def test_series_without_mhd_is_skipped(data, tmp_path, small_reference):
    uid, mhd = one_series(data)
    mhd.unlink()
    manifest = build(options(data, tmp_path / "out"))
    assert [s["series_uid"] for s in manifest["skipped"]] == [uid]
    assert uid in manifest["skipped"][0]["reason"] and ".mhd" in manifest["skipped"][0]["reason"]
    assert manifest["failed"] == []
    rows = [r for r in csv_rows(data / "candidates.csv") if r["seriesuid"] != uid]
    assert manifest["counts"]["samples"] == len(rows)
    assert manifest["counts"]["positives"] == sum(r["class"] == "1" for r in rows)
    assert uid not in [u for f in manifest["folds"].values() for u in f["series"]]
    assert fingerprint(tmp_path / "out") == only_series(small_reference, uid)

    with pytest.raises(InputError) as err:
        build(options(data, tmp_path / "strict", strict=True))
    assert uid in str(err.value) and "--strict" in str(err.value)
    assert not shard_files(tmp_path / "strict")


def test_restored_skipped_series_is_added_by_a_rerun(data, small_data, tmp_path, small_reference):
    uid, mhd = one_series(data)
    mhd.unlink()
    out = tmp_path / "out"
    build(options(data, out))
    shutil.copy2(small_data / mhd.relative_to(data), mhd)
    manifest = build(options(data, out))
    assert manifest["skipped"] == []
    assert fingerprint(out) == small_reference


def test_truncated_raw_fails_that_ct_only_and_resumes(data, small_data, tmp_path, small_reference, capsys):
    uid, mhd = one_series(data)
    raw = mhd.with_suffix(".raw")
    with open(raw, "r+b") as f:
        f.truncate(raw.stat().st_size // 2)
    out = tmp_path / "out"
    with pytest.raises(BuildError) as err:
        build(options(data, out, workers=2))
    assert raw.name in str(err.value) and "truncated" in str(err.value)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [f["series_uid"] for f in manifest["failed"]] == [uid]
    assert "truncated" in manifest["failed"][0]["error"]
    assert fingerprint(out) == only_series(small_reference, uid)
    assert manifest["counts"]["samples"] == len(only_series(small_reference, uid))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("fold*-neg-*.tar")}

    shutil.copy2(small_data / raw.relative_to(data), raw)  # repair
    capsys.readouterr()
    manifest = build(options(data, out, workers=2))
    assert "resuming: 2 of 3 CTs already sharded, 1 to go" in capsys.readouterr().out
    assert manifest["failed"] == []
    assert fingerprint(out) == small_reference
    assert manifest["counts"]["samples"] == len(small_reference)
    for name, mtime in kept.items():  # the other CTs' shards were not rewritten
        assert (out / name).stat().st_mtime_ns == mtime, name


def test_each_ct_is_read_ahead_before_a_worker_reads_it_and_at_most_two_ahead(data, tmp_path, monkeypatch):
    """With one worker: the CT being cut and the next are asked for; the next after each CT is done."""
    events = []
    monkeypatch.setattr(read_ahead_module, "read_ahead", lambda path: events.append(("ahead", Path(path))))
    real_read_ct = writer.read_ct
    monkeypatch.setattr(writer, "read_ct", lambda path, *more: events.append(("read", Path(path))) or real_read_ct(path, *more))
    build(options(data, tmp_path / "out"))
    reads = [path for kind, path in events if kind == "read"]
    assert sorted(path for kind, path in events if kind == "ahead") == sorted(reads)  # each CT once
    for n, path in enumerate(reads):
        asked = events.index(("ahead", path))
        assert asked < events.index(("read", path))
        assert sum(kind == "read" for kind, _ in events[:asked]) >= n - 1  # not before the CT two before it is read


def test_unreadable_mhd_fails_that_ct_only_and_resumes(data, small_data, tmp_path, small_reference, monkeypatch):
    uid, mhd = one_series(data, 0)
    mhd.write_text("garbage, not a MetaImage header\n")
    out = tmp_path / "out"
    with pytest.raises(BuildError) as err:
        build(options(data, out))
    assert mhd.name in str(err.value) and "not a MetaImage header" in str(err.value)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [(f["series_uid"], f["path"]) for f in manifest["failed"]] == [(uid, str(mhd))]
    assert fingerprint(out) == only_series(small_reference, uid)

    shutil.copy2(small_data / mhd.relative_to(data), mhd)
    read = []
    real_read_ct = writer.read_ct
    monkeypatch.setattr(writer, "read_ct", lambda path, *more: read.append(Path(path)) or real_read_ct(path, *more))
    manifest = build(options(data, out))
    assert read == [mhd]  # only the failed CT is read again
    assert manifest["failed"] == []
    assert fingerprint(out) == small_reference
    assert not list(out.rglob("*.partial"))


def replace_line(path: Path, line: int, text: str) -> str:
    lines = path.read_text().splitlines()
    old, lines[line - 1] = lines[line - 1], text
    path.write_text("\n".join(lines) + "\n")
    return old


def test_malformed_csv_row_is_left_out_and_listed(data, tmp_path, small_reference):
    candidates = data / "candidates.csv"
    old = replace_line(candidates, 5, "not,a,valid,row,at,all")
    uid = old.split(",")[0]
    manifest = build(options(data, tmp_path / "out"))
    assert len(manifest["bad_rows"]) == 1
    bad = manifest["bad_rows"][0]
    assert (bad["path"], bad["line"]) == (str(candidates), 5)
    assert "fields" in bad["problem"]
    missing = key_of(uid, 3)
    assert fingerprint(tmp_path / "out") == {s for s in small_reference if s[0] != missing}

    with pytest.raises(InputError) as err:
        build(options(data, tmp_path / "strict", strict=True))
    assert f"{candidates}:5" in str(err.value)


def _numpy_reprs(path: Path, every: int) -> int:
    """Write the coordinates of every `every`-th data row as numpy prints them (`np.float64(-24.24)`),
    as a table saved from a list of numpy scalars comes out; returns how many rows were changed."""
    lines = path.read_text().splitlines()
    changed = 0
    for n in range(1, len(lines), every):
        uid, x, y, z, cls = lines[n].split(",")
        lines[n] = ",".join([uid, *(f"np.float64({v})" for v in (x, y, z)), cls])
        changed += 1
    path.write_text("\n".join(lines) + "\n")
    return changed


def test_a_table_that_mostly_fails_to_parse_is_refused_naming_the_flag(data, tmp_path):
    candidates = data / "candidates.csv"
    rows = len(candidates.read_text().splitlines()) - 1
    changed = _numpy_reprs(candidates, every=1)
    assert changed == rows
    with pytest.raises(InputError) as err:
        build(options(data, tmp_path / "out"))
    message = str(err.value)
    assert message.startswith(f"{candidates}: {rows:,} of {rows:,} rows (100.0 %) cannot be used, e.g. {candidates}:2: coordX is not a number: 'np.float64(")
    assert "more than 1 % left out" in message and "--max-bad-rows 100" in message
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.slow
def test_the_last_line_says_how_many_rows_of_which_table_were_left_out(data, tmp_path):
    candidates = data / "candidates.csv"
    rows = len(candidates.read_text().splitlines()) - 1
    changed = _numpy_reprs(candidates, every=3)
    refused = shard_cli("--data", data, "--out", tmp_path / "out", "--no-progress")
    assert refused.returncode == 1 and "--max-bad-rows 34" in refused.stderr
    built = shard_cli("--data", data, "--out", tmp_path / "out", "--no-progress", "--max-bad-rows", "34")
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip().splitlines()[-1] == (
        f"left out: {changed:,} of {rows:,} rows of {candidates} (malformed; listed in manifest.json under bad_rows)")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["tables"]["candidates"] == {"path": str(candidates), "rows": rows, "left_out": changed,
                                                "duplicates": 0}
    assert manifest["counts"]["samples"] == rows - changed
    again = shard_cli("--data", data, "--out", tmp_path / "out", "--no-progress", "--max-bad-rows", "34")
    assert "already complete" in again.stdout and again.stdout.strip().splitlines()[-1].startswith("left out: ")


def test_candidates_outside_the_volume_are_padded_and_flagged(data, tmp_path):
    uid, mhd = one_series(data, 2)
    image = sitk.ReadImage(str(mhd))
    far = np.array(image.GetOrigin()) - 1000.0
    corner = image.TransformIndexToPhysicalPoint([s - 3 for s in image.GetSize()])
    candidates = data / "candidates.csv"
    n_rows = len(csv_rows(candidates))
    with open(candidates, "a") as f:
        f.write(f"{uid},{far[0]:.2f},{far[1]:.2f},{far[2]:.2f},0\n")
        f.write(f"{uid},{corner[0]:.2f},{corner[1]:.2f},{corner[2]:.2f},1\n")
    out = tmp_path / "out"
    build(options(data, out))
    samples = read_samples(out)
    far_key, corner_key = key_of(uid, n_rows), key_of(uid, n_rows + 1)
    chunks = {}
    for path in shard_files(out):
        for key, sample in iter_tar(path):
            if key in (far_key, corner_key):
                chunks[key] = codecs.load_array(sample, "chunk.npy")
    far_meta = samples[far_key]["json"]
    assert far_meta["outside_volume"] is True and far_meta["candidate_row"] == n_rows
    assert (chunks[far_key] == -1000).all()
    assert far_meta["center_irc"] == list(image.TransformPhysicalPointToIndex(far.round(2).tolist())[::-1])
    corner_meta = samples[corner_key]["json"]
    assert corner_meta["outside_volume"] is True and corner_meta["is_nodule"] is True
    assert corner_meta["diameter_mm"] == 0 and corner_meta["is_malignant"] is None  # no nodule there
    irc = image.TransformPhysicalPointToIndex(xyz_of(csv_rows(candidates)[-1]))[::-1]
    expected, outside = reference_chunk(sitk.GetArrayFromImage(image), irc)
    assert outside
    np.testing.assert_array_equal(chunks[corner_key], expected)
    assert (chunks[corner_key] != -1000).any()  # partly inside: real voxels kept, unshifted


@pytest.mark.parametrize("change", ["max_samples", "csv"])
def test_output_holding_another_build_needs_overwrite(data, tmp_path, small_reference, change):
    out = tmp_path / "out"
    build(options(data, out))
    assert len(shard_files(out)) > 2 * 2
    kwargs = {}
    if change == "max_samples":
        kwargs["max_samples"] = 1000
        differs = "samples_per_shard"
    else:
        with open(data / "candidates.csv", "a") as f:
            f.write(f"{one_series(data)[0]},0.00,0.00,0.00,0\n")
        differs = "inputs_sha256"
    before = file_stats(out)
    with pytest.raises(BuildError) as err:
        build(options(data, out, **kwargs))
    assert "--overwrite" in str(err.value) and differs in str(err.value) and str(out) in str(err.value)
    assert file_stats(out) == before  # refused without touching anything

    manifest = build(options(data, out, overwrite=True, **kwargs))
    assert [p.name for p in shard_files(out)] == sorted(s["name"] for s in manifest["shards"])  # nothing stale
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in shard_files(out)] + [MANIFEST, ".build"])
    assert manifest["counts"]["samples"] == len(csv_rows(data / "candidates.csv"))
    if change == "max_samples":
        assert fingerprint(out) == small_reference
        assert all(s["samples"] <= 1000 for s in manifest["shards"])
        # Now one negative shard per CT (3) and one positive shard per fold (2).
        assert sorted(s["name"] for s in manifest["shards"]) == [
            "fold0-neg-000000.tar", "fold0-neg-000001.tar", "fold0-pos-000000.tar",
            "fold1-neg-000000.tar", "fold1-pos-000000.tar"]
    else:
        assert len(fingerprint(out)) == len(small_reference) + 1
    open_shard_set(out)


def test_stray_shards_without_manifest_count_as_another_build(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fold0-neg-000000.tar").write_bytes(b"")
    with pytest.raises(BuildError, match="--overwrite"):
        build(options(data, out))
    build(options(data, out, overwrite=True))
    open_shard_set(out)


# --- inputs checked before anything is written -----------------------------------------------------------
def drop_annotations(data: Path) -> None:
    (data / "annotations.csv").rename(data.parent / "annotations.csv")


def restore_annotations(data: Path) -> None:
    (data.parent / "annotations.csv").rename(data / "annotations.csv")


def bad_header(data: Path) -> None:
    path = data / "annotations.csv"
    (data.parent / "annotations.csv").write_text(path.read_text())
    path.write_text(path.read_text().replace("diameter_mm", "diameter", 1))


def header_only(data: Path) -> None:
    path = data / "candidates.csv"
    (data.parent / "candidates.csv").write_text(path.read_text())
    path.write_text(path.read_text().splitlines()[0] + "\n")


def restore_candidates(data: Path) -> None:
    (data.parent / "candidates.csv").rename(data / "candidates.csv")


def no_ct_on_disk(data: Path) -> None:
    for mhd in data.rglob("*.mhd"):
        mhd.rename(mhd.with_suffix(".hidden"))


def restore_cts(data: Path) -> None:
    for hidden in data.rglob("*.hidden"):
        hidden.rename(hidden.with_suffix(".mhd"))


@pytest.mark.parametrize("damage, repair, message", [
    (drop_annotations, restore_annotations, "no annotations.csv (the nodules) in"),
    (bad_header, restore_annotations, "header lacks column(s) diameter_mm"),
    (header_only, restore_candidates, "candidates.csv: no usable candidate rows"),
    (no_ct_on_disk, restore_cts, "none of the 3 series of"),
])
def test_failed_input_check_writes_nothing_and_the_fixed_rerun_builds(data, tmp_path, small_reference,
                                                                      damage, repair, message):
    out = tmp_path / "out"
    damage(data)
    with pytest.raises(ValueError) as err:
        build(options(data, out))
    assert message in str(err.value)
    assert not out.exists()
    repair(data)
    build(options(data, out))
    assert fingerprint(out) == small_reference


def test_strict_error_writes_nothing(data, tmp_path, small_reference):
    out = tmp_path / "out"
    old = replace_line(data / "candidates.csv", 5, "not,a,valid,row,at,all")
    with pytest.raises(InputError, match="--strict"):
        build(options(data, out, strict=True))
    assert not out.exists()
    replace_line(data / "candidates.csv", 5, old)
    build(options(data, out, strict=True))
    assert fingerprint(out) == small_reference


@pytest.mark.slow
def test_missing_data_folder_writes_nothing(tmp_path):
    result = shard_cli("--data", tmp_path / "nope", "--no-progress", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such folder (--data names the LUNA16-format folder)"
    assert list(tmp_path.iterdir()) == []  # no shards/nope/.build either


def test_plan_without_a_finished_ct_never_blocks_a_rerun(data, tmp_path, small_reference):
    """A build stopped before its first CT was done (here: with another layout) holds nothing to keep."""
    out = tmp_path / "out"
    build(options(data, out, max_samples=7))
    (out / MANIFEST).unlink()
    shutil.rmtree(out / ".build" / "done")
    build(options(data, out))
    assert fingerprint(out) == small_reference
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in shard_files(out)] + [MANIFEST, ".build"])


def test_duplicate_candidate_rows_are_reported_and_sampled_once(data, tmp_path, small_reference, capsys):
    """Repeated rows are whole rows, not malformed ones: 5 % of them do not trip --max-bad-rows' 1 %."""
    candidates = data / "candidates.csv"
    rows = candidates.read_text().splitlines()
    positive = next(n for n, row in enumerate(rows) if row.endswith(",1"))
    repeats = [positive] + [1] * (len(rows) // 20)
    with open(candidates, "a") as f:
        f.writelines(rows[n] + "\n" for n in repeats)
    manifest = build(options(data, tmp_path / "out"))
    n = len(rows)
    assert manifest["bad_rows"] == []
    assert [(r["line"], r["problem"]) for r in manifest["duplicate_rows"]] == [
        (n + 1 + k, f"duplicate of line {line + 1}") for k, line in enumerate(repeats)]
    assert manifest["tables"]["candidates"] == {"path": str(candidates), "rows": n - 1 + len(repeats), "left_out": 0,
                                                "duplicates": len(repeats)}
    assert f"{len(repeats)} duplicate row(s) of {candidates}:" in capsys.readouterr().err
    assert left_out_summary(manifest) == (f"kept once: {len(repeats)} duplicate rows of {candidates} (listed in "
                                          "manifest.json under duplicate_rows)")
    assert fingerprint(tmp_path / "out") == small_reference
    assert manifest["counts"]["positives"] == sum(row.endswith(",1") for row in rows[1:])
    with pytest.raises(InputError, match="duplicate of line 2"):
        build(options(data, tmp_path / "strict", strict=True))


@pytest.mark.parametrize("linked", [("subset1",), ("subset0", "subset1")], ids=["one", "all"])
def test_subset_folders_linked_from_another_disk_are_built(data, tmp_path, small_reference, linked):
    """One linked subset had its fold silently left out (exit 0); all linked, the build said no series had a CT."""
    for subset in linked:
        shutil.move(data / subset, tmp_path / subset)
        (data / subset).symlink_to(tmp_path / subset, target_is_directory=True)
    manifest = build(options(data, tmp_path / "out"))
    assert manifest["skipped"] == [] and sorted(manifest["folds"]) == ["0", "1"]
    assert fingerprint(tmp_path / "out") == small_reference


def test_moved_data_folder_resumes_its_build(data, tmp_path, small_reference, capsys):
    """A build is known by its inputs' content: the same data elsewhere is the same build."""
    out = tmp_path / "out"
    build(options(data, out))
    moved = data.rename(tmp_path / "moved")
    capsys.readouterr()
    build(options(moved, out))
    assert "nothing to do" in capsys.readouterr().out

    (out / MANIFEST).unlink()
    next(out.glob(".build/done/*.json")).unlink()
    build(options(moved, out))
    assert "resuming: 2 of 3 CTs already sharded, 1 to go" in capsys.readouterr().out
    assert fingerprint(out) == small_reference


def test_build_of_an_older_layout_is_refused_naming_what_differs(data, tmp_path, small_reference):
    """An older build, known by its data folder's path and without the excluded findings."""
    out = tmp_path / "out"
    build(options(data, out))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["identity"]["data"] = str(data.resolve())
    del manifest["identity"]["inputs_sha256"]["excluded"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BuildError) as err:
        build(options(data, out))
    assert str(err.value) == (f"{out} holds a different build (differs in: data, inputs_sha256); "
                              "pass --overwrite to replace it, or choose another --out")
    build(options(data, out, overwrite=True))
    assert fingerprint(out) == small_reference


def test_rerun_waits_for_a_writer_still_holding_the_output(data, tmp_path, small_reference, monkeypatch):
    """Workers of a killed build hold its lock through their inherited descriptor; here a process stands in."""
    out = tmp_path / "out"
    build(options(data, out))
    (out / MANIFEST).unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'%d\\n' % os.getpid()); "
                               "print('held', flush=True); time.sleep(120)",
                               str(out / ".build" / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = file_stats(out)
        monkeypatch.setattr(build_output, "LOCK_WAIT_S", 0.5)
        with pytest.raises(BuildError, match=f"another build \\(pid {holder.pid}\\) is writing there"):
            build(options(data, out))
        assert file_stats(out) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    build(options(data, out))
    assert fingerprint(out) == small_reference
    assert (out / ".build" / "lock").read_text() == f"{os.getpid()}\n"  # the last holder: this build


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, *options) -> a fresh tmpfs folder; skips the test where mounting is not permitted."""
    mounted = []

    def mount(name: str, size: str, *flags: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: the full-disk and read-only tests mount a small tmpfs")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *flags]), "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({result.stderr.strip()}): needs root on Linux")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_stops_the_build_with_one_line_and_a_rerun_resumes(data, tmp_path, small_reference, tmpfs, workers):
    disk = tmpfs("disk", "4m")  # less than the build's 6 MB of compressed shards
    out = disk / "out"
    failed = shard_cli("--data", data, "--out", out, "--workers", workers, "--max-samples", SMALL_MAX_SAMPLES,
                       "--no-progress", cwd=tmp_path)
    assert failed.returncode == 1
    errors = failed.stderr.strip().splitlines()
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert errors[0].startswith(f"error: {out}") and "No space left on device" in errors[0]
    assert "nothing finished was lost" in errors[0] and "rerun the same command" in errors[0]
    done = len(list(out.glob(".build/done/*.json")))
    if workers == 1:  # with two, the main process may be the first to meet the full disk, journaling a CT
        in_build_order = sorted(series_paths(data), key=lambda uid: (series_paths(data)[uid].parent.name, uid))
        assert f"while writing the shards of CT {in_build_order[done]};" in errors[0]
    assert f"({done} CT(s) done and kept)" in errors[0]
    assert not list(out.rglob("*.partial")) and not (out / MANIFEST).exists()

    subprocess.run(["mount", "-o", "remount,size=100m", str(disk)], check=True)
    resumed = shard_cli("--data", data, "--out", out, "--workers", workers, "--max-samples", SMALL_MAX_SAMPLES,
                        "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    if done:
        assert f"resuming: {done} of 3 CTs already sharded" in resumed.stdout
    assert fingerprint(out) == small_reference


def test_full_disk_while_packing_positives_or_the_manifest(data, tmp_path, small_reference, tmpfs, monkeypatch):
    """Every CT done, then the disk fills: the CTs stay journaled and the rerun only packs."""
    out = tmpfs("disk", "100m") / "out"
    real = shard_module.pack_positives

    def pack_on_a_full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "fold0-pos-000000.tar.partial"))

    monkeypatch.setattr(shard_module, "pack_positives", pack_on_a_full_disk)
    with pytest.raises(BuildError) as err:
        build(options(data, out))
    assert str(err.value).startswith(f"{out}/fold0-pos-000000.tar.partial: No space left on device; "
                                     "nothing finished was lost (3 CT(s) done and kept)")
    monkeypatch.setattr(shard_module, "pack_positives", real)
    read = []
    monkeypatch.setattr(writer, "read_ct", lambda path, *more: read.append(path))
    build(options(data, out))
    assert read == [] and fingerprint(out) == small_reference


@pytest.mark.slow
def test_read_only_out_is_one_line(data, tmp_path, tmpfs):
    out = tmpfs("readonly", "1m", "ro") / "out"
    result = shard_cli("--data", data, "--out", out, "--no-progress", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {out}: Read-only file system; nothing finished was lost (0 CT(s) done "
                                     "and kept): make it writable or choose another --out, then rerun the same "
                                     "command to resume")


def test_open_shard_set_refuses_truncated_or_missing(data, tmp_path):
    out = tmp_path / "out"
    build(options(data, out))
    open_shard_set(out)
    victim = shard_files(out)[1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 512)
    with pytest.raises(ShardSetError) as err:
        open_shard_set(out)
    assert str(victim) in str(err.value) and "truncated" in str(err.value)

    victim.unlink()
    with pytest.raises(ShardSetError) as err:
        open_shard_set(out)
    assert str(victim) in str(err.value) and "missing" in str(err.value)

    (out / MANIFEST).unlink()
    with pytest.raises(ShardSetError) as err:
        open_shard_set(out)
    assert MANIFEST in str(err.value) and "not found" in str(err.value)


@pytest.mark.slow
def test_cli_builds_and_prints_a_summary(small_data, tmp_path):
    out = tmp_path / "out"
    first = shard_cli("--data", small_data, "--out", out, "--workers", "2", "--max-samples", "25", "--no-progress")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    counts = manifest["counts"]
    summary = (f"{out}: {counts['samples']} samples ({counts['positives']} pos, {counts['negatives']} neg) "
               f"in {len(manifest['shards'])} shards from 3 CTs")
    assert first.stdout.strip().splitlines()[-1] == summary
    assert counts["samples"] == len(csv_rows(small_data / "candidates.csv"))
    assert manifest["arguments"]["workers"] == 2 and manifest["arguments"]["max_samples"] == 25


@pytest.mark.slow
def test_cli_error_exit_code(small_data, tmp_path):
    """A different build in --out: `python -m luna_dist.shard` exits 1 with an `error:` line, nothing changed."""
    out = tmp_path / "out"
    build(options(small_data, out))
    before = file_stats(out)
    other = shard_cli("--data", small_data, "--out", out, "--max-samples", "10", "--no-progress")
    assert other.returncode == 1
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0]
    assert file_stats(out) == before


@pytest.mark.parametrize("flag, value, message", [("--workers", "-3", "--workers must be at least 1, got -3"),
                                                  ("--max-samples", "0", "--max-samples must be at least 1, got 0")])
@pytest.mark.slow
def test_cli_refuses_out_of_range_numbers(small_data, tmp_path, flag, value, message):
    result = shard_cli("--data", small_data, "--out", tmp_path / "out", flag, value, "--no-progress")
    assert result.returncode == 2  # the command line is wrong
    assert result.stderr.strip().splitlines()[-1] == f"python -m luna_dist.shard: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_codec_changes_the_bytes_not_the_samples(tiny_data, tiny_shards, tmp_path):
    """Each --codec stores the same chunks under its own member name; lz4 (the default) in about half the bytes
    of none, and zstd in fewer still."""
    assert codecs.CODECS[0] == "lz4"
    outs = {"lz4": tiny_shards}
    for codec in ("zstd", "none"):
        outs[codec] = tmp_path / codec
        build(BuildOptions(data=tiny_data, out=outs[codec], workers=1, max_samples=10, progress=False, codec=codec))
    manifests = {codec: json.loads((out / MANIFEST).read_text()) for codec, out in outs.items()}
    assert {codec: manifest["chunk"]["codec"] for codec, manifest in manifests.items()} == {c: c for c in outs}
    members = {codec: {ext for path in shard_files(out) for _, sample in iter_tar(path) for ext in sample}
               for codec, out in outs.items()}
    assert members == {"lz4": {"chunk.npy.b2", "cls", "json", "crc32.json"},
                       "zstd": {"chunk.npy.zst", "cls", "json", "crc32.json"},
                       "none": {"chunk.npy", "cls", "json", "crc32.json"}}
    assert read_samples(outs["none"]) == read_samples(outs["lz4"]) == read_samples(outs["zstd"])  # chunks, labels, JSON
    sizes = {codec: sum(s["bytes"] for s in m["shards"]) for codec, m in manifests.items()}
    assert sizes["zstd"] < sizes["lz4"] < 0.6 * sizes["none"]
