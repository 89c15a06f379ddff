"""`python -m luna_dist.shard`: turn a LUNA16-format folder into WebDataset shards, for any task.

Each CT is read once and cut by the task's cutter (`--task cls`: a 32x48x48 chunk per
candidate, `luna_dist.chunk_samples`; `--task seg`: slice stacks and masks,
`luna_dist.seg_samples`). Output, under `--out` (docs/shard-format.md is the contract):

    fold{K}-neg-NNNNNN.tar   negatives of the series of fold K, written per CT
    fold{K}-pos-NNNNNN.tar   positives of fold K, packed together once every CT is done
    fold{K}-val-NNNNNN.tar   segmentation only: one shard of validation slices per CT
    manifest.json            counts, shards with sizes and sha256, series per fold with their
                             findings, series skipped or failed and why, CSV rows left out

This module is the machinery every task shares: inputs checked before anything is
written (`luna_dist.shard_inputs`), CTs processed in parallel (`luna_dist.shard_write`
cuts and writes one), a shard under its final name only once complete
(written as `.partial`, then renamed), progress journaled per CT under `.build/` (kept
after the build), so a killed build rerun with the same command redoes only the
unfinished CTs and yields exactly the samples of an uninterrupted build, and a series that
failed or had no `.mhd` is added later by a rerun that reads only that CT. Negative shard
numbers are planned from the CSV before any CT is read, so a redone CT overwrites its own
shards and nothing else.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from luna_dist import __version__, chunk_samples, cli, seg_samples, shard_plan
from luna_dist.atomic import write_json
from luna_dist.candidates import Annotation, Candidate, assign_folds
from luna_dist.ct import MAX_CT_VOXELS, CtError, ReadAhead
from luna_dist.shard_format import CODECS, FORMAT, FORMAT_VERSION, MANIFEST, Cutter, sha256_file
from luna_dist.shard_inputs import InputError, Inputs, left_out_summary, read_inputs
from luna_dist.shard_write import (
    WORK,
    SeriesResult,
    SeriesTask,
    ShardRecord,
    pack_positives,
    positives_tar,
    shard_series,
)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writer is not detected
    fcntl = None

LOCK = "lock"
LOCK_WAIT_S = 10.0
"""How long a build waits for another writer of its --out (workers of a killed build end within ms)."""
PR_SET_PDEATHSIG = 1
"""prctl's option that kills a worker when the build process dies (Linux)."""


class BuildError(Exception):
    """The build cannot start or finish; the message says what to change."""


class OutputError(BuildError):
    """--out cannot be written (full disk, read-only, no permission); what was finished is kept."""


