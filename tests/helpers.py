"""What several test modules share: the data's sizes, opening shard sets as training does, damaging shards,
killing a build mid-way, a segmentation model of known output, CTs written as DICOM series, bad CTs, and a
pickle that runs code. Fixtures live in conftest.py."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gzip
import http.server
import io
import locale
import os
import resource
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna_dist.benchmarks.analysis import THRESHOLD_HU, threshold_model  # noqa: F401  (the tests' UNet of known output)
from luna_dist.data.batches import collate
from luna_dist.data.streams import ShardSet, batched, open_shard_set
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.shards import chunk_samples
from luna_dist.shards.codecs import SUFFIXES, load_array

SYNTH_CTS = 10
SYNTH_SEED = 0
SHARD_WORKERS = 2
SHARD_MAX_SAMPLES = 150
TINY_NEGATIVES = 12
"""Negative candidates kept per CT in `tiny_shards`."""
SEG_NEGATIVES = 12
"""Negative stacks per CT in the segmentation builds: few, so they stay small."""


def open_cls(root, **kwargs) -> ShardSet:
    """A classification shard set, opened as training opens it."""
    return open_shard_set(root, chunk_samples, **kwargs)


def kill_build_after(command: list[str], done_dir: Path, journaled: int, log: Path) -> tuple[bool, int]:
    """Run a shard build and SIGKILL its process group once `journaled` CTs are in `done_dir`.

    Returns (whether it finished before the kill, its return code). Output goes to `log`.
    """
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= journaled:
                    break
                time.sleep(0.01)
            finished_first = process.poll() is not None
            if not finished_first:
                os.killpg(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    return finished_first, process.returncode


def run_or_show_stacks(command: list[str], timeout: float, env: dict, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)`; on a timeout, every process the command
    started (the ranks run in sessions of their own, with their data workers) first prints its Python
    stacks (faulthandler, on SIGABRT), then the test fails with them: a hang that happens once in many
    CI runs is otherwise known only by its timeout."""
    process = subprocess.Popen(command, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        processes = [process.pid, *_descendants(process.pid)]
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))  # SIGABRT leaves no core file
                os.kill(pid, signal.SIGABRT)
        time.sleep(2)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command[:6])}...: no exit in {timeout:.0f} s; the stacks of its "
                             f"processes:\n{stderr[-20000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [grandchild for child in map(int, children) for grandchild in [child, *_descendants(child)]]


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a dead worker re-parented to a non-reaping init stays a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def shared_memory_files(pids: list[int]) -> set[str]:
    """The files in /dev/shm that the processes `pids` map and that still have a name there (Linux's /proc)."""
    files = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode[, path]
                if len(fields) == 6 and fields[5].startswith("/dev/shm/") and not fields[5].endswith("(deleted)"):
                    files.add(fields[5])
    return files


def left_behind(pids: list[int], files: set[str], wait: float) -> tuple[list[int], list[str]]:
    """Which of the processes `pids` still run and which of `files` still exist after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        running, existing = [pid for pid in pids if is_running(pid)], sorted(f for f in files if os.path.exists(f))
        if not (running or existing) or time.monotonic() > deadline:
            return running, existing
        time.sleep(0.1)


# -- classification samples as the shards hold them -------------------------------------------------------------
POS_NEG = ("pos", "neg")
CLS_BATCHES = partial(batched, collate=collate)
"""Validation batches of a classification shard set."""


def chunk_sample(key: str, label: int, value: int) -> dict:
    """A sample as a shard's tar members give it: a chunk of `value` everywhere, labelled `label`."""
    buffer = io.BytesIO()
    np.save(buffer, np.full(CHUNK_SHAPE, value, dtype=np.int16))
    return {"__key__": key, "chunk.npy": buffer.getvalue(), "cls": str(label).encode(), "json": b"{}"}


