"""The protocol's stages, what each runs, reads and writes, and its identity.

    shard-cls, shard-seg       python -m luna_dist.shard: the classification and segmentation builds, once
    cls-foldK                  python -m luna_dist.train --task cls on every fold but K (`recipe.select`: which epoch)
    seg-foldK                  --task seg, likewise
    malignancy-foldK           --task malignancy, fine-tuned from cls-foldK's best.pt, likewise
    analyze-foldK              python -m luna_dist.analyze of fold K with those three models
    merge                      python -m luna_dist.evaluate of every fold's submission.csv as one, then the page

Where they write, under --out:

    shards/cls/, shards/seg/               the builds
    foldK/cls/, foldK/seg/, foldK/malignancy/   the runs (best.pt, args.json, logs)
    foldK/analysis/                        the analysis of fold K (report.html, submission.csv, summary.json)
    merged/                                the merged submission.csv, its score.json and froc.png
    stages/NAME.json                       each finished stage's identity, command, time and outputs
    index.html, protocol.json              the page, and what produced everything

A stage's identity is the sha256 of its command (with --out and --data as placeholders, so a
moved folder keeps its stages), luna_dist's version and its inputs: the data (every file's
path, size and time of change), a build's manifest, a model's or a submission's bytes. A
stage is skipped only when it finished with its identity as it is now; a changed recipe
section changes the commands of its stages, and a redone stage whose outputs change changes
the identities of those that read them, and of no others.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from luna_dist import __version__
from luna_dist.cv.recipe import Recipe
from luna_dist.shards.format import sha256_file

TASKS = ("cls", "seg", "malignancy")
KINDS = ("shards", "folds", "merge")


@dataclass(frozen=True)
class Layout:
    """Where the protocol of `data` writes, under `out`."""

    data: Path
    out: Path

    def shards(self, task: str) -> Path:
        return self.out / "shards" / ("seg" if task == "seg" else "cls")

    def run(self, fold: int, task: str) -> Path:
        return self.out / f"fold{fold}" / task

    def model(self, fold: int, task: str) -> Path:
        return self.run(fold, task) / "best.pt"

    def analysis(self, fold: int) -> Path:
        return self.out / f"fold{fold}" / "analysis"

    @property
    def merged(self) -> Path:
        return self.out / "merged"

    def record(self, name: str, started: bool = False) -> Path:
        return self.out / "stages" / (f"{name}.started.json" if started else f"{name}.json")


@dataclass
class Stage:
    """One command of the protocol. `command` follows the launcher (`launched`: training, the analysis) or the
    Python interpreter (the builds, the scoring); `inputs` gives the identities of what it reads, None while one
    of them does not exist yet."""

    name: str
    kind: str  # one of KINDS: which --stages runs it
    section: str  # its recipe section
    command: list[str]
    launched: bool
    reads: list[Path]
    writes: Path
    inputs: Callable[[], dict | None]
    fold: int | None = None
    task: str | None = None
    output: Path | None = None  # the file its followers read (a model, a submission, a manifest)

    def identity(self, layout: Layout, inputs: dict | None = None) -> str | None:
        """The sha256 of what the stage is made of (see the module's docstring); `inputs` when already known."""
        inputs = self.inputs() if inputs is None else inputs
        if inputs is None:
            return None
        shown = [_placeholders(token, layout) for token in self.command]
        made_of = {"stage": self.name, "command": shown, "luna_dist": __version__, "inputs": inputs}
        return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()


def shard_stages(recipe: Recipe, layout: Layout) -> list[Stage]:
    stages = []
    for task in ("cls", "seg"):
        out = layout.shards(task)
        command = ["-m", "luna_dist.shard", *(["--task", "seg"] if task == "seg" else []), "--data", str(layout.data),
                   "--out", str(out), *recipe.section(f"shard.{task}")]
        stages.append(Stage(f"shard-{task}", "shards", f"shard.{task}", command, False, [layout.data], out,
                            lambda: {"data": data_identity(layout.data)}, task=task, output=out / "manifest.json"))
    return stages


def fold_stages(recipe: Recipe, layout: Layout, fold: int, folds: list[int]) -> list[Stage]:
    """The trainings and the analysis of fold K, `folds` being every fold of the build that has series (for the
    inner fold of `select = "inner"`)."""
    manifests = {task: layout.shards(task) / "manifest.json" for task in ("cls", "seg")}
    models = {task: layout.model(fold, task) for task in TASKS}
    stages = []
    for task in TASKS:
        build = manifests["seg" if task == "seg" else "cls"]
        start = ["--finetune", str(models["cls"])] if task == "malignancy" else []
        command = ["-m", "luna_dist.train", "--task", task, "--shards", str(build.parent), "--out",
                   str(layout.out / f"fold{fold}"), "--run-name", task, *selection(recipe.select, fold, folds), *start,
                   *recipe.section(f"train.{task}")]
        read = [build.parent, *([models["cls"]] if start else [])]
        stages.append(Stage(f"{task}-fold{fold}", "folds", f"train.{task}", command, True, read,
                            layout.run(fold, task), _hashes({"shards": build, **({"finetune": models["cls"]}
                                                                               if start else {})}),
                            fold=fold, task=task, output=models[task]))
    out = layout.analysis(fold)
    command = ["-m", "luna_dist.analyze", "--data", str(layout.data), "--shards", str(manifests["cls"].parent),
               "--folds", str(fold), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
               "--mal-model", str(models["malignancy"]), "--out", str(out), *recipe.section("analyze")]
    hashes = _hashes({"shards": manifests["cls"], **{f"model_{task}": models[task] for task in TASKS}})
    stages.append(Stage(f"analyze-fold{fold}", "folds", "analyze", command, True,
                        [layout.data, manifests["cls"].parent, *models.values()], out,
                        lambda: None if (found := hashes()) is None else {**found, "data": data_identity(layout.data)},
                        fold=fold, output=out / "submission.csv"))
    return stages


def merge_stage(recipe: Recipe, layout: Layout, folds: list[int], plot: bool) -> Stage:
    submissions = [layout.analysis(fold) / "submission.csv" for fold in folds]
    merged = layout.merged
    command = ["-m", "luna_dist.evaluate", "--shards", str(layout.shards("cls")), "--folds", *map(str, folds),
               "--predictions", *map(str, submissions), "--merged", str(merged / "submission.csv"),
               "--json", str(merged / "score.json"), *(["--plot", str(merged / "froc.png")] if plot else []),
               *recipe.section("evaluate")]
    files = {"shards": layout.shards("cls") / "manifest.json"}
    for fold, submission in zip(folds, submissions):
        files[f"fold{fold}"] = submission
        files[f"fold{fold}_sidecar"] = submission.with_name("submission.provenance.json")
        files[f"fold{fold}_detections"] = submission.with_name("detections.csv")  # the page's confusion table
    return Stage("merge", "merge", "evaluate", command, False, submissions, merged, _hashes(files),
                 output=merged / "submission.csv")


def selection(select: str, fold: int, folds: list[int]) -> list[str]:
    """The training flags that keep fold K unseen: validated on for display and the last epoch kept ("last"), or
    left out and the epoch chosen on the next fold ("inner")."""
    if select == "last":
        return ["--val-folds", str(fold), "--select-on", "last"]
    inner = folds[(folds.index(fold) + 1) % len(folds)]
    return ["--val-folds", str(inner), "--exclude-folds", str(fold), "--select-on", "val"]


def data_identity(data: Path) -> str:
    """sha256 of every file under `data`: its path, size and time of last change (ns), not its bytes (LUNA16 is
    120 GB): a table edited, a CT replaced, added or removed changes it; a folder moved does not."""
    digest = hashlib.sha256()
    for folder, subfolders, names in os.walk(data):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(data).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _hashes(files: dict[str, Path]) -> Callable[[], dict | None]:
    """The sha256 of each file, by name; None while one is missing."""
    def inputs() -> dict | None:
        if not all(path.is_file() for path in files.values()):
            return None
        return {name: sha256_file(path) for name, path in files.items()}
    return inputs


def _placeholders(token: str, layout: Layout) -> str:
    for path, name in ((layout.out, "$OUT"), (layout.data, "$DATA")):
        if token == str(path) or token.startswith(str(path) + os.sep):
            return name + token[len(str(path)):]
    return token
