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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from luna_dist.analysis.groups import Groups, group
from luna_dist.analysis.segment import NonFiniteError, body_box, segment
from luna_dist.common.hardware import seg_memory_format
from luna_dist.imaging.chunks import cut_chunks
from luna_dist.imaging.ct import HU_MAX, HU_MIN, Ct
from luna_dist.imaging.geometry import LPS, irc_to_xyz, nearest_voxel, xyz_to_irc_float
from luna_dist.models.weights import load_into


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
    """Findings of one CT (`luna_dist.imaging.ct.read_ct`: turned to LPS), with the seconds each stage took.

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