def tar_samples(path) -> dict[str, tuple[np.ndarray, int]]:
    """Each sample of a classification shard, read with tarfile and np.load: key -> (chunk, label)."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            entry = samples.setdefault(key, [None, None])
            if ext in CHUNK_MEMBERS:
                entry[0] = load_array({ext: data}, "chunk.npy")
            elif ext == "cls":
                entry[1] = int(data)
    return samples


# -- damaged shards: each function changes a shard file in place and returns the key of the sample hit ------------
def damaged_copy(shard_dir: Path, tmp_path: Path, damage, fold: int = 9) -> tuple[ShardSet, Path, str]:
    """A copy of the shard set whose first negative shard of `fold` `damage(file, members)` changes in place."""
    out = Path(shutil.copytree(shard_dir, tmp_path / "shards"))
    shards = open_cls(out)
    victim = Path(shards.shards([fold], "neg")[0])
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    with open(victim, "r+b") as file:
        key = damage(file, members)
    return shards, victim, key


CHUNK_MEMBERS = tuple("chunk.npy" + suffix for suffix in SUFFIXES.values())
"""A classification sample's chunk, as each codec names it."""


def is_chunk(member: tarfile.TarInfo) -> bool:
    return member.name.split(".", 1)[-1] in CHUNK_MEMBERS


def zero_magic(file, members) -> str:
    member = next(m for m in members[30:] if is_chunk(m))
    file.seek(member.offset_data)
    file.write(b"\0" * 6)  # np.load then takes it for a pickle
    return member.name.split(".")[0]


def zero_middle(file, members) -> str:
    member = next(m for m in members[len(members) // 2:] if m.name.endswith(".cls"))
    file.seek(member.offset)
    file.write(b"\0" * 2048)  # tar readers stop at zero blocks: this sample ends without its cls
    return member.name.split(".")[0]


def random_header(file, members) -> str:
    """512 random bytes over a tar header in mid-archive: the reader finds its checksum wrong."""
    member = members[len(members) // 2]
    file.seek(member.offset)
    file.write(np.random.default_rng(0).bytes(512))
    return member.name.split(".")[0]


def random_payload(file, members) -> str:
    """8 KB of random bytes inside a chunk: every sample still reads, one holds garbage."""
    member = next(m for m in members[len(members) // 2:] if is_chunk(m))
    file.seek(member.offset_data + 1024)
    file.write(np.random.default_rng(0).bytes(8192))
    return member.name.split(".")[0]


# -- a segmentation model of known output ----------------------------------------------------------------------
REAL_TABLES = Path(__file__).parent / "fixtures" / "luna16"
"""The real LUNA16 tables, gzip-compressed (see its README.md): annotations, excluded findings,
the evaluation kit's series list and the book's malignancy table."""


def real_table(name: str, dest: Path) -> Path:
    """The real table `name` (e.g. "annotations.csv") unpacked to the file `dest`."""
    import gzip

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.decompress((REAL_TABLES / f"{name}.gz").read_bytes()))
    return dest


# -- a CT written as a DICOM series --------------------------------------------------------------------------
def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, modality: str = "CT", skip: tuple[int, ...] = (),
                       moved: dict[int, float] | None = None) -> Path:
    """Write a 3-D SimpleITK image of HU as one DICOM file per slice in `folder`, as a scanner does: unsigned
    16-bit values with rescale intercept -1024, each slice placed by ImagePositionPatient and oriented by
    ImageOrientationPatient (positions as decimal strings, 6 decimals). `skip` leaves slices out; `moved`
    shifts slices along the slice normal by that many mm."""
    folder.mkdir(parents=True, exist_ok=True)
    floats = sitk.Cast(image, sitk.sitkFloat32)  # so the writer stores them with the rescale given below
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the process in the C locale: restored after
    try:
        _write_slices(image, floats, folder, writer, series_uid, modality, skip, moved)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return folder


def _write_slices(image: sitk.Image, floats: sitk.Image, folder: Path, writer: sitk.ImageFileWriter,
                  series_uid: str, modality: str, skip: tuple[int, ...], moved: dict[int, float] | None) -> None:
    d = image.GetDirection()
    normal = np.array(d[2::3])
    for i in range(image.GetDepth()):
        if i in skip:
            continue
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, i))) + normal * (moved or {}).get(i, 0.0)
        tags = {"0008|0060": modality, "0020|000e": series_uid, "0020|000d": series_uid + ".0",
                "0008|0018": f"{series_uid}.{i + 1}", "0020|0013": str(i + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0028|1052": "-1024", "0028|1053": "1",
                "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "0"}
        plane = floats[:, :, i]
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{i:04d}.dcm"))
        writer.Execute(plane)


def tilted_image(hu: np.ndarray) -> sitk.Image:
    """`hu` as an image whose slices are tilted 20° about y, at a non-trivial origin: geometry that shows."""
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-20.125, 30.5, -100.25))
    t = np.radians(20)
    image.SetDirection([np.cos(t), 0, np.sin(t), 0, 1, 0, -np.sin(t), 0, np.cos(t)])
    return image


