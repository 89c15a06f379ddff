"""The analysis benchmark: seconds per CT by stage, and the UNet's variants."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from luna_dist.analysis.detect import load_model
from luna_dist.analysis.findings import confusion
from luna_dist.analysis.groups import group
from luna_dist.analysis.segment import body_box, segment
from luna_dist.common.hardware import native_bf16, seg_memory_format
from luna_dist.imaging.ct import HU_MAX, HU_MIN, read_ct
from luna_dist.models.classifier import LunaModel
from luna_dist.models.provenance import UNTRAINED
from luna_dist.models.unet import SegmentationModel
from luna_dist.shards.seg_samples import CONTEXT
from luna_dist.tables.candidates import Annotation, find_series

THRESHOLD_HU = -250.0


def threshold_model() -> SegmentationModel:
    """A UNet that outputs probability > 0.5 exactly where the middle slice is above THRESHOLD_HU: the
    analysis benchmark's default, at an untrained UNet's cost but with the groups of real structures
    (an untrained one marks noise, thousands of groups a CT, and classifying them swamps the figures).

    Path: the input batch norm maps HU to (HU + 300) / 100; the first block passes the
    middle channel through (ReLU keeps the positive part); the skip connection carries
    it to the last block, which passes it on; the last 1x1 convolution subtracts 0.5.
    Every other weight is zero, so the deeper path adds nothing.
    """
    model = SegmentationModel()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        model.input_batchnorm.running_mean.fill_(-300.0)
        model.input_batchnorm.running_var.fill_(100.0**2)
        first, last_block = model.unet.down[0], model.unet.up[-1]
        first[0].weight[0, CONTEXT, 1, 1] = 1.0  # conv1: middle slice -> channel 0
        first[3].weight[0, 0, 1, 1] = 1.0  # conv2: channel 0 -> channel 0
        skip_channel = last_block[0].weight.shape[1] // 2  # the concat puts the up-sampled part first
        last_block[0].weight[0, skip_channel, 1, 1] = 1.0
        last_block[3].weight[0, 0, 1, 1] = 1.0
        model.unet.last.weight[0, 0, 0, 0] = 1.0
        model.unet.last.bias.fill_(-0.5)
    return model.eval()


def bench_analyze(data: Path, work: Path, cts: int, seg_model: Path | None, cls_model: Path | None,
                  ranks: bool, confusion_scans: int, confusion_marks: int, seg_slices: int) -> dict:
    """Seconds per CT by stage on one process, and the wall time of 2 CPU ranks against 1; the UNet's
    slices/s in each of SEG_VARIANTS on `seg_slices` slices of one CT; the peak memory of grouping one CT,
    and the seconds of the confusion table at LUNA16's size (888 scans, ~850 candidates each in candidates
    mode)."""
    work.mkdir(parents=True, exist_ok=True)
    if seg_model is None:
        seg_model = work / "seg-threshold.pt"
        torch.save({"model": threshold_model().state_dict(), "provenance": UNTRAINED.to_json()}, seg_model)
    if cls_model is None:
        cls_model = work / "cls-untrained.pt"
        torch.save({"model": LunaModel().state_dict(), "provenance": UNTRAINED.to_json()}, cls_model)
    series = sorted(find_series(data))[:cts]
    result = {"cts": len(series), "voxels_per_ct": 0, "seconds_per_ct": {}, "cts_per_s": {}}
    for processes in (1, 2) if ranks else (1,):
        out = work / f"ranks-{processes}"
        shutil.rmtree(out, ignore_errors=True)  # a finished CT would be skipped, not timed
        command = ["-m", "luna_dist.analyze", "--data", str(data), "--seg-model", str(seg_model),
                   "--cls-model", str(cls_model), "--series", *series, "--out", str(out)]
        if processes > 1:
            command = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), *command]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"} if processes > 1 else dict(os.environ)
        started = time.perf_counter()
        finished = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - started
        if finished.returncode != 0:
            raise RuntimeError(f"analyze on {processes} process(es) failed:\n{finished.stderr[-3000:]}")
        result["cts_per_s"][str(processes)] = len(series) / wall
        if processes == 1:
            summary = json.loads((out / "summary.json").read_text())
            result["seconds_per_ct"] = {stage: s / len(series) for stage, s in summary["seconds"].items()}
            per_ct = [json.loads(p.read_text())["voxels"] for p in (out / "ct").glob("*.json")]
            result["voxels_per_ct"] = sum(per_ct) // len(series)
    if ranks:
        result["2_vs_1"] = result["cts_per_s"]["2"] / result["cts_per_s"]["1"]
    result["segment_variants"] = segment_variants(find_series(data)[series[0]], seg_model, seg_slices)
    result["group_peak_bytes_per_voxel"] = group_peak_bytes_per_voxel(find_series(data)[series[0]])
    result["confusion"] = confusion_seconds(confusion_scans, confusion_marks)
    return result


SEG_VARIANTS = {
    "whole_nchw": (False, torch.contiguous_format),  # analysis versions 2 and 3 on every device
    "whole": (False, None),  # the device's layout
    "body": (True, None),  # analysis version 4: also only the body's box
}
"""How the segmentation benchmark runs the UNet: body crop, and layout (None: the device's)."""

SEG_BATCH = 32
"""Slices per pass in every variant: `--batch-size`'s default (8 and 16 ran as fast in channels_last)."""


def segment_variants(mhd: Path, seg_model: Path, slices: int) -> dict:
    """Slices/s of the UNet over the middle `slices` of one CT in each of SEG_VARIANTS, in channels_last
    with the body crop where the device's layout is another (a GPU: the figure that would change its
    default), and bf16 autocast with the body crop where the device has bf16 arithmetic (measured, never a
    default: it moves the probabilities); and the voxels of each variant's mask that differ from version
    2's, inside the body's box and outside it. Each variant runs once untimed (oneDNN builds its kernels on
    first use), then twice in turns, the faster counted: the machine may be shared."""
    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU") != "true"
                          else "cpu")
    hu = read_ct(mhd).hu
    first = max(0, (len(hu) - slices) // 2)
    hu = hu[first:first + slices]
    model, _ = load_model(SegmentationModel(), seg_model, device)
    box = body_box(hu)
    on_device = torch.from_numpy(np.require(hu, requirements="W")).to(device).float().clamp_(HU_MIN, HU_MAX)
    fp32 = functools.partial(torch.autocast, device.type, enabled=False)
    variants = {name: (crop, layout or seg_memory_format(device), fp32)
                for name, (crop, layout) in SEG_VARIANTS.items()}
    if variants["body"][1] != torch.channels_last:  # a GPU: measure the layout its default does not use
        variants["body_channels_last"] = (True, torch.channels_last, fp32)
    if native_bf16(device)[0]:
        variants["body_bf16"] = (*variants["body"][:2], functools.partial(torch.autocast, device.type, torch.bfloat16))
    masks, seconds = {}, {name: math.inf for name in variants}
    for turn in range(3):
        for name, (crop, layout, autocast) in variants.items():
            started = time.perf_counter()
            mask = segment(on_device if turn else on_device[:SEG_BATCH], model, SEG_BATCH, autocast,
                           box if crop else None, layout)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if turn:
                seconds[name] = min(seconds[name], time.perf_counter() - started)
                masks[name] = mask.cpu()
    inside = torch.zeros(hu.shape, dtype=torch.bool)
    inside[:, box[0], box[1]] = True
    reference = masks["whole_nchw"]
    return {"device": str(device), "slices": len(hu), "box_share_of_slice": inside[0].float().mean().item(),
            "slices_per_s": {name: len(hu) / s for name, s in seconds.items()},
            "mask_voxels": int(reference.sum()),
            "differing_voxels": {name: {"inside_box": int((mask != reference)[inside].sum()),
                                        "outside_box": int((mask != reference)[~inside].sum())}
                                 for name, mask in masks.items() if name != "whole_nchw"}}


def group_peak_bytes_per_voxel(mhd: Path) -> float:
    """Peak memory of grouping one CT segmented as dense tissue (HU > -250: body, vessels, nodules), beyond
    the CT and its mask, per voxel (numpy reports its arrays to tracemalloc)."""
    ct = read_ct(mhd)
    hu, mask = ct.hu, ct.hu > -250
    tracemalloc.start()
    try:
        group(mask, hu, ct.geometry.spacing_xyz[::-1])
        return tracemalloc.get_traced_memory()[1] / hu.size
    finally:
        tracemalloc.stop()


def confusion_seconds(scans: int, marks_per_scan: int) -> dict:
    """Seconds of the analysis's confusion table for `scans` x `marks_per_scan` generated detections, a few on
    each of LUNA16's share of nodules."""
    rng = np.random.default_rng(0)
    uids = [f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{i:030d}" for i in range(scans)]
    n_nodules = round(scans * 1186 / 888)
    nodule_scan, nodule_xyz = rng.integers(0, scans, n_nodules), rng.uniform(-150, 150, (n_nodules, 3))
    diameters, malignant = rng.uniform(3, 30, n_nodules).tolist(), (rng.random(n_nodules) < 0.3).tolist()
    nodules = [Annotation(uids[s], tuple(xyz), d, m)
               for s, xyz, d, m in zip(nodule_scan.tolist(), nodule_xyz.tolist(), diameters, malignant)]
    on_nodule = np.repeat(np.arange(n_nodules), 3)
    scan = np.concatenate([rng.integers(0, scans, scans * marks_per_scan - len(on_nodule)), nodule_scan[on_nodule]])
    xyz = np.concatenate([rng.uniform(-150, 150, (len(scan) - len(on_nodule), 3)),
                          nodule_xyz[on_nodule] + rng.normal(0, 1, (len(on_nodule), 3))])
    detections = [{"series_uid": uids[s], "xyz": p, "p_nodule": pn, "p_malignant": pm} for s, p, pn, pm in
                  zip(scan.tolist(), xyz.tolist(), rng.beta(1, 8, len(scan)).tolist(), rng.random(len(scan)).tolist())]
    started = time.perf_counter()
    confusion(detections, nodules)
    return {"scans": scans, "marks": len(detections), "seconds": time.perf_counter() - started}
