"""What the analysis does to one CT: segment every slice, group the segmentation, classify each group.

The UNet segments every slice from its 7-slice context (stacks built on the device,
slices in batches), within the rows and columns of the patient's body (air outside it
holds no nodule), probability > SEG_THRESHOLD, EROSION_ITERATIONS binary erosion; 3-D
connected components are the groups' cores, each placed at its centre of mass weighted
by HU + 1001, then grown back within the segmentation and measured (volume, longest
axial diameter); each group's 32x48x48 chunk is
cut as the shard build cuts it and scored by the nodule classifier, then by the
malignancy model. Given candidates (LUNA16's false-positive reduction track) skip the
first two stages and keep their coordinates.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from luna_dist.ct import HU_MAX, HU_MIN, Ct, cut_chunks
from luna_dist.geometry import LPS, irc_to_xyz, nearest_voxel, xyz_to_irc_float
from luna_dist.hardware import seg_memory_format
from luna_dist.model import load_into
from luna_dist.seg_samples import CONTEXT

SEG_THRESHOLD = 0.5
"""A voxel is segmented where the UNet's probability exceeds this."""

EROSION_ITERATIONS = 1
"""Binary erosions of the segmentation before grouping: they cut the thin bridges between structures."""

BODY_HU = -500
"""The body is what lies above this HU: skin, fat (-100), muscle, bone, and the walls around the lungs. Air
outside the patient (-1000) and the foam of a mattress (-900 and below) lie under it."""

SEG_MARGIN = 24
"""Pixels around the body's box that the UNet sees too. Its output at a pixel depends on the input up to 23
pixels away (its receptive field, tested), so with this margin every pixel of the box is computed from
exactly the input it would have in the whole slice."""

MIN_EXTENT = 2 * EROSION_ITERATIONS + 1
"""Voxels a CT needs along each axis for anything to survive the erosion (the volume's border erodes too)."""

GROUP_SLAB_SHARE = 16
"""A group's bounding box is summed a slab of slices at a time, each at most 1/16 of the CT (one slice at
least): the slab's temporaries (5 bytes a voxel) stay below a third of a byte per voxel of the CT."""


@dataclass
class Models:
    """The networks of the pipeline, in eval mode on one device, the sha256 of each one's weights and the file
    they came from."""

    seg: nn.Module | None  # None in candidates mode
    nodule: nn.Module
    malignancy: nn.Module | None
    sha256: dict[str, str | None] = field(default_factory=dict)  # "seg", "nodule", "malignancy"; None: absent
    paths: dict[str, Path | None] = field(default_factory=dict)  # likewise

    def named(self, role: str) -> str:
        """`the nodule classifier --cls-model PATH`, as a message names the network of `role`."""
        path = self.paths.get(role)
        return f"the {MODEL_NAMES[role][0]}" + (f" {MODEL_NAMES[role][1]} {path}" if path else "")


MODEL_NAMES = {"seg": ("segmentation model", "--seg-model"), "nodule": ("nodule classifier", "--cls-model"),
               "malignancy": ("malignancy model", "--mal-model")}
"""Each network's name and the flag that gives it, for messages."""


class NonFiniteError(ValueError):
    """A network gave probabilities that are not finite numbers (NaN, infinity). Its weights are checked finite
    when loaded, so its sums overflowed; nothing of the CT is kept."""


def load_model(model: nn.Module, path: Path, device: torch.device) -> tuple[nn.Module, str]:
    """Weights from a best.pt or a run's state/ folder into `model`, ready for inference on `device`; and
    their sha256 (`weights_sha256`). FileNotFoundError or WeightsError naming the file where it holds none."""
    load_into(model, Path(path))
    sha256 = weights_sha256(model)  # before the move: no copy back from the device
    return model.to(device).eval(), sha256


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a network's state: each tensor's name, dtype, shape and bytes, in name order.

    Hashes what was loaded rather than the file, so a best.pt and the state/ folder of the
    same weights agree, and a re-saved file of the same weights changes nothing.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


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