def gantry_tilted_image(hu: np.ndarray, degrees: float = 20.0) -> sitk.Image:
    """`hu` as an image whose rows and columns are LPS's x and y but whose slices step off their normal by
    `degrees` towards +x: a gantry-tilted series, once written by `write_dicom_series` (its orientation
    orthogonal, its positions sheared)."""
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.8, 1.25))
    image.SetOrigin((-20.125, 30.5, -100.25))
    t = np.radians(degrees)
    image.SetDirection([1, 0, np.sin(t), 0, 1, 0, 0, 0, np.cos(t)])
    return image


def sheared_nifti(hu: np.ndarray, path: Path, degrees: float = 20.0) -> Path:
    """`hu` written as an uncompressed NIfTI whose sform steps from slice to slice off the slices' normal by
    `degrees` (its qform left orthogonal, as ITK wrote it): bytes 280-327 of a NIfTI-1 header are srow_x/y/z."""
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.8, 1.25))
    sitk.WriteImage(image, str(path))
    header = bytearray(path.read_bytes())
    srow_x = np.frombuffer(bytes(header[280:296]), dtype="<f4").copy()
    srow_x[2] = 1.25 * np.tan(np.radians(degrees))
    header[280:296] = srow_x.tobytes()
    path.write_bytes(bytes(header))
    return path


def _series_with(**options):
    def make(image, tmp_path):
        return write_dicom_series(image, tmp_path / "series", "1.2.3", **options)
    return make


def _two_series(image, tmp_path):
    write_dicom_series(image, tmp_path / "series", "1.2.3")
    for file in write_dicom_series(image, tmp_path / "other", "1.2.4").iterdir():
        file.rename(tmp_path / "series" / f"other-{file.name}")
    return tmp_path / "series"


def _flat_nifti(image, tmp_path):
    sitk.WriteImage(image[:, :, 0], str(tmp_path / "flat.nii.gz"))
    return tmp_path / "flat.nii.gz"