@dataclass
class BuildOptions:
    data: Path
    out: Path
    # The tables; None: found under `data` where the LUNA16 download puts them (luna_dist.layout).
    candidates: Path | None = None  # candidates_V2.csv, else candidates.csv
    annotations: Path | None = None
    malignancy: Path | None = None  # annotations_with_malignancy.csv, if present
    excluded: Path | None = None  # annotations_excluded.csv, if present
    seriesuids: Path | None = None  # the evaluation kit's list of the series scored, if present
    workers: int = max(1, os.cpu_count() or 1)
    max_samples: int = 1000
    max_mb: float = 1000.0
    strict: bool = False
    max_bad_rows: float = 1.0  # percent of a table's rows that may be left out as malformed
    overwrite: bool = False
    progress: bool = True
    task: str = "cls"  # what to cut: "cls" chunks per candidate, "seg" slice stacks and masks
    seg_negatives: int = 64  # seg: negative stacks per CT
    seg_val_every: int = 4  # seg: validate one block of slices without mask in this many
    codec: str = CODECS[0]  # how the samples' arrays are stored (shard_format.CODECS)
    max_ct_voxels: int = MAX_CT_VOXELS  # a CT whose header declares more is refused before it is read

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        if self.task not in CUTTERS:
            raise BuildError(f"--task must be {' or '.join(CUTTERS)}, got {self.task!r}")
        if self.codec not in CODECS:
            raise BuildError(f"--codec must be {' or '.join(CODECS)}, got {self.codec!r}")
        problems = [cli.below("--workers", self.workers, 1), cli.below("--max-samples", self.max_samples, 1),
                    cli.below("--seg-negatives", self.seg_negatives, 0),
                    cli.below("--seg-val-every", self.seg_val_every, 1),
                    cli.below("--max-ct-voxels", self.max_ct_voxels, 1),
                    cli.outside("--max-bad-rows", self.max_bad_rows, 0, 100)]
        if problem := next((p for p in problems if p is not None), None):
            raise BuildError(problem)
        self.cutter: Cutter = CUTTERS[self.task](self)  # built once: what every CT of the build is cut by
        if self.samples_per_shard < 1:
            raise BuildError(f"--max-mb {self.max_mb} is below one sample ({self.cutter.sample_bytes / 1e6:.2f} MB)")

    @property
    def samples_per_shard(self) -> int:
        return min(self.max_samples, int(self.max_mb * 1e6 // self.cutter.sample_bytes))


CUTTERS: dict[str, Callable[[BuildOptions], Cutter]] = {
    chunk_samples.TASK: lambda options: chunk_samples.ChunkCutter(options.codec),
    seg_samples.TASK: lambda options: seg_samples.SegmentCutter(options.seg_negatives, options.seg_val_every,
                                                                options.codec),
}
"""What each --task cuts from a CT: its sample module's cutter, built from the build's options."""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise BuildError(f"{path}: unreadable ({err}); remove it or build with --overwrite") from err


def _identity(options: BuildOptions, tables: dict[str, Path | None]) -> dict:
    """What makes two builds the same: the CSVs' content and the shard layout, not where the data lies.

    CTs are known by series UID, so a data folder moved or copied elsewhere resumes its build.
    The series list only checks the others, so it is not part of a build's identity.
    """
    return {
        "format_version": FORMAT_VERSION,
        "inputs_sha256": {name: sha256_file(path) if path is not None else None
                          for name, path in tables.items() if name != "series_list"},
        **options.cutter.identity(),
        "samples_per_shard": options.samples_per_shard,
    }


def _check_output(options: BuildOptions, identity: dict) -> dict | None:
    """Refuse an output folder holding another build (or clear it with --overwrite); return its manifest, if any.

    A plan without a finished CT is replaced: it holds nothing to keep.
    """
    out, work = options.out, options.out / WORK
    manifest = _read_json(out / MANIFEST)
    plan = _read_json(work / "plan.json")
    previous = (manifest or {}).get("identity") or (plan or {}).get("identity")
    if previous is None and out.is_dir() and any(out.glob("fold*.tar")):
        previous = {"unknown": "shards without a manifest"}
    if previous is None:
        return None
    nothing_finished = manifest is None and plan is not None and not any(work.glob("done/*.json"))
    if previous != identity and not (options.overwrite or nothing_finished):
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        raise BuildError(
            f"{out} holds a different build (differs in: {', '.join(changed)}); "
            "pass --overwrite to replace it, or choose another --out"
        )
    if options.overwrite or previous != identity:
        for path in out.glob("fold*.tar*"):
            path.unlink()
        (out / MANIFEST).unlink(missing_ok=True)
        for path in work.glob("*"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != LOCK:  # held by this build: another build must still see it
                path.unlink()
        return None
    return manifest


def _is_complete(manifest: dict | None, series: dict[str, Path]) -> bool:
    """Nothing left to do: no CT failed, and no skipped series has found its .mhd since."""
    if manifest is None or manifest["failed"]:
        return False
    return not any(skipped["series_uid"] in series for skipped in manifest["skipped"])


def _prepare_work(options: BuildOptions, identity: dict) -> None:
    work = options.out / WORK
    (work / "done").mkdir(parents=True, exist_ok=True)
    (work / "pos").mkdir(parents=True, exist_ok=True)
    _remove_partials(options.out)
    (work / LOCK).write_text(f"{os.getpid()}\n")  # held by this build (`_sole_writer`): a refused one names it
    write_json(work / "plan.json", {"identity": identity})


def _remove_partials(out: Path) -> None:
    """Files a killed or failed build was writing: never part of the result."""
    for partial in list(out.glob("*.partial")) + list((out / WORK).rglob("*.partial")):
        partial.unlink(missing_ok=True)


@contextmanager
def _sole_writer(out: Path):
    """Hold an exclusive lock on `.build/lock` while the build writes.

    Pool workers share the lock through the descriptor they inherit, so a rerun started
    while workers of a killed build still write waits for them to end, then refuses:
    their output never mixes into the new build. The holder writes its PID into the
    lock file once it starts writing (`_prepare_work`), so a refused build can name it.
    """
    lock = out / WORK / LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDONLY if lock.exists() else os.O_WRONLY | os.O_CREAT)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = lock.read_text().strip() or "unknown"
                    raise BuildError(f"{out}: another build (pid {holder}) is writing there (or workers of a killed "
                                     "build still run); wait for it to end, then rerun") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _end_with_parent() -> None:
    """Pool initializer: a worker ends when the build process dies, rather than writing on unseen."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None:  # elsewhere (and should the parent die before prctl): wait on its sentinel
        threading.Thread(target=_exit_after, args=(parent,), daemon=True).start()


def _exit_after(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(1)


def _output_error(err: OSError, out: Path, series_uid: str | None = None) -> OutputError:
    """One line naming the path, and what a rerun does: finished CTs stay journaled."""
    done = len(list((out / WORK).glob("done/*.json")))
    during = f" while writing the shards of CT {series_uid}" if series_uid else ""
    fix = "free some space" if err.errno == errno.ENOSPC else "make it writable or choose another --out"
    return OutputError(f"{err.filename or out}: {err.strerror}{during}; nothing finished was lost "
                       f"({done} CT(s) done and kept): {fix}, then rerun the same command to resume")


def _load_done(work: Path, out: Path, task: SeriesTask) -> SeriesResult | None:
    """A CT's journal entry, if it matches today's plan and every file it names is still there.

    The plan moves a CT's shard numbers when another series of its fold appears (a
    restored `.mhd`), so an entry for other numbers is redone rather than trusted.
    """
    record = _read_json(work / "done" / f"{task.series_uid}.json")
    if record is None:
        return None
    result = SeriesResult(**{**record, "shards": [ShardRecord(**s) for s in record["shards"]]})
    planned = task.cutter.planned_negatives(task.candidates)
    if [s.name for s in result.shards] != task.shard_names() or result.negatives != planned:
        return None
    if result.positives and not positives_tar(out, task.series_uid).is_file():
        return None
    if any(not (out / s.name).is_file() or (out / s.name).stat().st_size != s.bytes for s in result.shards):
        return None
    return result


def plan_tasks(candidates: list[Candidate], series: dict, folds: dict, options: BuildOptions,
               annotations: list[Annotation] = ()) -> list[SeriesTask]:
    """One task per CT; shard numbers are fixed here, per fold, in UID order."""
    by_series: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_series[candidate.series_uid].append(candidate)
    nodules: dict[str, list[Annotation]] = defaultdict(list)
    for annotation in annotations:
        nodules[annotation.series_uid].append(annotation)
    next_neg, next_val = defaultdict(int), defaultdict(int)
    tasks = []
    for uid in sorted(by_series, key=lambda u: (folds[u], u)):
        fold = folds[uid]
        task = SeriesTask(uid, fold, by_series[uid], nodules[uid], mhd_path=str(series[uid]), out_dir=str(options.out),
                          neg_first_shard=next_neg[fold], samples_per_shard=options.samples_per_shard,
                          cutter=options.cutter, val_shard=next_val[fold], max_ct_voxels=options.max_ct_voxels)
        tasks.append(task)
        next_neg[fold] += len(task.shard_names()) - task.cutter.per_ct_validation
        next_val[fold] += task.cutter.per_ct_validation
    return tasks


def read_build_inputs(options: BuildOptions) -> Inputs:
    """The build's inputs, checked, with the tables it uses printed before any work."""
    inputs = read_inputs(options.data, {"candidates": options.candidates, "annotations": options.annotations,
                                        "malignancy": options.malignancy, "excluded": options.excluded,
                                        "series_list": options.seriesuids},
                         options.strict, options.max_bad_rows)
    print(inputs.found.report())
    return inputs


def build(options: BuildOptions) -> dict:
    """Build (or finish, or confirm) the shard set; returns the manifest."""
    inputs = read_build_inputs(options)
    try:
        with _sole_writer(options.out):
            return _build(options, inputs)
    except (OSError, OutputError) as err:
        with suppress(OSError):
            _remove_partials(options.out)  # frees what the failed writes took
        raise (err if isinstance(err, OutputError) else _output_error(err, options.out)) from None


def _build(options: BuildOptions, inputs: Inputs) -> dict:
    identity = _identity(options, inputs.found.paths)
    finished = _check_output(options, identity)
    if _is_complete(finished, inputs.series):
        print(f"{options.out}: build already complete ({finished['counts']['samples']} samples); nothing to do")
        return finished
    for warning in inputs.warnings:
        print(warning, file=sys.stderr)
    _prepare_work(options, identity)

    skipped = inputs.skipped
    folds = assign_folds(inputs.series)
    tasks = plan_tasks([c for c in inputs.candidates if c.series_uid in folds], inputs.series, folds, options,
                       inputs.annotations)

    work = options.out / WORK
    results: dict[str, SeriesResult] = {}
    for task in tasks:
        if (done := _load_done(work, options.out, task)) is not None:
            results[task.series_uid] = done
    todo = [t for t in tasks if t.series_uid not in results]
    if results:
        print(f"resuming: {len(results)} of {len(tasks)} CTs already sharded, {len(todo)} to go")
    failed = _run_tasks(todo, results, options)

    shards = [s for r in results.values() for s in r.shards]
    named = {s.name for s in shards}
    for stale in options.out.glob("fold*.tar"):
        if stale.name not in named and "-pos-" not in stale.name:
            stale.unlink()  # numbered by an earlier plan, before a series appeared
    shards += pack_positives(list(results.values()), options.out, options.samples_per_shard)
    manifest = _manifest(options, identity, results, folds, shards, skipped, failed, inputs)
    write_json(options.out / MANIFEST, manifest)
    if failed:
        listing = "\n  ".join(f"{f['series_uid']}: {f['error']}" for f in failed)
        raise BuildError(f"{len(failed)} CT(s) could not be sharded; the others are in {options.out}:\n  {listing}\n"
                         "fix or remove those files and rerun the same command to add them")
    return manifest


def _run_tasks(todo: list[SeriesTask], results: dict, options: BuildOptions) -> list[dict]:
    """Shard the CTs in parallel, journaling each finished CT; returns the failures."""
    failed = []
    work = options.out / WORK
    bar = tqdm(total=len(todo), unit="CT", disable=not options.progress or not todo, dynamic_ncols=True)
    started, samples, megabytes = time.perf_counter(), 0, 0.0

    def finish(task: SeriesTask, result: SeriesResult | None, error: BaseException | None) -> None:
        nonlocal samples, megabytes
        if isinstance(error, OSError):  # --out cannot take more: every other CT would fail alike
            raise _output_error(error, options.out, task.series_uid)
        if error is not None:
            if not isinstance(error, CtError):
                error = f"{type(error).__name__}: {error}"
            failed.append({"series_uid": task.series_uid, "path": task.mhd_path, "error": str(error)})
            bar.write(f"error: {error}")
        else:
            write_json(work / "done" / f"{task.series_uid}.json", asdict(result))
            results[task.series_uid] = result
            samples += result.positives + result.negatives
            megabytes += (result.positives + result.negatives) * options.cutter.sample_bytes / 1e6  # at most
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{samples / elapsed:,.0f} samples/s, {megabytes / elapsed:,.0f} MB/s", refresh=False)
        bar.update()

    # The CTs after those being cut are read into the page cache meanwhile (`ct.read_ahead`).
    ahead = ReadAhead([task.mhd_path for task in todo], options.workers)
    try:
        if options.workers <= 1:
            for task in todo:
                try:
                    finish(task, shard_series(task), None)
                except Exception as error:  # reported per CT; the other CTs go on
                    finish(task, None, error)
                ahead.more()
        else:
            with ProcessPoolExecutor(options.workers, initializer=_end_with_parent) as pool:
                pending = {pool.submit(shard_series, task): task for task in todo}
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        ahead.more(len(done))
                        for future in done:
                            task = pending.pop(future)
                            error = future.exception()
                            finish(task, None if error else future.result(), error)
                finally:
                    pool.shutdown(cancel_futures=True)  # on an error, the queued CTs are not started
    except KeyboardInterrupt:
        bar.close()
        raise BuildError(f"interrupted: {len(results)} CTs are kept; rerun the same command to resume") from None
    bar.close()
    return failed


def _manifest(options, identity, results, folds, shards, skipped, failed, inputs: Inputs) -> dict:
    fold_counts = {}
    for fold in range(max(folds.values(), default=-1) + 1):
        members = [r for r in results.values() if r.fold == fold]
        series = {r.series_uid for r in members}
        fold_counts[str(fold)] = {
            "series": sorted(series),
            "positives": sum(r.positives for r in members),
            "negatives": sum(r.negatives for r in members),
            "samples": sum(r.positives + r.negatives for r in members),
            # What LUNA16's evaluation needs, so training scores a fold without the data folder.
            **{name: [row for row in rows if row[0] in series] for name, rows in inputs.findings.items()},
        }
        if options.cutter.per_ct_validation:
            fold_counts[str(fold)]["val_slices"] = sum(r.val_slices for r in members)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"luna_dist {__version__}",
        "arguments": cli.arguments_json(asdict(options)),
        "identity": identity,
        "task": options.cutter.task,
        **options.cutter.layout(),
        "counts": {
            "samples": sum(f["samples"] for f in fold_counts.values()),
            "positives": sum(f["positives"] for f in fold_counts.values()),
            "negatives": sum(f["negatives"] for f in fold_counts.values()),
            "outside_volume": sum(r.outside_volume for r in results.values()),
            **({"val_slices": sum(r.val_slices for r in results.values())} if options.cutter.per_ct_validation else {}),
        },
        "folds": fold_counts,
        "shards": sorted((asdict(s) for s in shards), key=lambda s: s["name"]),
        "skipped": skipped,
        "unlisted": inputs.unlisted,
        "failed": failed,
        "tables": inputs.tables,
        "bad_rows": [asdict(row) for row in inputs.bad_rows],
        "duplicate_rows": [asdict(row) for row in inputs.duplicates],
    }


