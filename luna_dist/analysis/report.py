"""The report a person looks at: `RESULTS/report.html`, and a page per CT with each detection's slices.

Images are made where the CT is in memory anyway: in the analysis process, right after the CT is
analysed (`draw_ct`), as PNG files beside its findings (`RESULTS/ct/<name>/`, the name its uid made a
safe file name: `out_folder.file_name`). For the IMAGES_PER_CT detections of highest p_nodule, and
every annotated nodule that no detection matches, three slices through the centre (axial, coronal,
sagittal, in patient space: the patient's right on the left, head up), CROP_MM wide, in a lung window,
with the group's outline (the annotated sphere's for a missed nodule). The PNGs are encoded here
(zlib), so the images need nothing beyond numpy and scipy.

The pages are written by the main process once every process's findings are gathered
(`write_report`): plain HTML and CSS, no script, nothing fetched from elsewhere, every text escaped;
the summary page lists the CTs with their counts and links to each CT's page, so a run of 888 CTs
stays one screen of table and 888 small pages.
"""

from __future__ import annotations

import html
import posixpath
import struct
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
from scipy import ndimage

from luna_dist.analysis.detect import Analysed
from luna_dist.analysis.findings import (
    CONFUSION_COLUMNS,
    CONFUSION_ROWS,
    MATCH_DISTANCE,
    confusion_cells,
    relative_distances,
)
from luna_dist.common.atomic import atomic_open
from luna_dist.common.out_folder import below, file_name
from luna_dist.imaging.ct import HU_MIN
from luna_dist.imaging.geometry import nearest_voxel, xyz_to_irc_float
from luna_dist.tables.candidates import Annotation

IMAGES_PER_CT = 20
"""Detections of a CT shown with images, those of highest p_nodule; the others are listed without."""

LUNG_WINDOW = (-600.0, 1500.0)
"""(level, width) HU of the images: -1350 HU is black, +150 HU white."""

CROP_MM = 50.0
"""Width and height of each slice shown, mm: a nodule and what surrounds it."""

PIXEL_MM = 0.4
"""Pixel size of the images, mm: finer than a CT's voxels, so no voxel is lost."""

OUTLINE_RGB = {"group": (255, 196, 0), "nodule": (255, 64, 64)}
"""The outline's colour: a detection's group, an annotated nodule (of a missed one)."""