def _no_dicom(image, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here\n")
    return tmp_path / "empty"


def _gantry_tilt(image, tmp_path):
    return write_dicom_series(gantry_tilted_image(np.zeros((40, 20, 24), dtype=np.int16)), tmp_path / "series", "1.2.3")


def _sheared_sform(image, tmp_path):
    return sheared_nifti(np.zeros((40, 20, 24), dtype=np.int16), tmp_path / "sheared.nii")


def _sheared_mhd(image, tmp_path):
    sitk.WriteImage(gantry_tilted_image(np.zeros((40, 20, 24), dtype=np.int16)), str(tmp_path / "sheared.mhd"))
    return tmp_path / "sheared.mhd"


def _truncated(name: str):
    def make(image, tmp_path):
        path = tmp_path / name
        sitk.WriteImage(image, str(path))
        data = path.read_bytes()
        path.write_bytes(data[:len(data) * 3 // 4])
        return path
    return make


def _one_dicom_file(image, tmp_path):
    return write_dicom_series(image, tmp_path / "series", "1.2.3") / "slice0002.dcm"


def _four_d(image, tmp_path):
    sitk.WriteImage(sitk.JoinSeries([image, image, image]), str(tmp_path / "four.nii.gz"))
    return tmp_path / "four.nii.gz"


def _fifo(image, tmp_path):
    os.mkfifo(tmp_path / "fifo.nii.gz")
    return tmp_path / "fifo.nii.gz"


def _series_one_level_down(image, tmp_path):
    write_dicom_series(image, tmp_path / "patient" / "series", "1.2.3")
    return tmp_path / "patient"


def _declaring_2_gigavoxels(image, tmp_path):
    """A 4 kB .nii.gz whose header declares 2048x1024x1024 int16 voxels (4 GiB)."""
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(tmp_path / "huge.nii"))
    header = bytearray((tmp_path / "huge.nii").read_bytes()[:352])
    header[40:56] = np.array([3, 2048, 1024, 1024, 1, 1, 1, 1], dtype="<i2").tobytes()  # dim[0..7]
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(bytes(header) + bytes(4096)))
    return tmp_path / "huge.nii.gz"


BAD_CTS = [  # (name, how to make it from an image and a folder, what the one line says after the path)
    ("two series", _two_series, "series: 2 DICOM series (1.2.3, 1.2.4): give a folder holding one series"),
    ("not CT", _series_with(modality="MR"), "slice0000.dcm: DICOM modality MR (0008|0060), not CT"),
    ("one slice", _series_with(skip=(1, 2, 3, 4, 5)), "series: a DICOM series of one slice: a 2-D image, not a CT"),
    ("2-D file", _flat_nifti, "flat.nii.gz: expected a 3-D image, found 2-D"),
    ("missing slice", _series_with(skip=(3,)),
     "series: 1 slice(s) missing: 5 mm between slice0002.dcm and slice0004.dcm"),
    ("uneven spacing", _series_with(moved={3: 0.8}),
     "series: uneven slice spacing: 3.3 mm between slice0002.dcm and slice0003.dcm"),
    ("no DICOM", _no_dicom, "empty: a folder holding no DICOM series"),
    ("gantry tilt", _gantry_tilt, "series: series 1.2.3 has a gantry tilt of 20.0°: slice0039.dcm lies 16.7 mm off "
                                  "the normal through slice0000.dcm"),
    ("sheared sform", _sheared_sform, "sheared.nii: sheared geometry: its sform (srow_x/y/z) has axes 20.0° off a "
                                      "right angle, 17.7 mm across the volume"),
    ("sheared .mhd", _sheared_mhd, "sheared.mhd: sheared geometry: its direction cosines put axes 20.0° off a right "
                                    "angle, 16.7 mm across the volume"),
    ("truncated .nii", _truncated("ct.nii"), "ct.nii: truncated, 4584 bytes where the header needs 6112"),
    ("truncated .nii.gz", _truncated("ct.nii.gz"), "ct.nii.gz: truncated, "),
    ("one DICOM file", _one_dicom_file, "slice0002.dcm: one DICOM slice, a 2-D image, not a CT: give the folder "
                                        "holding its series"),
    ("4-D NIfTI", _four_d, "four.nii.gz: a 4-D image, 3 volumes of 24x20x6 voxels (NIfTI's dim[4]), where a CT is "
                           "one: give the volume K you mean (0 to 2)"),
    ("FIFO", _fifo, "fifo.nii.gz: not a regular file (a FIFO)"),
    ("series one level down", _series_one_level_down, "patient: a folder holding no DICOM series; its subfolder(s) "
                                                      "series hold DICOM files: give one of them"),
    ("4 GiB declared", _declaring_2_gigavoxels, "huge.nii.gz: its header declares 2048x1024x1024 = 2,147,483,648 "
                                                "voxels, more than --max-ct-voxels 1,073,741,824"),
]


def ctrl_c_inside_a_finalizer() -> None:
    """SIGINT to this process from inside a finalizer, where Python prints and drops the KeyboardInterrupt
    it raises (as in a `__del__` or a generator the garbage collector closes)."""
    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):  # Python runs the signal's handler here, inside the finalizer
                pass

    Collected()  # collected at once


