"""The report: images of a CT's detections and missed nodules, the pages, and the pages in a real browser.

The CT is built here (dense balls in air, tilted slices: `helpers.tilted_image`), grouped as the analysis
groups it, with probabilities set by hand: no model is needed for what a page shows. The browser test
runs headless Chromium (Debian's `chromium`; `.ci/run` installs it) and is skipped without it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from accelerate import PartialState
from helpers import tilted_image

from luna_dist.analysis import report
from luna_dist.analysis.detect import Analysed
from luna_dist.analysis.findings import Truth, marks_of, read_truth, score
from luna_dist.analysis.groups import group
from luna_dist.common.out_folder import file_name
from luna_dist.imaging.ct import Ct
from luna_dist.imaging.geometry import Geometry, irc_to_xyz

UID = "1.2.3<&>"  # what a page shows of it is escaped, what it links to is quoted
NAME = file_name(UID)  # its files' name: "1.2.3___~" and a hash
BALLS = [((8, 20, 20), 4.5, 0.9), ((10, 50, 24), 3.5, 0.2), ((12, 30, 56), 2.5, 0.6)]  # centre IRC, radius, p_nodule
SOURCE = Path("/scans/own <series>")


def _analysed() -> Analysed:
    """Three balls of 100 HU in air, grouped as the analysis groups them, p_nodule as BALLS says."""
    hu = np.full((20, 80, 80), -900, dtype=np.int16)
    i, r, c = np.ogrid[:20, :80, :80]
    for (ci, cr, cc), radius, _ in BALLS:
        hu[(i - ci) ** 2 + (r - cr) ** 2 + (c - cc) ** 2 <= radius**2] = 100
    geometry = Geometry.of_image(tilted_image(hu))
    groups = group(hu > -250, hu, geometry.spacing_xyz[::-1])
    order = [int(np.argmin(np.linalg.norm(groups.centres - np.array(centre), axis=1))) for centre, _, _ in BALLS]
    p_nodule = np.zeros(len(order))
    p_nodule[order] = [p for _, _, p in BALLS]
    detections = [{"xyz": xyz.tolist(), "irc": irc.tolist(), "voxels": int(n), "diameter_mm": float(d),
                   "volume_mm3": float(n * np.prod(geometry.spacing_xyz)), "p_nodule": float(p), "p_malignant": None}
                  for xyz, irc, n, d, p in zip(irc_to_xyz(groups.centres, geometry), groups.centres, groups.voxels,
                                               groups.axial_diameter_mm, p_nodule)]
    result = {"series_uid": UID, "voxels": hu.size, "shape": list(hu.shape), "seconds": {"read": 0.1},
              "detections": detections}
    return Analysed(result, Ct(UID, hu, geometry), groups.labels)


ANNOTATIONS = "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool"


def _write_truth(analysed: Analysed, data: Path) -> Truth:
    """The most probable ball annotated (its detection matches it), and a nodule where nothing was found
    (missed), as the data folder's tables."""
    first = max(analysed.result["detections"], key=lambda d: d["p_nodule"])["xyz"]
    elsewhere = irc_to_xyz(np.array([5.0, 65.0, 65.0]), analysed.ct.geometry).tolist()
    rows = [(UID, *first, 6.0, True), (UID, *elsewhere, 5.0, False)]
    data.mkdir(parents=True, exist_ok=True)
    for name, columns in (("annotations.csv", 5), ("annotations_with_malignancy.csv", 6)):
        lines = [",".join(ANNOTATIONS.split(",")[:columns])] + [",".join(map(str, row[:columns])) for row in rows]
        (data / name).write_text("\n".join(lines) + "\n")
    return read_truth(data)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder as an analysis writes it, for one CT: its images (2 per CT at most, so one detection
    is listed without), its pages and the scores."""
    out = tmp_path_factory.mktemp("report") / "results"
    PartialState()  # the scoring logs as the analysis does, through accelerate
    analysed = _analysed()
    truth = _write_truth(analysed, out.parent / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "IMAGES_PER_CT", 2)
        report.draw_ct(analysed, [n for n in truth.nodules if n.series_uid == UID], out)
        detections = [{**d, "series_uid": UID} for d in analysed.result["detections"]]
        summary = {"series": 1, "analysed": 1, "resumed": 0, "redone": 0, "failed": [], "processes": 1,
                   "detections": len(detections), "mode": "segmentation",
                   "produced_by": {"luna_dist": "test", "analysis_version": 0,
                                   "models": {"seg": {"path": "seg.pt", "sha256": "ab" * 32}, "nodule": None}},
                   **score([UID], detections, marks_of(detections), truth, out)}
        report.write_report(out, [analysed.result], summary, {UID: SOURCE})
    (out / "ct" / f"{NAME}.json").write_text(json.dumps(analysed.result))
    return out


def _page(out: Path) -> str:
    return (out / "ct" / f"{NAME}.html").read_text(encoding="utf-8")


def _image_sources(page: Path) -> list[Path]:
    """Where each <img> of a page points, as files."""
    return [page.parent / unquote(src) for src in re.findall(r'<img[^>]* src="([^"]+)"', page.read_text("utf-8"))]


# -- images ------------------------------------------------------------------------------------------------
def test_png_bytes_is_the_image_as_a_png_file(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(report.png_bytes(rgb))
    np.testing.assert_array_equal((image.imread(tmp_path / "x.png") * 255).round().astype(np.uint8), rgb)


def test_slices_show_the_ct_through_the_centre_in_the_lung_window_with_the_groups_outline():
    analysed = _analysed()
    detection = max(analysed.result["detections"], key=lambda d: d["voxels"])  # the largest ball
    rgb = report.slices(analysed, np.array(detection["xyz"]), analysed.result["detections"].index(detection) + 1,
                        None)
    size = round(report.CROP_MM / report.PIXEL_MM)
    assert rgb.shape == (size, 3 * size + 8, 3) and rgb.dtype == np.uint8
    level, width = report.LUNG_WINDOW
    grey = np.clip(np.array([100, -1000, -900]) - (level - width / 2), 0, width) / width * 255
    extents = []
    for panel in range(3):
        part = rgb[:, panel * (size + 4):panel * (size + 4) + size]
        assert np.abs(part[size // 2, size // 2].astype(float) - grey[0]).max() <= 1  # the ball at the centre
        assert grey[1] - 1 <= part[size // 4, 3].min() <= part[size // 4, 3].max() <= grey[2] + 1  # air, or off the CT
        outline = np.all(part == report.OUTLINE_RGB["group"], axis=2)
        tick = size // 20  # the ticks on the borders point at the centre in the same colour
        rows = tick + np.flatnonzero(outline[tick:-tick, size // 2 - 3:size // 2 + 4].any(axis=1))
        assert rows.min() < size // 2 < rows.max(), panel  # the outline runs round the centre
        extents.append((rows.max() - rows.min()) * report.PIXEL_MM)
    assert 4 < extents[0] < 8  # axially, a ball's diameter: 7 rows of 0.8 mm after the erosion


def test_draw_ct_images_the_most_probable_detections_and_the_missed_nodule(results):
    result = json.loads((results / "ct" / f"{NAME}.json").read_text())
    ranked = sorted(result["detections"], key=lambda d: -d["p_nodule"])
    assert [d["image"] for d in ranked] == [f"ct/{NAME}/detection-001.png", f"ct/{NAME}/detection-002.png", None]
    assert ranked[0]["nodule"] == {"xyz": [round(v, 3) for v in ranked[0]["xyz"]], "diameter_mm": 6.0,
                                   "malignant": True}
    assert ranked[1]["nodule"] is None and ranked[2]["nodule"] is None
    assert [(m["diameter_mm"], m["malignant"], m["image"]) for m in result["missed"]] == \
        [(5.0, False, f"ct/{NAME}/missed-002.png")]
    assert result["nodules"] == 2
    assert sorted(p.name for p in (results / "ct" / NAME).iterdir()) == ["detection-001.png", "detection-002.png",
                                                                         "missed-002.png"]


# -- pages -------------------------------------------------------------------------------------------------
def test_the_ct_page_lists_every_detection_ranked_with_sizes_and_matches(results):
    page = _page(results)
    rows = re.findall(r'<tr class="detection">(.*?)</tr>', page)
    assert len(rows) == 3 and len(re.findall(r'<tr class="missed">', page)) == 1
    assert html.escape(UID) in page and UID not in page and html.escape(str(SOURCE)) in page
    result = json.loads((results / "ct" / f"{NAME}.json").read_text())
    first = max(result["detections"], key=lambda d: d["p_nodule"])
    cells = re.findall(r"<td>(.*?)</td>", rows[0])
    assert cells[2:7] == [f"{first['p_nodule']:.3f}", "–", f"{first['diameter_mm']:.1f}",
                          f"{report.equivalent_diameter(first['volume_mm3']):.1f}", f"{first['volume_mm3']:.1f}"]
    assert cells[8].startswith("6.0 mm at ") and cells[8].endswith(", malignant")
    assert "the other 1 are listed without" in page


def test_every_image_of_the_pages_is_there(results):
    for page in (results / "report.html", results / "ct" / f"{NAME}.html"):
        sources = _image_sources(page)
        assert sources and all(src.is_file() and src.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for src in sources)
    assert _image_sources(results / "report.html") == [results / "froc.png"]


def test_the_summary_page_shows_the_models_scores_and_links_each_ct(results):
    page = (results / "report.html").read_text(encoding="utf-8")
    assert "ab" * 32 in page and "seg.pt" in page and "CPM " in page
    links = re.findall(r'<tr class="ct"><td><a class="path" href="([^"]+)">', page)
    assert [results / unquote(link) for link in links] == [results / "ct" / f"{NAME}.html"]
    cells = re.findall(r'<td class="n">(\d+)</td>', page.split('<tr class="ct">')[1])
    assert cells == ["3", "2", "2", "1", "1"]  # detections, p_nodule >= 0.5, nodules, matched, missed
    assert "<script" not in page and "http" not in page


def test_a_page_without_annotations_has_no_match_columns(tmp_path):
    analysed = _analysed()
    report.draw_ct(analysed, None, tmp_path)
    assert "nodule" not in analysed.result["detections"][0] and "missed" not in analysed.result
    page = report._ct_page(analysed.result, None, scored=False)
    assert "matches the nodule" not in page and len(re.findall(r'<tr class="detection">', page)) == 3


# -- in a real browser ---------------------------------------------------------------------------------
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", "--allow-file-access-from-files", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium; .ci/run does)")
def test_the_pages_load_in_chromium_without_console_errors_and_show_every_detection(results, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    for page, rows in ((results / "report.html", ('<tr class="ct">', 1)),
                       (results / "ct" / f"{NAME}.html", ('<tr class="detection">', 3))):
        loaded = _chromium("--dump-dom", page.as_uri())
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        assert not [line for line in loaded.stderr.splitlines() if ":CONSOLE" in line], loaded.stderr
        assert loaded.stdout.count(rows[0]) == rows[1]
    shot = tmp_path / "ct.png"
    taken = _chromium(f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars",
                      (results / "ct" / f"{NAME}.html").as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 0.05  # text, tables and slices, not a blank page
    outline = np.abs(pixels - np.array(report.OUTLINE_RGB["group"]) / 255).max(axis=2) < 0.05
    assert outline.sum() > 100  # the slices are shown, outlined
