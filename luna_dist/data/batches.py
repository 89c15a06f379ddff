"""Samples into batches: each sample kind's members copied into one tensor a batch, in the memory a worker reuses."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import torch

from luna_dist.data.batch_memory import new_batch
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.shards.codecs import copy_payloads, load_array
from luna_dist.shards.format import damaged, require
from luna_dist.shards.seg_samples import CROP, STACK, context_slices, unpack_mask


# -- reading --------------------------------------------------------------------------------------
def collate(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw samples -> (chunks (N, 1, I, R, C) int16, labels (N,) int64), one copy per chunk."""
    chunks = new_batch((len(samples), 1, *CHUNK_SHAPE), torch.int16)
    require(samples, "cls")
    copy_payloads(samples, "chunk.npy", chunks.numpy(), CHUNK_SHAPE)
    labels = torch.tensor([sample["cls"] == b"1" for sample in samples], dtype=torch.int64)
    return chunks, labels


def locate(samples: list[dict], series_index: dict[str, int]) -> torch.Tensor:
    """(N, 4) float32: each sample's series (its number in `series_index`) and centre X/Y/Z (mm), from its JSON.

    Validation only, for the LUNA16 score; ~300 bytes of JSON per sample is little
    beside the 147 kB chunk copied for it.
    """
    rows = []
    for sample in samples:
        meta = json.loads(sample["json"])
        rows.append((series_index[meta["series_uid"]], *meta["center_xyz"]))
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def collate_located(samples: list[dict], series_index: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """`collate` plus where each sample lies (`locate`): (chunks, labels, where)."""
    return (*collate(samples), locate(samples, series_index))


def collate_malignancy(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw samples -> (chunks, labels (N,) int64: 1 malignant, 0 benign or not a nodule,
    info (N, 2) float32: 1 where the label is known (non-nodules: benign) else 0, diameter_mm)."""
    chunks, _ = collate(samples)
    metas = [json.loads(sample["json"]) for sample in samples]
    labels = torch.tensor([meta["is_malignant"] is True for meta in metas], dtype=torch.int64)
    info = torch.tensor([(meta["is_malignant"] is not None or not meta["is_nodule"], meta["diameter_mm"])
                         for meta in metas], dtype=torch.float32).reshape(-1, 2)
    return chunks, labels, info


def with_malignancy(samples: Iterator[dict], malignant: bool) -> Iterator[dict]:
    """Pipeline stage: the nodule samples whose `is_malignant` is `malignant` (unlabelled ones never pass)."""
    for sample in samples:
        if json.loads(sample["json"])["is_malignant"] is malignant:
            yield sample


# -- reading --------------------------------------------------------------------------------------
def collate_stacks(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training samples -> (stacks (N, 7, 96, 96) int16, masks (N, 1, 96, 96) bool), one copy per member."""
    stacks = new_batch((len(samples), STACK, CROP, CROP), torch.int16)
    copy_payloads(samples, "ct.npy", stacks.numpy(), (STACK, CROP, CROP))
    packed = np.empty((len(samples), CROP, -(-CROP // 8)), dtype=np.uint8)
    copy_payloads(samples, "mask.npy", packed, packed.shape[1:])
    return stacks, torch.from_numpy(unpack_mask(packed, CROP)).unsqueeze(1)


def batched_slices(slabs: Iterator[dict], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pipeline stage: validation slabs -> batches of full slices with their context,
    (int16 (N, 7, R, C), bool masks (N, 1, R, C)); a batch ends early where the slice size changes."""
    images, masks = [], []
    for slab in slabs:
        meta, ct, mask = _decode_slab(slab)
        if images and images[0].shape != ct.shape[1:]:
            yield _stack_slices(images, masks)
            images, masks = [], []
        slices = meta["first_slice"] + np.arange(meta["slices"])
        for j, context in enumerate(context_slices(slices, meta["volume_slices"]) - meta["ct_first"]):
            images.append(ct[context])
            masks.append(mask[j])
            if len(images) == batch_size:
                yield _stack_slices(images, masks)
                images, masks = [], []
    if images:
        yield _stack_slices(images, masks)


def _decode_slab(slab: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """A validation slab's JSON, CT slices (stored slices, R, C) and unpacked masks; errors name the shard and slab."""
    require([slab], "json")
    ct, masks = load_array(slab, "ct.npy"), load_array(slab, "mask.npy")
    try:
        return json.loads(slab["json"]), ct, unpack_mask(masks, ct.shape[-1])
    except ValueError as err:  # a damaged JSON, or masks of another shape
        raise damaged(slab, f"unreadable ({err})") from None


def _stack_slices(images: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)).unsqueeze(1)