class OpensAFile:
    """Pickled, it calls open(path, "w") when loaded: code that no loader may run (the file appearing shows it ran)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


class LaggingDevice:
    """A stand-in on the CPU for a device whose copies from the host are asynchronous (Apple's MPS): a copy
    reads its source `lag` copies after it was issued, at its address as a device does (holding nothing that
    keeps the memory from being let go of), or when an event recorded after it is waited for. `read` holds
    the bytes each copy got, in order."""

    def __init__(self, lag: int) -> None:
        self.lag, self.pending, self.read = lag, collections.deque(), []

    def copy(self, tensor) -> None:
        assert tensor.is_contiguous()
        self.pending.append((tensor.data_ptr(), tensor.nbytes))
        while len(self.pending) > self.lag:
            self._run_one()

    def finish(self) -> None:
        """Every copy issued, done (a sync point), while the memory the copies read is still there."""
        while self.pending:
            self._run_one()

    def event(self) -> LaggingDevice.Event:
        return LaggingDevice.Event(self, len(self.read) + len(self.pending))

    def _run_one(self) -> None:
        address, size = self.pending.popleft()
        self.read.append(ctypes.string_at(address, size))

    @dataclass
    class Event:
        """Recorded after the copies issued so far: done once the device has run them."""

        device: LaggingDevice
        after: int  # the copies issued before it

        def query(self) -> bool:
            return len(self.device.read) >= self.after

        def synchronize(self) -> None:
            while not self.query():
                self.device._run_one()


MPS_MISSING = ("The operator '{}' is not currently implemented for the MPS device. If you want this op to be added in "
               "priority during the prototype phase of this feature, please comment on "
               "https://github.com/pytorch/pytorch/issues/77764. As a temporary fix, you can set the environment "
               "variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this op. WARNING: this will "
               "be slower than running natively on MPS.")
"""What MPS raises (NotImplementedError) for a kernel it lacks, as torch words it."""


def broken_backend(perturbed: tuple = (), missing: tuple = (), scale: float = 1.1):
    """A stand-in on the CPU for a broken device backend, as a dispatch mode: the outputs of the aten ops in
    `perturbed` come out `scale` times too large (a silently wrong kernel), those in `missing` raise as MPS
    raises for a kernel it lacks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Broken(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in missing:
                raise NotImplementedError(MPS_MISSING.format(func.name()))
            out = func(*args, **(kwargs or {}))
            if func not in perturbed:
                return out
            return tuple(t * scale if t is not None else t for t in out) if isinstance(out, tuple) else out * scale

    return Broken()


def on_a_broken_device(monkeypatch, **broken) -> None:
    """Check the CPU at a run's start as a device, and run every device pass of the numbers check (never the CPU
    reference) on `broken_backend(**broken)`."""
    from luna_dist.devices import numbers, start

    device_pass = numbers.device_pass

    def broken_pass(*args, **kwargs):
        with broken_backend(**broken):
            return device_pass(*args, **kwargs)

    monkeypatch.setattr(numbers, "device_pass", broken_pass)
    monkeypatch.setattr(start, "checked_at_start", lambda device: True)


@contextlib.contextmanager
def web_server(folder: Path, answer: Callable[[http.server.SimpleHTTPRequestHandler], bool]) -> Iterator[str]:
    """A quiet web server on 127.0.0.1 serving `folder` from a thread of this process; each GET is first offered
    to `answer` (with the request's handler), which returns True when it answered it itself. Yields its URL;
    stopped when the block ends (within 0.05 s)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if not answer(self):
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