PLANES = {  # name: (patient direction along the image's columns, along its rows), LPS (mm)
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
"""The three slices through a centre, as a radiologist views them."""

PAGE_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#111;background:#fff;max-width:80em}
h1{font-size:1.4em;word-break:break-all}table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .5em;vertical-align:top}th{background:#f2f2f2;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}code,.path{font-size:.85em;word-break:break-all}
img.slices{image-rendering:pixelated;width:420px}.note{color:#555}.missed td{background:#fff4f4}"""


# -- images, in the analysis process -----------------------------------------------------------------------
def draw_ct(analysed: Analysed, nodules: list[Annotation] | None, out: Path) -> None:
    """Images of one CT's detections and missed nodules into `out/ct/<name>/`, and what the page needs
    into its findings: each detection's `image` (a path below `out`, None beyond IMAGES_PER_CT) and, with
    annotations (`nodules`: those of this series; None without), the `nodule` it matches and the
    `missed` nodules, each with its image, and how many `nodules` the series has."""
    result, name = analysed.result, file_name(analysed.result["series_uid"])
    folder = below(out, "ct", name)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("detection-*.png"), *folder.glob("missed-*.png")]:  # of an earlier analysis of this
        old.unlink()  # CT: its detections may have been others
    detections = result["detections"]
    ranked = sorted(range(len(detections)), key=lambda k: (-detections[k]["p_nodule"], k))
    for rank, k in enumerate(ranked, start=1):
        detections[k]["image"] = None
        if rank <= IMAGES_PER_CT:
            label = None if analysed.labels is None else k + 1
            image = slices(analysed, np.array(detections[k]["xyz"]), label, None)
            detections[k]["image"] = _write_png(below(out, "ct", name, f"detection-{rank:03d}.png"), image, out)
    if nodules is None:
        return
    result["nodules"] = len(nodules)
    distances = relative_distances(np.array([d["xyz"] for d in detections]), nodules)  # (T, D)
    for k, detection in enumerate(detections):
        nearest = int(distances[:, k].argmin()) if nodules else None
        matched = nearest is not None and distances[nearest, k] < MATCH_DISTANCE
        detection["nodule"] = _nodule(nodules[nearest]) if matched else None
    result["missed"] = []
    for n, nodule in enumerate(nodules):
        if not (distances[n] < MATCH_DISTANCE).any():
            image = slices(analysed, np.array(nodule.center_xyz), None, nodule.diameter_mm)
            written = _write_png(below(out, "ct", name, f"missed-{n + 1:03d}.png"), image, out)
            result["missed"].append({**_nodule(nodule), "image": written})


def _nodule(nodule: Annotation) -> dict:
    return {"xyz": [round(v, 3) for v in nodule.center_xyz], "diameter_mm": nodule.diameter_mm,
            "malignant": nodule.is_malignant}


def slices(analysed: Analysed, centre_xyz: np.ndarray, label: int | None, diameter_mm: float | None) -> np.ndarray:
    """The three slices through `centre_xyz` (mm) side by side, (H, W, 3) uint8 RGB, in LUNG_WINDOW; outlined
    where the group `label` lies, or where the sphere of `diameter_mm` around the centre cuts the slice."""
    size = int(round(CROP_MM / PIXEL_MM))
    offsets = (np.arange(size) - (size - 1) / 2) * PIXEL_MM
    panels = []
    for across, down in PLANES.values():
        points = (centre_xyz + offsets[None, :, None] * np.array(across)
                  + offsets[:, None, None] * np.array(down))  # (size, size, 3) XYZ mm
        irc = xyz_to_irc_float(points, analysed.ct.geometry)
        hu = ndimage.map_coordinates(analysed.ct.hu, irc.reshape(-1, 3).T, output=np.float32, order=1,
                                     mode="constant", cval=HU_MIN).reshape(size, size)
        level, width = LUNG_WINDOW
        grey = (np.clip((hu - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
        panel = np.repeat(grey[..., None], 3, axis=2)
        inside, colour = None, OUTLINE_RGB["group" if diameter_mm is None else "nodule"]
        if label is not None:
            inside = _voxels_of(analysed.labels, nearest_voxel(irc)) == label
        elif diameter_mm is not None:
            inside = np.linalg.norm(points - centre_xyz, axis=2) <= diameter_mm / 2
        if inside is not None:
            panel[inside & ~ndimage.binary_erosion(inside)] = colour
        middle, tick = size // 2, size // 20  # ticks on the borders point at the centre, outlined or not
        panel[middle, :tick] = panel[middle, -tick:] = panel[:tick, middle] = panel[-tick:, middle] = colour
        panels.append(panel)
    gap = np.full((size, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def _voxels_of(volume: np.ndarray, irc: np.ndarray) -> np.ndarray:
    """`volume` at the voxels `irc` (..., 3), 0 outside it."""
    inside = np.all((irc >= 0) & (irc < volume.shape), axis=-1)
    values = np.zeros(irc.shape[:-1], dtype=volume.dtype)
    values[inside] = volume[tuple(irc[inside].T)]
    return values


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as a PNG file: 8-bit RGB, no filter, zlib-compressed (its default level: 9
    would take 7 times as long for 13 % less)."""
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))


def _write_png(path: Path, rgb: np.ndarray, out: Path) -> str:
    """Write the image atomically; its path below `out`, as the pages link it."""
    with atomic_open(path, "wb") as f:
        f.write(png_bytes(rgb))
    return path.relative_to(out).as_posix()


# -- pages, in the main process --------------------------------------------------------------------------------
def write_report(out: Path, results: list[dict], summary: dict, sources: dict[str, Path]) -> Path:
    """`out/report.html` (the run, its models, scores and CTs) and `out/ct/<name>.html` per CT (its uid's
    `out_folder.file_name`); the first's path.

    `sources` holds each series' CT path, `summary` what summary.json holds."""
    scored = "confusion" in summary
    for result in results:
        uid = result["series_uid"]
        _write_page(below(out, "ct", f"{file_name(uid)}.html"), _ct_page(result, sources.get(uid), scored))
    _write_page(below(out, "report.html"), _summary_page(out, results, summary, sources, scored))
    return out / "report.html"


def _write_page(path: Path, body: str) -> None:
    with atomic_open(path, encoding="utf-8") as f:
        f.write(body)


def html_page(title: str, body: list[str]) -> str:
    """A page of `body` (HTML lines) in the reports' plain style; `title` is escaped here."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{PAGE_STYLE}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str) -> str:
    return _e(quote(path))


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def equivalent_diameter(volume_mm3: float | None) -> float | None:
    """The diameter (mm) of the sphere of that volume."""
    return None if volume_mm3 is None else float((6 * volume_mm3 / np.pi) ** (1 / 3))


def _summary_page(out: Path, results: list[dict], summary: dict, sources: dict[str, Path], scored: bool) -> str:
    made_by = summary["produced_by"]
    body = [f"<h1>Analysis {_e(out)}</h1>",
            f"<p>{summary['analysed']} of {summary['series']} CTs analysed ({summary['resumed']} reused from an "
            f"earlier run), {summary['detections']} detections, mode {_e(summary['mode'])}, {summary['processes']} "
            f"process(es), luna_dist {_e(made_by['luna_dist'])}, analysis version {made_by['analysis_version']}. "
            "Files: <a href=\"detections.csv\">detections.csv</a>, <a href=\"submission.csv\">submission.csv</a>, "
            "<a href=\"summary.json\">summary.json</a>.</p>",
            "<h2>Models</h2>", "<table><tr><th>model</th><th>path</th><th>sha256 of its weights</th></tr>"]
    for name, model in made_by["models"].items():
        body.append(f"<tr><td>{_e(name)}</td><td class=\"path\">{_e(model['path']) if model else 'none'}</td>"
                    f"<td><code>{_e(model['sha256']) if model else ''}</code></td></tr>")
    body.append("</table>")
    if scored:
        body += _scores(out, summary)
    if summary["failed"]:
        body.append("<h2>CTs that could not be analysed</h2><ul>"
                    + "".join(f"<li>{_e(f['path'])}: {_e(f['error'])}</li>" for f in summary["failed"]) + "</ul>")
    body += ["<h2>CTs</h2>",
             f"<p class=\"note\">Each CT's page shows its detections ranked by p_nodule, the {IMAGES_PER_CT} first "
             "with their slices" + (", and the annotated nodules no detection matches" if scored else "") + ".</p>",
             "<table><tr><th>series</th><th>CT</th><th>detections</th><th>p_nodule ≥ 0.5</th><th>highest p_nodule</th>"
             + ("<th>nodules</th><th>matched</th><th>missed</th>" if scored else "") + "</tr>"]
    for result in sorted(results, key=lambda r: r["series_uid"]):
        uid, detections = result["series_uid"], result["detections"]
        p = [d["p_nodule"] for d in detections]
        cells = [f"<a class=\"path\" href=\"{_href('ct/' + file_name(uid) + '.html')}\">{_e(uid)}</a>",
                 f"<span class=\"path\">{_e(sources.get(uid, ''))}</span>"]
        numbers = [len(detections), sum(v >= 0.5 for v in p), _number(max(p) if p else None)]
        if scored:
            missed = len(result.get("missed", []))
            numbers += [result.get("nodules", 0), result.get("nodules", 0) - missed, missed]
        body.append("<tr class=\"ct\">" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f"<td class=\"n\">{n}</td>" for n in numbers) + "</tr>")
    body.append("</table>")
    return html_page(f"Analysis {out}", body)


def _scores(out: Path, summary: dict) -> list[str]:
    froc = summary["froc"]
    cpm = _number(froc["cpm"])
    interval = f" (95 % interval {froc['cpm_ci'][0]:.3f}–{froc['cpm_ci'][1]:.3f})" if froc.get("cpm_ci") else ""
    body = ["<h2>Scores</h2>",
            f"<p>{summary['nodules_matched']} of {summary['nodules']} nodules matched by a detection (distance under "
            f"{MATCH_DISTANCE} of the nodule's diameter), {summary['nodules_predicted']} of them predicted nodules "
            "(p_nodule ≥ 0.5).</p>",
            "<table><tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in CONFUSION_COLUMNS) + "</tr>"]
    for name, cells in zip(CONFUSION_ROWS, confusion_cells(summary["confusion"]["table"])):
        body.append(f"<tr><th>{_e(name)}</th>" + "".join(f"<td class=\"n\">{c}</td>" for c in cells) + "</tr>")
    body.append("</table>")
    sensitivities = ", ".join(f"{rate:g}: {_number(s)}" for rate, s in zip(froc["fp_rates"], froc["sensitivities"]))
    body.append(f"<p>LUNA16 FROC over {froc['scans']} scans and {froc['nodules']} nodules: <b>CPM {cpm}</b>{interval}; "
                f"sensitivity at false positives per scan {sensitivities}.</p>")
    if (out / "froc.png").is_file():
        body.append("<img src=\"froc.png\" alt=\"FROC curve\" width=\"640\">")
    else:
        body.append("<p class=\"note\">No FROC curve: froc.png is drawn with matplotlib, which is not installed "
                    "(pip install 'luna_dist[plot]').</p>")
    return body


def _ct_page(result: dict, source: Path | None, scored: bool) -> str:
    uid, detections = result["series_uid"], result["detections"]
    ranked = sorted(detections, key=lambda d: -d["p_nodule"])
    shape = "×".join(map(str, result["shape"]))
    level, width = LUNG_WINDOW
    body = ["<p><a href=\"../report.html\">← the analysis</a></p>", f"<h1>{_e(uid)}</h1>",
            f"<p><span class=\"path\">{_e(source or '')}</span> — {shape} voxels (slices × rows × columns), "
            f"{len(detections)} detections, analysed in {sum(result['seconds'].values()):.1f} s.</p>",
            f"<p class=\"note\">Slices: axial, coronal, sagittal through the centre, {CROP_MM:g} mm wide, lung window "
            f"(level {level:g}, width {width:g} HU), the patient's right on the left, the ticks pointing at the "
            "centre; the outline is the group's (its voxels of the segmentation)"
            f"{', red: the annotated nodule' if scored else ''}. Coordinates in mm in the CT's patient space. "
            "Sizes are of the group: its longest axial diameter, the diameter of a sphere of its volume, its "
            "volume.</p>"]
    if len(ranked) > IMAGES_PER_CT:
        body.append(f"<p class=\"note\">Images for the {IMAGES_PER_CT} detections of highest p_nodule; the other "
                    f"{len(ranked) - IMAGES_PER_CT} are listed without.</p>")
    body.append("<table><tr><th>rank</th><th>slices: axial, coronal, sagittal</th><th>p_nodule</th>"
                "<th>p_malig&shy;nant</th><th title=\"longest axial diameter\">axial ⌀ mm</th>"
                "<th title=\"diameter of the sphere of the group's volume\">equiv. ⌀ mm</th><th>volume mm³</th>"
                "<th>x, y, z mm</th>" + ("<th>matches the nodule</th>" if scored else "") + "</tr>")
    for rank, d in enumerate(ranked, start=1):
        cells = [str(rank), _image(d.get("image"), f"detection {rank}"), _number(d["p_nodule"]),
                 _number(d["p_malignant"]), _number(d["diameter_mm"], 1),
                 _number(equivalent_diameter(d["volume_mm3"]), 1), _number(d["volume_mm3"], 1), _xyz(d["xyz"])]
        if scored:
            cells.append(_describe(d["nodule"]) if d.get("nodule") else "none")
        body.append("<tr class=\"detection\">" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body.append("</table>")
    if scored:
        missed = result.get("missed", [])
        body.append(f"<h2>Nodules no detection matches: {len(missed)}</h2>")
        if missed:
            body.append("<table><tr><th>slices</th><th>nodule</th></tr>")
            body += [f"<tr class=\"missed\"><td>{_image(m['image'], 'missed nodule')}</td><td>{_describe(m)}</td></tr>"
                     for m in missed]
            body.append("</table>")
    return html_page(uid, body)


def _image(path: str | None, alt: str) -> str:
    if path is None:
        return ""
    return f"<img class=\"slices\" src=\"{_href(posixpath.relpath(path, 'ct'))}\" alt=\"{_e(alt)}\">"


def _xyz(xyz: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in xyz)


def _describe(nodule: dict) -> str:
    malignancy = {True: ", malignant", False: ", benign", None: ""}[nodule["malignant"]]
    return f"{nodule['diameter_mm']:.1f} mm at {_xyz(nodule['xyz'])}{malignancy}"
