"""The segmentation shard build (`--task seg`), read back through the tar files and the pipelines.

Expected values are recomputed here: crops by fancy indexing of the CT, masks of each
nodule alone, slices of the CT for the validation slabs.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import SEG_NEGATIVES as NEGATIVES
from helpers import kill_build_after

from luna_dist.data.batches import batched_slices, collate_stacks
from luna_dist.data.loaders import val_loader
from luna_dist.data.streams import open_shard_set
from luna_dist.imaging.ct import read_ct
from luna_dist.imaging.geometry import xyz_to_irc
from luna_dist.imaging.masks import annotation_mask
from luna_dist.shards import chunk_samples, codecs, seg_samples
from luna_dist.shards.build import build
from luna_dist.shards.format import MANIFEST, ShardSetError
from luna_dist.shards.options import BuildOptions
from luna_dist.shards.seg_samples import (
    CONTEXT,
    CROP,
    SLAB_SLICES,
    VAL_BLOCK,
    context_slices,
    pack_mask,
    slabs,
    unpack_mask,
    validation_slices,
)
from luna_dist.tables.candidates import find_series, read_annotations, read_candidates


# --- the pure parts ------------------------------------------------------------------------------------
def test_context_is_clamped_at_the_volume_ends():
    assert context_slices(np.array([0, 5, 9]), 10).tolist() == [
        [0, 0, 0, 0, 1, 2, 3], [2, 3, 4, 5, 6, 7, 8], [6, 7, 8, 9, 9, 9, 9]]


def test_slabs_are_runs_cut_at_slab_size():
    selected = np.zeros(100, dtype=bool)
    selected[3:5] = selected[10:80] = selected[99] = True
    assert slabs(selected) == [(3, 5), (10, 10 + SLAB_SLICES), (10 + SLAB_SLICES, 10 + 2 * SLAB_SLICES),
                               (10 + 2 * SLAB_SLICES, 80), (99, 100)]
    assert slabs(np.zeros(5, dtype=bool)) == []


@pytest.mark.parametrize(("depth", "every", "blocks"), [(100, 4, [3]), (100, 1, [0, 1, 2, 3, 4, 5, 6]),
                                                        (200, 4, [2, 6, 10]), (10, 4, [0])])
def test_validation_takes_mask_slices_and_every_nth_block_from_the_middle(depth, every, blocks):
    has_mask = np.zeros(depth, dtype=bool)
    has_mask[1] = True
    chosen = validation_slices(has_mask, every)
    expected = {1} | {s for b in blocks for s in range(b * VAL_BLOCK, min(depth, (b + 1) * VAL_BLOCK))}
    assert set(np.flatnonzero(chosen).tolist()) == expected


def test_mask_bits_round_trip():
    mask = np.random.default_rng(0).random((3, 5, 13)) < 0.3  # columns not a multiple of 8
    packed = pack_mask(mask)
    assert packed.shape == (3, 5, 2) and packed.dtype == np.uint8
    assert np.array_equal(unpack_mask(packed, 13), mask)


# --- a build of the session's synthetic data -----------------------------------------------------------
@pytest.fixture(scope="module")
def seg_dir(seg_shard_dir) -> Path:
    return seg_shard_dir


def read_tar(path: Path) -> dict[str, dict]:
    samples = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            name = ext[:ext.index(".npy") + 4] if ".npy" in ext else ext  # the array, whatever its codec
            samples[key][name] = codecs.load_array({ext: data}, name) if name.endswith(".npy") else json.loads(data)
    return dict(samples)


@pytest.fixture(scope="module")
def shards(seg_dir) -> dict[str, dict[str, dict]]:
    """label -> key -> {"ct.npy", "mask.npy", "json", "shard"} over every tar."""
    out = defaultdict(dict)
    for path in sorted(seg_dir.glob("fold*.tar")):
        label = path.name.split("-")[1]
        for key, sample in read_tar(path).items():
            assert key not in out[label]
            out[label][key] = {**sample, "shard": path.name}
    return dict(out)


@pytest.fixture(scope="module")
def cts(synth_data):
    """uid -> (Ct, its mask, the mask of each of its nodules alone, its annotations)."""
    annotations, _ = read_annotations(synth_data / "annotations.csv")
    result = {}
    for uid, path in find_series(synth_data).items():
        ct = read_ct(path)
        mine = [a for a in annotations if a.series_uid == uid]
        result[uid] = (ct, annotation_mask(ct, mine), [annotation_mask(ct, [a]) for a in mine], mine)
    return result


def reference_stack(hu: np.ndarray, center) -> np.ndarray:
    """7 x 96 x 96 around (slice, row, col): context clamped, -1000 outside in plane, clipped to [-1000, 1000]."""
    s, r, c = (int(v) for v in center)
    slices = np.clip(np.arange(s - CONTEXT, s + CONTEXT + 1), 0, hu.shape[0] - 1)
    rows, cols = r - CROP // 2 + np.arange(CROP), c - CROP // 2 + np.arange(CROP)
    inside = ((rows >= 0) & (rows < hu.shape[1]))[:, None] & ((cols >= 0) & (cols < hu.shape[2]))[None, :]
    stack = hu[np.ix_(slices, np.clip(rows, 0, hu.shape[1] - 1), np.clip(cols, 0, hu.shape[2] - 1))].astype(np.int16)
    stack[:, ~inside] = -1000
    return np.clip(stack, -1000, 1000)


def reference_mask(mask: np.ndarray, center) -> np.ndarray:
    s, r, c = (int(v) for v in center)
    padded = np.pad(mask[s], CROP)
    return padded[r - CROP // 2 + CROP: r + CROP // 2 + CROP, c - CROP // 2 + CROP: c + CROP // 2 + CROP]


def test_positives_are_every_mask_slice_of_every_nodule(shards, cts):
    expected = set()
    for uid, (ct, _, alone, nodules) in cts.items():
        centers = xyz_to_irc(np.array([a.center_xyz for a in nodules]), ct.geometry)
        for nodule, center in zip(alone, centers):
            expected |= {(uid, int(s), int(center[1]), int(center[2])) for s in np.flatnonzero(nodule.any(axis=(1, 2)))}
    got = {(s["json"]["series_uid"], *s["json"]["center_irc"]) for s in shards["pos"].values()}
    assert got == expected and len(shards["pos"]) == len(expected) > 50


@pytest.mark.parametrize("label", ["pos", "neg"])
def test_training_stacks_and_masks_equal_direct_crops(shards, cts, label):
    for key, sample in shards[label].items():
        meta = sample["json"]
        ct, mask, _, _ = cts[meta["series_uid"]]
        assert sample["ct.npy"].dtype == np.int16 and sample["ct.npy"].shape == (7, CROP, CROP)
        assert np.array_equal(sample["ct.npy"], reference_stack(ct.hu, meta["center_irc"])), key
        crop_mask = unpack_mask(sample["mask.npy"], CROP)
        assert np.array_equal(crop_mask, reference_mask(mask, meta["center_irc"])), key
        assert meta["mask_pixels"] == crop_mask.sum()
        assert sample["shard"].startswith(f"fold{meta['fold']}-{label}-")
    if label == "pos":
        assert all(s["json"]["mask_pixels"] > 0 for s in shards[label].values())


def test_negatives_are_spread_candidates_on_slices_without_mask(synth_data, shards, cts):
    candidates = read_candidates(synth_data / "candidates.csv")[0]
    by_row = {c.row: c for c in candidates}
    per_ct = defaultdict(list)
    for sample in shards["neg"].values():
        candidate = by_row[sample["json"]["candidate_row"]]
        assert not candidate.is_nodule and candidate.series_uid == sample["json"]["series_uid"]
        per_ct[candidate.series_uid].append(sample["json"])
    assert set(per_ct) == set(cts)
    for uid, metas in per_ct.items():
        _, mask, _, _ = cts[uid]
        assert len(metas) == NEGATIVES
        assert not any(mask[m["slice"]].any() for m in metas)  # plenty of candidates on free slices here
        assert len({m["slice"] for m in metas}) > NEGATIVES // 2


def test_validation_slabs_hold_full_slices_for_each_mask_slice_and_the_chosen_blocks(shards, cts, seg_dir):
    manifest = json.loads((seg_dir / MANIFEST).read_text())
    seen = defaultdict(set)
    for sample in shards["val"].values():
        meta, images = sample["json"], sample["ct.npy"]
        ct, mask, _, _ = cts[meta["series_uid"]]
        depth = ct.hu.shape[0]
        assert meta["volume_slices"] == depth and meta["slices"] <= SLAB_SLICES
        first, stop = meta["first_slice"], meta["first_slice"] + meta["slices"]
        # The CT's slices once each, context included; the masks of the validated slices only.
        assert np.array_equal(images, np.clip(ct.hu[max(0, first - CONTEXT):min(depth, stop + CONTEXT)], -1000, 1000))
        assert np.array_equal(unpack_mask(sample["mask.npy"], ct.hu.shape[2]), mask[first:stop])
        assert not seen[meta["series_uid"]] & set(range(first, stop))
        seen[meta["series_uid"]] |= set(range(first, stop))
    for uid, (_, mask, _, _) in cts.items():
        expected = validation_slices(mask.any(axis=(1, 2)), 4)
        assert seen[uid] == set(np.flatnonzero(expected).tolist())
    assert manifest["counts"]["val_slices"] == sum(len(v) for v in seen.values())
    # One validation shard per CT.
    assert len({s["shard"] for s in shards["val"].values()}) == len(cts)


def test_manifest_describes_the_seg_build(seg_dir, shards):
    manifest = json.loads((seg_dir / MANIFEST).read_text())
    assert manifest["task"] == "seg" and "chunk" not in manifest
    assert manifest["sample"]["context_slices"] == 7 and manifest["sample"]["crop"] == [96, 96]
    assert manifest["counts"]["positives"] == len(shards["pos"]) and manifest["counts"]["negatives"] == len(shards["neg"])
    assert {s["label"] for s in manifest["shards"]} == {"pos", "neg", "val"}


def test_pipelines_decode_what_the_tars_hold(seg_dir, shards, cts):
    shard_set = open_shard_set(seg_dir, seg_samples)
    with pytest.raises(ShardSetError, match="--task seg"):
        open_shard_set(seg_dir, chunk_samples)  # a classification run refuses segmentation shards
    samples = [{"__key__": key, "ct.npy": _npy(s["ct.npy"]), "mask.npy": _npy(s["mask.npy"])}
               for key, s in list(shards["pos"].items())[:5]]
    stacks, masks = collate_stacks(samples)
    assert stacks.dtype.is_signed and stacks.shape == (5, 7, CROP, CROP) and masks.shape == (5, 1, CROP, CROP)
    for n, key in enumerate(s["__key__"] for s in samples):
        assert np.array_equal(stacks[n].numpy(), shards["pos"][key]["ct.npy"])
        assert np.array_equal(masks[n, 0].numpy(), unpack_mask(shards["pos"][key]["mask.npy"], CROP))

    # Validation: every validated slice once, as its 7-slice context and its mask.
    fold = 3  # one CT per fold in the session's data
    (uid,) = {s["json"]["series_uid"] for s in shards["val"].values() if s["json"]["fold"] == fold}
    ct, mask, _, _ = cts[uid]
    chosen = np.flatnonzero(validation_slices(mask.any(axis=(1, 2)), 4))
    batches = list(val_loader(shard_set, [fold], 8, 0, ("val",), batched_slices))
    images = np.concatenate([b[0].numpy() for b in batches])
    masks = np.concatenate([b[1].numpy() for b in batches])
    assert all(len(b[0]) <= 8 for b in batches) and len(images) == len(chosen)
    for n, s in enumerate(chosen):  # slabs in slice order within a CT
        assert np.array_equal(images[n], np.clip(ct.hu[context_slices(np.array([s]), ct.hu.shape[0])[0]], -1000, 1000))
        assert np.array_equal(masks[n, 0], mask[s])


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.slow
def test_killed_seg_build_resumes_to_the_uninterrupted_result(synth_data, seg_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "luna_dist.shard", "--task", "seg", "--data", str(synth_data), "--out", str(out),
               "--workers", "1", "--seg-negatives", str(NEGATIVES), "--no-progress"]
    done_dir = out / ".build" / "done"
    total = len(find_series(synth_data))
    finished_first, returncode = kill_build_after(command, done_dir, 2, tmp_path / "killed.log")
    journaled = len(list(done_dir.glob("*.json"))) if done_dir.is_dir() else 0
    if finished_first or journaled >= total:
        pytest.skip(f"the build finished before it could be killed ({journaled}/{total} CTs journaled)")
    assert returncode == -signal.SIGKILL and not (out / MANIFEST).exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {journaled} of {total} CTs already sharded" in resumed.stdout
    assert "validation slices" in resumed.stdout
    got, want = json.loads((out / MANIFEST).read_text()), json.loads((seg_dir / MANIFEST).read_text())
    assert got["counts"] == want["counts"] and got["folds"] == want["folds"]
    assert got["shards"] == want["shards"]  # same names, counts, sizes and checksums: byte-identical shards
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "build already complete" in rerun.stdout


def test_seg_and_cls_builds_do_not_mix(synth_data, seg_dir, tmp_path):
    with pytest.raises(Exception, match="different build"):
        build(BuildOptions(synth_data, seg_dir, progress=False))  # a cls build into the seg folder