SEG_FLAGS = ("--seg-negatives", "--seg-val-every")
"""The flags of --task seg: given with --task cls, they are refused."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="LUNA16-format folder (subset*/ with .mhd/.raw, CSVs)")
    parser.add_argument("--task", choices=sorted(CUTTERS), default="cls",
                        help="cls: a chunk per candidate (default); seg: slice stacks and nodule masks")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: shards/<name of --data>, -seg for --task seg)")
    parser.add_argument("--candidates", type=Path,
                        help="the points to classify (default: candidates_V2.csv, else candidates.csv, found in DATA "
                             "or up to two folders below it)")
    parser.add_argument("--annotations", type=Path, help="the nodules (default: annotations.csv, found likewise)")
    parser.add_argument("--malignancy", type=Path,
                        help="malignancy table with mal_bool (default: annotations_with_malignancy.csv if found)")
    parser.add_argument("--excluded", type=Path,
                        help="findings the evaluation ignores (default: annotations_excluded.csv if found, as in "
                             "the evaluation kit's evaluationScript/annotations/)")
    parser.add_argument("--seriesuids", type=Path,
                        help="the series LUNA16 scores, to check the tables against (default: seriesuids.csv if "
                             "found)")
    parser.add_argument("--workers", type=int, default=BuildOptions.workers,
                        help="parallel CT readers (default: cores)")
    parser.add_argument("--max-samples", type=int, default=BuildOptions.max_samples, help="samples per shard at most")
    parser.add_argument("--max-mb", type=float, default=BuildOptions.max_mb, help="shard size at most, in MB")
    parser.add_argument("--codec", choices=CODECS, default=BuildOptions.codec,
                        help="how the samples' arrays are stored, losslessly: lz4 (default), ~2x smaller and quick to "
                             "decode, for loaders that feed a GPU; zstd, ~10%% smaller still, decoded ~3x slower; "
                             "or none")
    parser.add_argument("--max-ct-voxels", type=int, default=BuildOptions.max_ct_voxels,
                        help="refuse a CT whose header declares more voxels, before they are read (LUNA16's largest "
                             "has 2.0e8)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on malformed or duplicate CSV rows and series without .mhd")
    parser.add_argument("--max-bad-rows", type=float, default=BuildOptions.max_bad_rows, metavar="PERCENT",
                        help="refuse a table with more than this share of its rows malformed "
                             "(default %(default)s %%)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different build found in --out")
    parser.add_argument("--seg-negatives", type=int, default=BuildOptions.seg_negatives,
                        help="seg: negative stacks per CT (default %(default)s)")
    parser.add_argument("--seg-val-every", type=int, default=BuildOptions.seg_val_every,
                        help="seg: validate every slice with mask and 1 block of slices without in N "
                             "(default %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--plan", action="store_true",
                        help="read the tables and CT headers only, and print per fold the samples, bytes, disk and "
                             "time a build would take (measured on two synthetic CTs); write nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plan_only = vars(args).pop("plan")
    given = {token.split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv)}
    if args.task != seg_samples.TASK and (flags := sorted(given & set(SEG_FLAGS))):
        parser.error(f"{flags[0]} is a flag of --task seg; --task {args.task} does not use it")
    default_out = Path("shards") / (args.data.resolve().name + ("-seg" if args.task == "seg" else ""))
    try:
        options = BuildOptions(**{**vars(args), "out": args.out or default_out})
    except BuildError as err:  # a flag out of range: the command line is wrong
        parser.error(str(err))
    if plan_only:
        try:
            inputs = read_build_inputs(options)
            for warning in inputs.warnings:
                print(warning, file=sys.stderr)
            plans, rate = shard_plan.plan(options, inputs)
        except (InputError, CtError, ValueError) as err:
            return cli.fail(str(err))
        print(shard_plan.format_plan(plans, rate, options.workers, options.out))
        return 0
    try:
        manifest = build(options)
    except (BuildError, InputError, CtError, ValueError) as err:
        return cli.fail(str(err))
    counts = manifest["counts"]
    validation = f", {counts['val_slices']} validation slices" if "val_slices" in counts else ""
    cts = sum(len(fold["series"]) for fold in manifest["folds"].values())
    print(f"{options.out}: {counts['samples']} samples ({counts['positives']} pos, {counts['negatives']} neg)"
          f"{validation} in {len(manifest['shards'])} shards from {cts} CTs")
    if (left_out := left_out_summary(manifest)) is not None:
        print(left_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