@dataclass
class Groups:
    """The groups of a segmentation: each a core left by the erosion, grown back within the segmentation
    (`group`); group k is label k + 1 of `labels`."""

    centres: np.ndarray  # (N, 3) IRC float: centres of mass of the cores, weighted by HU + 1001
    voxels: np.ndarray  # (N,) int64 voxel counts of the grown groups
    axial_diameter_mm: np.ndarray  # (N,) longest diameter within one slice, mm (see `group`)
    labels: np.ndarray  # (I, R, C) int32, 0 outside every group: what the report outlines


FERET_DIRECTIONS = 64
"""Directions a group's width is measured in, within each slice: the longest width found is at least
cos(90° / 64) = 0.9997 of the true longest diameter, and never more."""

NEIGHBOURS = np.array([offset for offset in itertools.product((-1, 0, 1), repeat=3) if any(offset)])
"""The 26 voxels around a voxel (I, R, C offsets): a group grows back a layer of them at a time."""


def group(mask: np.ndarray, hu: np.ndarray, spacing_irc: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Groups:
    """Connected groups of a segmentation: centres, voxel counts, longest axial diameters.

    `mask` is the segmentation (I, R, C) bool, `hu` the CT's int16 HU, `spacing_irc` its spacing in mm
    (sizes are in voxels without it). The erosion (EROSION_ITERATIONS) cuts thin bridges, and each connected
    component left is a group's core; its centre is the core's centre of mass weighted by HU + 1001 (HU
    clipped to [-1000, 1000]), so denser voxels pull harder, air still weighs a little, and what touches
    the nodule does not pull it. Each core is then grown back within the segmentation (`_grow`), so its
    voxel count (the volume) and its longest axial diameter are of the segmented group, not of its core: the
    erosion takes a voxel off each side, about half the volume of a 6-8 mm nodule. The longest axial
    diameter is the largest Feret diameter of the group's voxels (as squares) in any of its slices, the size
    a reader measures on an axial slice.

    The mask, the eroded mask (1 byte a voxel each) and the labels (4 bytes) are the only arrays the size of
    the CT; each group is measured within its bounding box, in integers: the same centres as scipy's
    `center_of_mass` of the cores (whose float64 sums of these integer weights are exact too) without its
    whole-volume float64 temporaries.
    """
    eroded = ndimage.binary_erosion(mask, iterations=EROSION_ITERATIONS)
    labels, count = ndimage.label(eroded)
    del eroded  # labelled: the grouping needs only the labels from here on
    slab_voxels = labels.size // GROUP_SLAB_SHARE
    cores = ndimage.find_objects(labels)
    centres = np.array([_centre(labels, hu, index + 1, box, slab_voxels)
                        for index, box in enumerate(cores)]).reshape(-1, 3)
    _grow(labels, mask, cores, growth_reach(spacing_irc))
    voxels, diameters = np.zeros(count, dtype=np.int64), np.zeros(count)
    for index, box in enumerate(ndimage.find_objects(labels)):
        voxels[index], diameters[index] = _size(labels, index + 1, box, slab_voxels, spacing_irc[1:])
    return Groups(centres, voxels, diameters, labels)


def growth_reach(spacing_irc: tuple[float, float, float]) -> tuple[int, int, int]:
    """Voxels along each axis a core may grow beyond its bounding box: the erosion's reach in mm along the
    CT's coarsest axis, EROSION_ITERATIONS times its largest spacing (at 0.6 x 0.6 x 2.5 mm, a slice and 5
    pixels). The erosion takes a slice off the top of a nodule, and with it the rim of the slice below as far
    in as the nodule's surface slopes, up to about that far."""
    reach_mm = EROSION_ITERATIONS * max(spacing_irc)
    return tuple(int(np.ceil(reach_mm / spacing - 1e-9)) for spacing in spacing_irc)


def _grow(labels: np.ndarray, mask: np.ndarray, cores: list[tuple[slice, ...]], reach: tuple[int, int, int]) -> None:
    """Grow each core of `labels` back within `mask`, in place: a layer of NEIGHBOURS at a time, through the
    voxels of the mask that no group holds, each group within its core's bounding box (`cores`) widened by
    `reach`; a voxel that two groups reach in the same layer goes to the lower label, so each goes to the
    nearest core through the mask. A thin structure (a vessel) that the erosion cut off is not regained
    beyond the reach, nor is anything the mask does not connect to the core.

    The first layer is sought among every free voxel of the mask, each later one among those still free or,
    where fewer, the free neighbours of the layer before: the work grows with the voxels regained and the
    free ones, never with the CT's.
    """
    if not cores:
        return
    low = np.array([(0, 0, 0)] + [[b.start - r for b, r in zip(box, reach)] for box in cores]).T  # (3, groups + 1)
    high = np.array([(0, 0, 0)] + [[b.stop + r for b, r in zip(box, reach)] for box in cores]).T  # column 0: none
    plane, chunk = labels[0].size, max(4096, labels.size // 256)  # a chunk's temporaries: ~0.4 bytes a voxel
    slab = max(1, labels.size // GROUP_SLAB_SHARE // plane)
    free = np.concatenate([first * plane + np.flatnonzero(mask[first:first + slab] & (labels[first:first + slab] == 0))
                           for first in range(0, len(labels), slab)])
    flat_labels, flat_mask = labels.reshape(-1), np.ascontiguousarray(mask).reshape(-1)  # views, as both are
    candidates = free
    while len(candidates):
        layer = [_nearest_label(candidates[start:start + chunk], labels, low, high)
                 for start in range(0, len(candidates), chunk)]
        claimed = np.concatenate([voxels for voxels, _ in layer])
        flat_labels[claimed] = np.concatenate([label for _, label in layer])
        free = free[flat_labels[free] == 0]
        candidates = free
        if len(free) > len(NEIGHBOURS) * len(claimed):
            step = chunk // len(NEIGHBOURS)
            candidates = np.unique(np.concatenate([np.zeros(0, dtype=np.int64)] + [
                _free_neighbours(claimed[start:start + step], labels.shape, flat_labels, flat_mask)
                for start in range(0, len(claimed), step)]))


def _nearest_label(voxels: np.ndarray, labels: np.ndarray, low: np.ndarray, high: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Of the free voxels `voxels` (flat indices), those a group holds a neighbour of, within its reach
    (`low` <= voxel < `high`, columns by label), and the lowest such label of each."""
    flat, none = labels.reshape(-1), np.iinfo(labels.dtype).max
    irc = np.unravel_index(voxels, labels.shape)
    edges = [(axis > 0, axis < size - 1) for axis, size in zip(irc, labels.shape)]  # a neighbour on each side
    strides = np.array(labels.strides) // labels.itemsize
    nearest = np.full(len(voxels), none, dtype=labels.dtype)
    for offset in NEIGHBOURS:
        inside = np.ones(len(voxels), dtype=bool)
        for step, (before, after) in zip(offset, edges):
            if step:
                inside &= before if step < 0 else after
        label = flat[np.where(inside, voxels + int(offset @ strides), voxels)]  # outside: the voxel itself, free
        within = label > 0
        for axis, low_axis, high_axis in zip(irc, low, high):
            within &= (axis >= low_axis[label]) & (axis < high_axis[label])
        np.minimum(nearest, label, out=nearest, where=within)
    held = nearest < none
    return voxels[held], nearest[held]


def _free_neighbours(voxels: np.ndarray, shape: tuple[int, int, int], flat_labels: np.ndarray,
                     flat_mask: np.ndarray) -> np.ndarray:
    """The voxels of the mask next to `voxels` (flat indices) that no group holds, flat, possibly repeated."""
    near = (np.stack(np.unravel_index(voxels, shape), axis=1)[:, None] + NEIGHBOURS).reshape(-1, 3)
    near = near[((near >= 0) & (near < shape)).all(axis=1)]
    flat = np.ravel_multi_index(tuple(near.T), shape)
    return flat[flat_mask[flat] & (flat_labels[flat] == 0)]


def _slabs(box: tuple[slice, slice, slice], slab_voxels: int):
    """The box a slab of slices at a time, each of at most `slab_voxels` voxels (one slice at least)."""
    step = max(1, slab_voxels // ((box[1].stop - box[1].start) * (box[2].stop - box[2].start)))
    for first in range(box[0].start, box[0].stop, step):
        yield (slice(first, min(first + step, box[0].stop)), box[1], box[2])


def _centre(labels: np.ndarray, hu: np.ndarray, label: int, box: tuple[slice, slice, slice],
            slab_voxels: int) -> np.ndarray:
    """Weighted centre (3,) IRC of group `label`, from the per-axis sums of its weights over its bounding
    box `box`, a slab of slices at a time."""
    per_slice, per_row, per_column = [], 0, 0
    for slab in _slabs(box, slab_voxels):
        weight = hu[slab].astype(np.int32)
        np.clip(weight, HU_MIN, HU_MAX, out=weight)
        weight += 1001
        weight *= labels[slab] == label
        per_slice.append(weight.sum(axis=(1, 2), dtype=np.int64))
        per_row = per_row + weight.sum(axis=(0, 2), dtype=np.int64)
        per_column = per_column + weight.sum(axis=(0, 1), dtype=np.int64)
    sums = [np.concatenate(per_slice), per_row, per_column]
    moments = [int(s @ np.arange(b.start, b.stop, dtype=np.int64)) for s, b in zip(sums, box)]
    return np.array(moments, dtype=np.float64) / float(sums[0].sum())


def _size(labels: np.ndarray, label: int, box: tuple[slice, slice, slice], slab_voxels: int,
          spacing_rc: tuple[float, float]) -> tuple[int, float]:
    """Voxel count and longest axial diameter (mm) of group `label` within its bounding box `box`."""
    count, diameter = 0, 0.0
    for slab in _slabs(box, slab_voxels):
        inside = labels[slab] == label
        count += int(np.count_nonzero(inside))
        diameter = max(diameter, _longest_axial_diameter(inside, box[1].start, spacing_rc))
    return count, diameter


def _longest_axial_diameter(inside: np.ndarray, first_row: int, spacing_rc: tuple[float, float]) -> float:
    """Largest Feret diameter (mm) over the slices of `inside` (S, R, C) bool, its voxels taken as squares.

    A slice's convex hull is that of the outer corners of each row's first and last voxel, so only those
    (4 a row) are projected, on FERET_DIRECTIONS directions: memory and time grow with the box's rows,
    not its voxels.
    """
    rows = inside.any(axis=2)  # (S, R)
    if not rows.any():
        return 0.0
    columns = inside.shape[2]
    first = inside.argmax(axis=2)
    last = columns - 1 - inside[..., ::-1].argmax(axis=2)
    row_mm, column_mm = spacing_rc
    angle = np.arange(FERET_DIRECTIONS) * (np.pi / FERET_DIRECTIONS) - np.pi / 2  # every direction, cos >= 0
    cos, sin = np.cos(angle), np.sin(angle)  # (K,)
    y = (first_row + np.arange(inside.shape[1]))[:, None] * row_mm * sin  # (R, K): row centres, projected
    half_row = row_mm / 2 * np.abs(sin)  # (K,): the nearer or farther edge of the row, whichever is outer
    high = ((last + 0.5) * column_mm)[..., None] * cos  # (S, R, K): each row's outer corners, projected
    high += y + half_row
    low = ((first - 0.5) * column_mm)[..., None] * cos
    low += y - half_row
    high[~rows] = -np.inf
    low[~rows] = np.inf
    return float((high.max(axis=1) - low.min(axis=1)).max())


@torch.no_grad()
def classify(hu: np.ndarray, centres_irc: np.ndarray, models: Models, device: torch.device, batch_size: int,
             autocast) -> tuple[np.ndarray, np.ndarray]:
    """p_nodule and p_malignant (NaN without a malignancy model) of the chunk around each centre.

    A chunk is cut around the voxel holding the centre, halves rounded up as the shard
    build rounds them, so the classifier sees what it was trained on.
    """
    p_nodule, p_malignant = np.zeros(len(centres_irc)), np.full(len(centres_irc), np.nan)
    for start in range(0, len(centres_irc), batch_size):
        chunks, _ = cut_chunks(hu, nearest_voxel(centres_irc[start:start + batch_size]))
        x = torch.from_numpy(chunks).to(device, non_blocking=True).float()[:, None]  # (B, 1, 32, 48, 48)
        end = start + len(chunks)
        with autocast():
            p_nodule[start:end] = models.nodule(x)[1][:, 1].float().cpu().numpy()
            if models.malignancy is not None:
                p_malignant[start:end] = models.malignancy(x)[1][:, 1].float().cpu().numpy()
    return p_nodule, p_malignant


@dataclass
class Analysed:
    """One CT's findings, ready for its JSON, and what they were found in, for the report's images: kept only
    while the CT is in memory anyway."""

    result: dict
    ct: Ct
    labels: np.ndarray | None  # the groups' labels (detection k is label k + 1); None in candidates mode


def analyze_ct(ct: Ct, models: Models, device: torch.device, batch_size: int, autocast,
               candidates_xyz: np.ndarray | None = None, body_crop: bool = True) -> Analysed:
    """Findings of one CT (`ct.read_ct`: turned to LPS), with the seconds each stage took.

    Positions are in LPS, as LUNA16's tables give them; indices (`irc`) are of the CT as turned. Given
    candidates keep their coordinates: only the chunk's cut rounds them to a voxel; they have no
    group, so no size. `body_crop` segments only the body's box (`body_box`); False, every pixel.
    """
    seconds = {}
    if candidates_xyz is None:
        spacing = ct.geometry.spacing_xyz
        try:
            groups = _segment_and_group(ct.hu, models.seg, device, batch_size, autocast, seconds, spacing[::-1],
                                        body_crop)
        except NonFiniteError as err:
            raise NonFiniteError(_not_finite(models, "seg", str(err))) from None
        centres_irc, voxels, labels = groups.centres, groups.voxels, groups.labels
        centres_xyz = irc_to_xyz(centres_irc, ct.geometry)
        sizes = [{"diameter_mm": round(float(d), 2), "volume_mm3": round(float(n * np.prod(spacing)), 2)}
                 for d, n in zip(groups.axial_diameter_mm, voxels)]
    else:
        centres_xyz = np.asarray(candidates_xyz, dtype=np.float64).reshape(-1, 3)
        centres_irc = xyz_to_irc_float(centres_xyz, ct.geometry)
        voxels, labels = np.zeros(len(centres_irc), dtype=np.int64), None
        sizes = [{"diameter_mm": None, "volume_mm3": None}] * len(centres_irc)
    started = time.perf_counter()
    p_nodule, p_malignant = classify(ct.hu, centres_irc, models, device, batch_size, autocast)
    seconds["classify"] = time.perf_counter() - started
    for role, p in (("nodule", p_nodule), ("malignancy", p_malignant if models.malignancy is not None else None)):
        if p is not None and (count := int((~np.isfinite(p)).sum())):
            raise NonFiniteError(_not_finite(models, role, f"{count:,} of {len(p):,} probabilities"))
    detections = [
        {"xyz": [round(v, 3) for v in xyz], "irc": [round(v, 2) for v in irc], "voxels": int(n), **size,
         "p_nodule": float(pn), "p_malignant": None if np.isnan(pm) else float(pm)}
        for xyz, irc, n, size, pn, pm in zip(centres_xyz.tolist(), centres_irc.tolist(), voxels, sizes, p_nodule,
                                             p_malignant)
    ]
    result = {"series_uid": ct.series_uid, "voxels": int(ct.hu.size), "shape": list(ct.hu.shape),
              "coordinates": LPS, "stored_axes": ct.stored_axes, "seconds": seconds, "detections": detections}
    return Analysed(result, ct, labels)


def _not_finite(models: Models, role: str, what: str) -> str:
    """Why a CT's findings are refused (its caller names the CT): which network gave what."""
    return (f"{models.named(role)} gave {what} that are not finite numbers (NaN or infinity): its weights "
            "are finite, so its sums overflowed (in mixed precision? then try without); nothing of this CT is kept")


def _segment_and_group(hu: np.ndarray, model: nn.Module, device: torch.device, batch_size: int, autocast,
                       seconds: dict, spacing_irc: tuple[float, float, float], body_crop: bool) -> Groups:
    """The segmentation's groups; the host copy of the mask lives only as long as this call."""
    started = time.perf_counter()
    box = body_box(hu) if body_crop else None
    on_device = torch.from_numpy(np.require(hu, requirements='W')).to(device).float().clamp_(HU_MIN, HU_MAX)
    mask = segment(on_device, model, batch_size, autocast, box, seg_memory_format(device)).cpu().numpy()
    del on_device
    seconds["segment"] = time.perf_counter() - started
    started = time.perf_counter()
    grouped = group(mask, hu, spacing_irc)
    seconds["group"] = time.perf_counter() - started
    return grouped
