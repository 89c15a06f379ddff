"""The first stage of a CT's analysis: the UNet on every slice, within the body's box."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from luna_dist.shards.seg_samples import CONTEXT

BODY_HU = -500
"""The body is what lies above this HU: skin, fat (-100), muscle, bone, and the walls around the lungs. Air
outside the patient (-1000) and the foam of a mattress (-900 and below) lie under it."""

SEG_MARGIN = 24
"""Pixels around the body's box that the UNet sees too. Its output at a pixel depends on the input up to 23
pixels away (its receptive field, tested), so with this margin every pixel of the box is computed from
exactly the input it would have in the whole slice."""


# -- the three stages of one CT -----------------------------------------------------------------
def body_box(hu: np.ndarray) -> tuple[slice, slice]:
    """The rows and columns of the patient, the same in every slice: the bounding box of the largest
    connected region above BODY_HU in the CT's maximum projection along its slices.

    `hu` is the CT's (I, R, C) HU. The largest region is the body: a table or bed lies
    apart from it (the mattress between them is under BODY_HU), as do specks, cables and
    noise; where the table touches the patient the box grows to hold it, which costs
    time and nothing else. The lungs lie inside the body's walls, so inside its box. The
    projection, (R, C), is the only array built. An empty box (no rows, no columns) when
    nothing is above BODY_HU: a CT of air.
    """
    labels, count = ndimage.label(hu.max(axis=0) > BODY_HU)
    if not count:
        return slice(0, 0), slice(0, 0)
    largest = int(np.argmax(np.bincount(labels.ravel())[1:]))
    rows, columns = ndimage.find_objects(labels)[largest]
    return rows, columns


def segment_window(box: tuple[slice, slice], size: tuple[int, int], multiple: int) -> tuple[slice, slice]:
    """The rows and columns the UNet runs on to segment `box` of slices of `size` (R, C): the box grown by
    SEG_MARGIN on each side, within the slice, its ends rounded out to `multiple` (the UNet's pooling
    factor) so that its poolings pair the same pixels as over the whole slice."""
    return tuple(slice(max(0, (b.start - SEG_MARGIN) // multiple * multiple),
                       min(n, -(-(b.stop + SEG_MARGIN) // multiple) * multiple)) for b, n in zip(box, size))


@torch.no_grad()
def segment(hu: Tensor, model: nn.Module, batch_size: int, autocast, box: tuple[slice, slice] | None = None,
            memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Nodule probability > SEG_THRESHOLD of every voxel, (I, R, C) bool on hu's device; NonFiniteError
    counting them where any probability is not a finite number.

    `hu` is the CT (I, R, C) float32 on the device. The context stacks are gathered
    there by index (the slice and CONTEXT on each side, clamped at the volume's ends,
    as the segmentation shards cut them). With `box` (rows, columns: `body_box`) only
    the box is segmented and every voxel outside it is not: the UNet runs on
    `segment_window`, where each pixel of the box sees what it sees in the whole slice,
    so its probability is the same up to float rounding (the sums run in another
    order). `memory_format` is the stacks' layout (`hardware.seg_memory_format`).
    """
    slices, size = hu.shape[0], hu.shape[1:]
    box = box or (slice(0, size[0]), slice(0, size[1]))
    mask = torch.zeros(hu.shape, dtype=torch.bool, device=hu.device)
    if box[0].start == box[0].stop or box[1].start == box[1].stop:
        return mask  # no body: nothing to segment
    window = segment_window(box, size, model.multiple)
    inner = tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, window))  # the box in the window
    framed = hu[:, window[0], window[1]]
    offsets = torch.arange(-CONTEXT, CONTEXT + 1, device=hu.device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=hu.device)  # counted on the device: no sync a batch
    for start in range(0, slices, batch_size):
        centre = torch.arange(start, min(start + batch_size, slices), device=hu.device)
        stacks = framed[(centre[:, None] + offsets).clamp(0, slices - 1)]  # (B, 7, window rows, window columns)
        with autocast():
            probability = model(stacks.contiguous(memory_format=memory_format))  # (B, 1, window rows, columns)
        in_box = probability[:, 0, inner[0], inner[1]]
        mask[start:start + len(centre), box[0], box[1]] = in_box > SEG_THRESHOLD
        nonfinite += (~torch.isfinite(in_box)).sum()
    if count := int(nonfinite):  # NaN is never above the threshold: it would read as no nodule
        in_box = slices * (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
        raise NonFiniteError(f"{count:,} of {in_box:,} voxel probabilities")
    return mask


SEG_THRESHOLD = 0.5
"""A voxel is segmented where the UNet's probability exceeds this."""


class NonFiniteError(ValueError):
    """A network gave probabilities that are not finite numbers (NaN, infinity). Its weights are checked finite
    when loaded, so its sums overflowed; nothing of the CT is kept."""
