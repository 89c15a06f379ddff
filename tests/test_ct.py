"""Reading a CT and cutting chunks: exact crops, honest padding, and errors that name the file."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import BAD_CTS, sheared_nifti, tilted_image, write_dicom_series

from luna_dist.imaging.chunks import CHUNK_SHAPE, chunk_bounds, cut_chunks
from luna_dist.imaging.ct import HU_MAX, HU_MIN, CtError, find_ct, read_ct
from luna_dist.imaging.geometry import Geometry, irc_to_xyz, xyz_to_irc
from luna_dist.imaging.read_ahead import read_ahead

HALF = np.array(CHUNK_SHAPE) // 2  # (16, 24, 24)


def first_mhd(data: Path) -> Path:
    return sorted(data.glob("subset*/*.mhd"))[0]


@pytest.fixture
def ct_copy(synth_data, tmp_path) -> Path:
    """A private copy of one synthetic CT (.mhd + .raw) that a test may damage."""
    mhd = first_mhd(synth_data)
    shutil.copy2(mhd, tmp_path / mhd.name)
    shutil.copy2(mhd.with_suffix(".raw"), tmp_path / mhd.with_suffix(".raw").name)
    return tmp_path / mhd.name


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """A (40, 60, 70) int16 volume with values outside [-1000, 1000] and a unique value per voxel region."""
    rng = np.random.default_rng(0)
    return rng.integers(-1400, 3000, (40, 60, 70)).astype(np.int16)


def direct_crop(hu: np.ndarray, center) -> np.ndarray:
    i, r, c = center
    return np.clip(hu[i - 16 : i + 16, r - 24 : r + 24, c - 24 : c + 24], -1000, 1000)


def test_read_ct_matches_simpleitk(synth_data):
    mhd = first_mhd(synth_data)
    ct = read_ct(mhd)
    reference = sitk.ReadImage(str(mhd))
    expected = sitk.GetArrayFromImage(reference)
    assert ct.series_uid == mhd.stem
    assert ct.hu.dtype == np.int16
    assert ct.hu.shape == expected.shape == reference.GetSize()[::-1]
    np.testing.assert_array_equal(ct.hu, expected)
    np.testing.assert_array_equal(ct.geometry.origin_xyz, reference.GetOrigin())
    np.testing.assert_array_equal(ct.geometry.spacing_xyz, reference.GetSpacing())
    assert isinstance(ct.geometry, Geometry)


def test_read_ct_accepts_str_path(synth_data):
    mhd = first_mhd(synth_data)
    ct = read_ct(str(mhd))
    np.testing.assert_array_equal(ct.hu, sitk.GetArrayFromImage(sitk.ReadImage(str(mhd))))


DANGLING_VIEW_SCRIPT = '''
import gc, sys
import numpy as np, SimpleITK as sitk
from luna_dist.imaging.ct import read_ct
path = sys.argv[1]
expected = sitk.GetArrayFromImage(sitk.ReadImage(path))
hu = read_ct(path).hu          # the Ct (and its sitk.Image) is dropped at once
gc.collect()
size = sitk.ReadImage(path).GetSize()
others = [sitk.Image(size, sitk.sitkInt16) + 7 for _ in range(3)]  # same-size allocations
sys.exit(0 if np.array_equal(hu, expected) else 3)
'''


def test_hu_stays_valid_after_the_ct_object_is_dropped(synth_data):
    """`hu = read_ct(path).hu` must keep its voxels; run in a subprocess as a dangling view may crash."""
    result = subprocess.run([sys.executable, "-c", DANGLING_VIEW_SCRIPT, str(first_mhd(synth_data))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"voxels changed after the Ct was dropped (rc {result.returncode}) {result.stderr}"


def test_chunk_bounds_start_at_center_minus_half_width():
    np.testing.assert_array_equal(chunk_bounds(np.array([20, 30, 40])), [4, 6, 16])
    np.testing.assert_array_equal(chunk_bounds(np.array([[0, 0, 0], [5, 5, 5]]), (4, 6, 8)), [[-2, -3, -4], [3, 2, 1]])


def test_inside_centres_equal_a_direct_clipped_crop(volume):
    rng = np.random.default_rng(1)
    lo, hi = HALF, np.array(volume.shape) - HALF  # chunk fits exactly: [c - half, c + half) inside
    centres = rng.integers(lo, hi + 1, (50, 3))
    centres = np.vstack([centres, lo, hi])  # both extreme inside positions
    chunks, outside = cut_chunks(volume, centres)
    assert chunks.shape == (52, *CHUNK_SHAPE)
    assert chunks.dtype == np.int16
    assert not outside.any()
    for chunk, centre in zip(chunks, centres):
        np.testing.assert_array_equal(chunk, direct_crop(volume, centre))
    assert chunks.min() >= HU_MIN and chunks.max() <= HU_MAX
    assert (chunks == HU_MIN).any() and (chunks == HU_MAX).any()  # the clip really happened


def test_cut_chunks_does_not_modify_the_volume(volume):
    before = volume.copy()
    cut_chunks(volume, np.array([[20, 30, 35], [0, 0, 0]]))
    np.testing.assert_array_equal(volume, before)


def border_centres(shape) -> list[tuple[int, int, int]]:
    """Centres one voxel over each border, exactly at it, and beyond it, on every face."""
    mid = [s // 2 for s in shape]
    centres = []
    for axis in range(3):
        for value in (HALF[axis] - 1, 0, -3, shape[axis] - HALF[axis] + 1, shape[axis] - 1, shape[axis] + 2):
            centre = list(mid)
            centre[axis] = value
            centres.append(tuple(centre))
    centres.append((0, 0, 0))
    centres.append(tuple(s - 1 for s in shape))
    return centres


@pytest.mark.parametrize("centre_index", range(20))
def test_border_centres_are_padded_not_shifted(volume, centre_index):
    centre = np.array(border_centres(volume.shape)[centre_index])
    chunks, outside = cut_chunks(volume, centre[None])
    chunk = chunks[0]
    assert outside.tolist() == [True]
    start = centre - HALF
    shape = np.array(volume.shape)
    # Where each chunk voxel comes from in the volume, and whether it exists.
    grids = np.meshgrid(*[start[a] + np.arange(CHUNK_SHAPE[a]) for a in range(3)], indexing="ij")
    inside = np.all([(g >= 0) & (g < shape[a]) for a, g in enumerate(grids)], axis=0)
    assert inside.any() and not inside.all()
    assert (chunk[~inside] == HU_MIN).all()
    source = np.clip(volume[tuple(g[inside] for g in grids)], HU_MIN, HU_MAX)
    np.testing.assert_array_equal(chunk[inside], source)


def test_centre_right_at_the_inside_limit_is_not_flagged(volume):
    shape = np.array(volume.shape)
    _, outside = cut_chunks(volume, np.array([HALF, shape - HALF, HALF - [1, 0, 0], shape - HALF + [0, 0, 1]]))
    assert outside.tolist() == [False, False, True, True]


@pytest.mark.parametrize("centre", [(-100, 30, 35), (20, 500, 35), (20, 30, -25), (1000, 1000, 1000), (-16, -24, -24)])
def test_entirely_outside_is_all_air_and_flagged(volume, centre):
    chunks, outside = cut_chunks(volume, np.array([centre]))
    assert outside.tolist() == [True]
    assert (chunks == HU_MIN).all()


def test_mixed_batch_keeps_order_and_flags(volume):
    centres = np.array([[20, 30, 35], [-100, 0, 0], [0, 30, 35], [20, 30, 35]])
    chunks, outside = cut_chunks(volume, centres)
    assert outside.tolist() == [False, True, True, False]
    np.testing.assert_array_equal(chunks[0], direct_crop(volume, (20, 30, 35)))
    np.testing.assert_array_equal(chunks[3], chunks[0])
    assert (chunks[1] == HU_MIN).all()
    np.testing.assert_array_equal(chunks[2][16:], direct_crop(volume, (16, 30, 35))[:16])


def test_other_chunk_shapes(volume):
    chunks, outside = cut_chunks(volume, np.array([[10, 10, 10]]), shape=(4, 6, 8))
    assert chunks.shape == (1, 4, 6, 8)
    np.testing.assert_array_equal(chunks[0], np.clip(volume[8:12, 7:13, 6:14], HU_MIN, HU_MAX))
    assert not outside[0]


def test_real_ct_chunk_equals_direct_crop(synth_data):
    ct = read_ct(first_mhd(synth_data))
    centre = np.array(ct.hu.shape) // 2
    chunks, outside = cut_chunks(ct.hu, centre[None])
    assert not outside[0]
    np.testing.assert_array_equal(chunks[0], direct_crop(sitk.GetArrayFromImage(sitk.ReadImage(str(first_mhd(synth_data)))), centre))


# --- errors -------------------------------------------------------------------------------------------
def test_missing_mhd(tmp_path):
    missing = tmp_path / "1.2.3.mhd"
    with pytest.raises(CtError) as err:
        read_ct(missing)
    message = str(err.value)
    assert str(missing) in message
    assert "not found" in message


def test_missing_raw(ct_copy):
    raw = ct_copy.with_suffix(".raw")
    raw.unlink()
    with pytest.raises(CtError) as err:
        read_ct(ct_copy)
    message = str(err.value)
    assert ct_copy.name in message
    assert raw.name in message
    assert "missing" in message


@pytest.mark.parametrize("keep", [0, 1, 0.5, 0.999])
def test_truncated_raw(ct_copy, keep):
    raw = ct_copy.with_suffix(".raw")
    size = raw.stat().st_size
    new_size = int(size * keep) if keep < 1 else size - 1
    with open(raw, "r+b") as f:
        f.truncate(new_size)
    with pytest.raises(CtError) as err:
        read_ct(ct_copy)
    message = str(err.value)
    assert raw.name in message
    assert "truncated" in message
    assert str(new_size) in message and str(size) in message


def test_raw_longer_than_needed_still_reads(ct_copy):
    """Extra trailing bytes do not hide the image (ITK reads the first DimSize voxels)."""
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_copy)))
    with open(ct_copy.with_suffix(".raw"), "ab") as f:
        f.write(b"\0" * 10)
    ct = read_ct(ct_copy)
    np.testing.assert_array_equal(ct.hu, expected)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("this is not a header at all\n\x00\x01garbage", "not a MetaImage header"),
        ("", "not a MetaImage header"),
        ("NDims = 3\nDimSize = 160 160\n", "missing ElementType, ElementDataFile"),
    ],
    ids=["garbage", "empty", "incomplete"],
)
def test_garbage_mhd(ct_copy, content, problem):
    ct_copy.write_text(content)
    with pytest.raises(CtError) as err:
        read_ct(ct_copy)
    message = str(err.value)
    assert ct_copy.name in message
    assert problem in message


def test_mhd_with_bad_dimsize(ct_copy):
    header = ct_copy.read_text()
    lines = [("DimSize = 160 abc 80" if line.startswith("DimSize") else line) for line in header.splitlines()]
    ct_copy.write_text("\n".join(lines) + "\n")
    with pytest.raises(CtError) as err:
        read_ct(ct_copy)
    assert ct_copy.name in str(err.value)
    assert "DimSize" in str(err.value)


@pytest.mark.parametrize("field, values, count", [
    ("DimSize", "160 160", 2),
    ("DimSize", "160 160 98 1", 4),
    ("ElementSpacing", "0.7 0.7", 2),
    ("Offset", "1 2 3 4", 4),
    ("TransformMatrix", "1 0 0 1", 4),
])
def test_mhd_disagreeing_with_its_ndims(ct_copy, field, values, count):
    """NDims = 3 but another number of values: said so, rather than ITK's "No such file or directory"."""
    lines = [(f"{field} = {values}" if line.startswith(field + " ") else line) for line in ct_copy.read_text().splitlines()]
    ct_copy.write_text("\n".join(lines) + "\n")
    with pytest.raises(CtError) as err:
        read_ct(ct_copy)
    expected = 9 if field == "TransformMatrix" else 3
    assert str(err.value) == (f"{ct_copy}: inconsistent header: NDims = 3 but {field} has {count} value(s) ({values}), "
                              f"expected {expected}")


