"""The shard build: a LUNA16-format folder turned into WebDataset shards, for any task (the command:
`luna_dist/shard.py`).

Each CT is read once and cut by the task's cutter (`--task cls`: a 32x48x48 chunk per
candidate, `luna_dist.shards.chunk_samples`; `--task seg`: slice stacks and masks,
`luna_dist.shards.seg_samples`). Output, under `--out` (docs/shard-format.md is the contract):

    fold{K}-neg-NNNNNN.tar   negatives of the series of fold K, written per CT
    fold{K}-pos-NNNNNN.tar   positives of fold K, packed together once every CT is done
    fold{K}-val-NNNNNN.tar   segmentation only: one shard of validation slices per CT
    manifest.json            counts, shards with sizes and sha256, series per fold with their
                             findings, series skipped or failed and why, CSV rows left out

This module is the machinery every task shares: inputs checked before anything is
written (`luna_dist.shards.inputs`, and the output folder: `luna_dist.shards.output`), CTs
processed in parallel (`luna_dist.shards.writer` cuts and writes one), a shard under its
final name only once complete (written as `.partial`, then renamed), progress journaled
per CT under `.build/` (kept after the build), so a killed build rerun with the same command redoes only the
unfinished CTs and yields exactly the samples of an uninterrupted build, and a series that
failed or had no `.mhd` is added later by a rerun that reads only that CT. Negative shard
numbers are planned from the CSV before any CT is read, so a redone CT overwrites its own
shards and nothing else.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

from luna_dist import __version__
from luna_dist.common import cli
from luna_dist.common.atomic import write_json
from luna_dist.imaging.ct import CtError
from luna_dist.imaging.read_ahead import ReadAhead
from luna_dist.shards.format import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from luna_dist.shards.inputs import Inputs, read_inputs
from luna_dist.shards.options import BuildError, BuildOptions, OutputError
from luna_dist.shards.output import (
    check_output,
    end_with_parent,
    is_complete,
    output_error,
    prepare_work,
    read_json,
    remove_partials,
    sole_writer,
)
from luna_dist.shards.writer import (
    WORK,
    SeriesResult,
    SeriesTask,
    ShardRecord,
    pack_positives,
    positives_tar,
    shard_series,
)
from luna_dist.tables.candidates import Annotation, Candidate, assign_folds


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


def _load_done(work: Path, out: Path, task: SeriesTask) -> SeriesResult | None:
    """A CT's journal entry, if it matches today's plan and every file it names is still there.

    The plan moves a CT's shard numbers when another series of its fold appears (a
    restored `.mhd`), so an entry for other numbers is redone rather than trusted.
    """
    record = read_json(work / "done" / f"{task.series_uid}.json")
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
        with sole_writer(options.out):
            return _build(options, inputs)
    except (OSError, OutputError) as err:
        with suppress(OSError):
            remove_partials(options.out)  # frees what the failed writes took
        raise (err if isinstance(err, OutputError) else output_error(err, options.out)) from None


def _build(options: BuildOptions, inputs: Inputs) -> dict:
    identity = _identity(options, inputs.found.paths)
    finished = check_output(options, identity)
    if is_complete(finished, inputs.series):
        print(f"{options.out}: build already complete ({finished['counts']['samples']} samples); nothing to do")
        return finished
    for warning in inputs.warnings:
        print(warning, file=sys.stderr)
    prepare_work(options, identity)

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
            raise output_error(error, options.out, task.series_uid)
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

    # The CTs after those being cut are read into the page cache meanwhile (`luna_dist.imaging.read_ahead`).
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
            with ProcessPoolExecutor(options.workers, initializer=end_with_parent) as pool:
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