def test_mhd_pointing_to_an_unreadable_payload(ct_copy):
    """A header ITK rejects (unknown element type) still gives a CtError naming the file."""
    header = ct_copy.read_text().replace("MET_SHORT", "MET_NOT_A_TYPE")
    ct_copy.write_text(header)
    with pytest.raises(CtError) as err:
        read_ct(ct_copy)
    assert ct_copy.name in str(err.value)


def test_ct_error_is_an_exception_not_a_crash(tmp_path):
    assert issubclass(CtError, Exception)
    with pytest.raises(CtError):
        read_ct(tmp_path)  # a folder is not a CT


def _write_ct(path: Path, voxels: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetOrigin((-150.0, -160.0, -300.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_values_beyond_int16_are_clipped_not_wrapped(tmp_path, dtype):
    """A float CT with 40000 (metal) must stay dense: wrapped to int16 it read as -25536, stored as air."""
    voxels = np.full((4, 5, 6), -1000, dtype=dtype)
    voxels[1, 2, 3], voxels[2, 2, 2], voxels[3, 0, 0] = 40000, -5000, 500
    if np.issubdtype(dtype, np.floating):
        voxels[0, 0, 1], voxels[0, 0, 2] = 499.6, -0.4
    ct = read_ct(_write_ct(tmp_path / "ct.mhd", voxels))
    assert ct.hu.dtype == np.int16
    assert (ct.hu[1, 2, 3], ct.hu[2, 2, 2], ct.hu[3, 0, 0]) == (32767, -5000, 500)
    if np.issubdtype(dtype, np.floating):
        assert (ct.hu[0, 0, 1], ct.hu[0, 0, 2]) == (500, 0)
    chunks, _ = cut_chunks(ct.hu, np.array([[1, 2, 3]]))
    assert chunks[0, 16, 24, 24] == HU_MAX  # bone, not air


@pytest.mark.parametrize("dtype, words", [(np.uint8, "8-bit unsigned integer"), (np.int8, "8-bit signed integer"),
                                          (np.uint16, "16-bit unsigned integer")])
def test_voxel_types_that_cannot_hold_hu_are_refused(tmp_path, dtype, words):
    path = _write_ct(tmp_path / "ct.mhd", np.zeros((4, 5, 6), dtype=dtype))
    with pytest.raises(CtError) as err:
        read_ct(path)
    assert str(err.value).startswith(f"{path}: voxels are {words}, which cannot hold Hounsfield units")


# --- CTs of other formats: a DICOM series, NIfTI --------------------------------------------------------
@pytest.mark.parametrize("kind", ["dicom", "nifti", "mha"])
def test_other_formats_read_as_the_mhd_they_came_from(tmp_path, kind):
    hu = np.random.default_rng(0).integers(-1000, 1000, (6, 20, 24)).astype(np.int16)
    image = tilted_image(hu)
    sitk.WriteImage(image, str(tmp_path / "1.2.3.mhd"))
    if kind == "dicom":
        path = write_dicom_series(image, tmp_path / "series", "1.2.3")
    else:
        path = tmp_path / ("1.2.3.nii.gz" if kind == "nifti" else "1.2.3.mha")
        sitk.WriteImage(image, str(path))
    expected, ct = read_ct(tmp_path / "1.2.3.mhd"), read_ct(path)
    assert ct.series_uid == expected.series_uid == "1.2.3"
    assert ct.hu.dtype == np.int16
    np.testing.assert_array_equal(ct.hu, expected.hu)  # DICOM: stored unsigned, rescaled by its intercept
    for field in ("origin_xyz", "spacing_xyz", "direction"):  # DICOM's decimals, NIfTI's float32
        np.testing.assert_allclose(getattr(ct.geometry, field), getattr(expected.geometry, field), atol=1e-5)
    assert find_ct(path).size_irc == hu.shape


@pytest.mark.parametrize("make, said", [row[1:] for row in BAD_CTS], ids=[row[0] for row in BAD_CTS])
def test_bad_ct_sources_are_named_with_their_problem(tmp_path, make, said):
    path = make(tilted_image(np.zeros((6, 20, 24), dtype=np.int16)), tmp_path)
    with pytest.raises(CtError) as err:
        find_ct(path)
    assert str(err.value).startswith(str(tmp_path)) and said in str(err.value) and "\n" not in str(err.value)


def _resident_share(path: Path) -> float:
    """The share of the file's pages in the page cache (mincore)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        view = np.frombuffer(mapped, dtype=np.uint8)
        address = view.ctypes.data
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            pytest.skip(f"mincore failed (errno {ctypes.get_errno()})")
        del view
        return sum(v & 1 for v in vector) / pages


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
def test_read_ahead_brings_a_ct_from_disk_into_the_page_cache(ct_copy):
    raw = ct_copy.with_suffix(".raw")
    os.sync()
    fd = os.open(raw, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_share(raw) > 0.5:
        pytest.skip("this file system keeps its files in memory (tmpfs?): nothing to read ahead")
    read_ahead(ct_copy)
    deadline = time.monotonic() + 10
    while (share := _resident_share(raw)) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert share == 1  # the whole data file, not the first step of it only


def test_read_ahead_leaves_what_it_cannot_read_to_read_ct(tmp_path):
    (tmp_path / "broken.mhd").write_text("ElementDataFile = missing.raw\n")
    read_ahead(tmp_path / "broken.mhd")
    read_ahead(tmp_path / "absent.mhd")


def test_a_truncated_nifti_says_how_much_it_holds(tmp_path):
    """A cut .nii.gz read its missing slices as 0 HU; its decompressed bytes are counted instead."""
    hu = np.random.default_rng(0).integers(-1000, 1000, (20, 30, 40)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CtError, match=r"ct.nii.gz: truncated, \d+ bytes once decompressed where the header needs "
                                      f"{hu.nbytes + 352}$") as err:
        read_ct(path)
    held = int(str(err.value).split("truncated, ")[1].split()[0])
    assert 0.3 * hu.nbytes < held < 0.7 * hu.nbytes  # the bytes half the file holds, not 0


def test_a_nifti_of_two_gzip_members_reads_whole(tmp_path):
    """Its gzip trailer records the last member's size only: the stream is counted, and found whole."""
    hu = np.random.default_rng(0).integers(-1000, 1000, (20, 30, 40)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / "ct.nii"))
    data = (tmp_path / "ct.nii").read_bytes()
    (tmp_path / "ct.nii.gz").write_bytes(gzip.compress(data[:5000]) + gzip.compress(data[5000:]))
    np.testing.assert_array_equal(read_ct(tmp_path / "ct.nii.gz").hu, hu)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
@pytest.mark.parametrize("bad", ["all NaN", "one NaN", "one infinite"])
def test_voxels_that_are_no_number_are_refused(tmp_path, bad, suffix):
    """An all-NaN CT read as 0 HU everywhere and was analysed, a partly NaN one was patched silently (ITK's
    NIfTI reader sets them to 0; others keep them, and the cast to int16 made something of them)."""
    voxels = np.full((6, 20, 24), -800.0, dtype=np.float32)
    if bad == "all NaN":
        voxels[:] = np.nan
    else:
        voxels[3, 4, 5] = np.nan if bad == "one NaN" else -np.inf
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    said = "all 2,880 voxels are not a number" if bad == "all NaN" else "1 of the 2,880 voxels are not a number"
    with pytest.raises(CtError, match=f"^{path}: {said} \\(NaN or infinite\\)"):
        read_ct(path)


def test_a_float64_ct_whose_sum_overflows_is_read(tmp_path):
    """The NaN check's float64 sum overflows to infinity here; the voxels are then counted, and all are numbers."""
    voxels = np.full((2, 3, 4), 1e308)
    voxels[0] = -1000.0
    ct = read_ct(_write_ct(tmp_path / "ct.mhd", voxels))
    assert (ct.hu[0] == -1000).all() and (ct.hu[1] == 32767).all()


def test_a_dangling_link_in_a_dicom_folder_is_skipped_and_named(tmp_path):
    """GDCM's listing stopped at a dangling link: 20 of 38 slices were read, or the series refused as gapped."""
    hu = np.random.default_rng(0).integers(-1000, 1000, (38, 20, 24)).astype(np.int16)
    folder = write_dicom_series(tilted_image(hu), tmp_path / "series", "1.2.3")
    os.symlink(tmp_path / "gone.dcm", folder / "slice0017b.dcm")
    source = find_ct(folder)
    assert len(source.files) == 38
    assert source.skipped == (f"{folder / 'slice0017b.dcm'}: a symbolic link to {tmp_path / 'gone.dcm'}, which does "
                              "not exist",)
    np.testing.assert_array_equal(read_ct(folder).hu, read_ct(_write_ct_image(tmp_path / "1.2.3.mhd", hu)).hu)
    (folder / "slice0020.dcm").unlink()  # the rest of the series is still checked
    with pytest.raises(CtError, match="1 slice\\(s\\) missing: 5 mm between slice0019.dcm and slice0021.dcm"):
        find_ct(folder)


def _write_ct_image(path: Path, hu: np.ndarray) -> Path:
    sitk.WriteImage(tilted_image(hu), str(path))
    return path


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_a_device_is_not_a_file_not_found(path):
    with pytest.raises(CtError, match=f"^{path}: not a regular file \\(a character device\\)"):
        read_ct(Path(path))


def test_a_dangling_link_given_as_the_ct_is_named_as_one(tmp_path):
    os.symlink(tmp_path / "gone.nii.gz", tmp_path / "ct.nii.gz")
    with pytest.raises(CtError, match=f"ct.nii.gz: a symbolic link to {tmp_path / 'gone.nii.gz'}, which does not"):
        read_ct(tmp_path / "ct.nii.gz")


@pytest.mark.parametrize("layout", ["4-D", "vector"])
def test_the_advice_for_a_4d_nifti_gives_a_ct(tmp_path, layout, monkeypatch):
    """A 4-D NIfTI was refused as "vector voxels" with advice to convert it to HU; the advice given now, run as
    written, gives a CT of volume K."""
    hu = np.random.default_rng(0).integers(-1000, 1000, (3, 6, 20, 24)).astype(np.int16)
    volumes = [sitk.GetImageFromArray(v) for v in hu]
    image = sitk.JoinSeries(volumes) if layout == "4-D" else sitk.Compose(volumes)
    sitk.WriteImage(image, str(tmp_path / "four.nii.gz"))
    with pytest.raises(CtError) as err:
        read_ct(tmp_path / "four.nii.gz")
    assert "a 4-D image, 3 volumes of 24x20x6 voxels" in str(err.value) and "vector" not in str(err.value)
    monkeypatch.chdir(tmp_path)
    exec(str(err.value).split("e.g. written by ")[1].replace("K", "1"), {"sitk": sitk})
    np.testing.assert_array_equal(read_ct(tmp_path / "volume.nii.gz").hu, hu[1])


def test_a_colour_image_is_not_taken_for_a_4d_one(tmp_path):
    plane = sitk.GetImageFromArray(np.zeros((6, 20, 24), dtype=np.int16))
    sitk.WriteImage(sitk.Compose([plane] * 3), str(tmp_path / "rgb.mha"))
    with pytest.raises(CtError, match="rgb.mha: 3 values a voxel \\(a colour or vector image\\), where a CT has one"):
        find_ct(tmp_path / "rgb.mha")


def test_the_subfolder_named_for_a_patient_folder_is_a_ct(tmp_path):
    hu = np.zeros((6, 20, 24), dtype=np.int16)
    write_dicom_series(tilted_image(hu), tmp_path / "patient" / "study" / "series", "1.2.3")
    with pytest.raises(CtError, match="its subfolder\\(s\\) study/series hold DICOM files") as err:
        find_ct(tmp_path / "patient")
    named = str(err.value).split("subfolder(s) ")[1].split(" hold")[0]
    assert find_ct(tmp_path / "patient" / named).size_irc == hu.shape


def test_itk_prints_no_warnings_of_its_own(tmp_path, capfd):
    """ITK's raw `WARNING: In .../itkGDCMSeriesFileNames.cxx` lines came before the CT's one line."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images\n")
    sheared = sheared_nifti(np.zeros((40, 20, 24), dtype=np.int16), tmp_path / "sheared.nii")
    for path in (tmp_path / "empty", sheared):
        with pytest.raises(CtError):
            read_ct(path)
    assert "WARNING" not in capfd.readouterr().err
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # ITK's own setting is left as it was


def test_the_declared_size_is_checked_before_reading(tmp_path):
    path = _write_ct(tmp_path / "ct.nii.gz", np.zeros((6, 20, 24), dtype=np.int16))
    with pytest.raises(CtError, match="ct.nii.gz: its header declares 24x20x6 = 2,880 voxels, more than "
                                      "--max-ct-voxels 2,879 "):
        read_ct(path, 2879)
    assert read_ct(path, 2880).hu.shape == (6, 20, 24)


# --- every CT is turned to LUNA16's axes (LPS) ----------------------------------------------------------
def _canonical(tmp_path: Path) -> Path:
    """A CT stored as LUNA16 stores its CTs (identity direction), at an odd origin and spacing."""
    hu = np.random.default_rng(0).integers(-1000, 1000, (6, 20, 24)).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-20.125, 30.5, -100.25))
    sitk.WriteImage(image, str(tmp_path / "1.2.3.mhd"))
    return tmp_path / "1.2.3.mhd"


def _bottom_up_nifti(canonical: sitk.Image, tmp_path: Path) -> Path:
    """The slices stored foot first, by hand: the last slice first, the slice axis pointing to the feet."""
    hu = sitk.GetArrayFromImage(canonical)[::-1]
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(canonical.GetSpacing())
    image.SetOrigin(canonical.TransformIndexToPhysicalPoint((0, 0, canonical.GetDepth() - 1)))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    sitk.WriteImage(image, str(tmp_path / "1.2.3.nii.gz"))
    return tmp_path / "1.2.3.nii.gz"


def _stored_as(axes: str, suffix: str):
    def make(canonical: sitk.Image, tmp_path: Path) -> Path:
        stored = sitk.DICOMOrient(canonical, axes)
        if suffix == "dicom":
            return write_dicom_series(stored, tmp_path / "series", "1.2.3")
        sitk.WriteImage(stored, str(tmp_path / f"1.2.3{suffix}"))
        return tmp_path / f"1.2.3{suffix}"
    return make


STORED = [("bottom-up NIfTI", _bottom_up_nifti, "LPI"), ("RAS NIfTI", _stored_as("RAS", ".nii.gz"), "RAS"),
          ("coronal DICOM series", _stored_as("LIP", "dicom"), "LIP"),
          ("sagittal DICOM series", _stored_as("PIR", "dicom"), "PIR"),
          ("permuted .mha", _stored_as("SLA", ".mha"), "SLA")]


@pytest.mark.parametrize("make, axes", [row[1:] for row in STORED], ids=[row[0] for row in STORED])
def test_a_ct_stored_in_other_axes_reads_as_the_lps_one(tmp_path, make, axes):
    """A NIfTI stored bottom-up, a coronal series, ... reached the models mirrored or permuted, their positions
    right: read, they are the LPS CT, voxel for voxel, with its geometry, and every chunk is its chunk."""
    canonical = _canonical(tmp_path)
    expected = read_ct(canonical)
    path = make(sitk.ReadImage(str(canonical)), tmp_path)
    ct = read_ct(path)
    np.testing.assert_array_equal(ct.hu, expected.hu)
    for field in ("origin_xyz", "spacing_xyz", "direction"):  # NIfTI's float32, DICOM's decimals
        np.testing.assert_allclose(getattr(ct.geometry, field), getattr(expected.geometry, field), atol=1e-5)
    assert ct.stored_axes == axes and expected.stored_axes == "LPS"
    source = find_ct(path)  # the header alone says what the read gives
    assert source.size_irc == ct.hu.shape and source.stored_axes == axes
    np.testing.assert_allclose(source.geometry.origin_xyz, ct.geometry.origin_xyz, atol=1e-5)
    np.testing.assert_allclose(source.geometry.direction, ct.geometry.direction, atol=1e-6)
    points = irc_to_xyz(np.array([[1, 2, 3], [5, 19, 0], [2.25, 7.25, 11.75]]), expected.geometry)
    mine, theirs = xyz_to_irc(points, ct.geometry), xyz_to_irc(points, expected.geometry)
    np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(cut_chunks(ct.hu, mine)[0], cut_chunks(expected.hu, theirs)[0])


def test_an_lps_ct_is_read_without_a_copy(synth_data):
    """LUNA16's CTs are LPS already: the turn leaves them as they are, a view of the image read."""
    ct = read_ct(first_mhd(synth_data))
    assert isinstance(ct.hu.base, np.ndarray) or type(ct.hu.base).__name__ == "_ImageBuffer"
    assert not ct.hu.flags.owndata
