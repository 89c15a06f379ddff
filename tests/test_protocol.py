"""python -m luna_dist.protocol: the recipe, the stages' identities, what a stage's process leaves when stopped, the
SLURM form, and the whole protocol over two folds of a small synthetic set (killed, resumed, a flag changed)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from luna_dist import analyze, evaluate, protocol
from luna_dist.cv import recipe as recipes
from luna_dist.cv.runner import ProtocolError, Runner, check_unseen
from luna_dist.cv.stages import Layout, Stage, fold_stages, merge_stage, selection, shard_stages
from luna_dist.evaluation.files import fold_findings, read_marks
from luna_dist.evaluation.luna16 import Marks, froc
from luna_dist.models import provenance
from luna_dist.synthetic.generator import MIN_SHAPE, make_dataset

ROOT = Path(__file__).resolve().parents[1]

# The UNet's --lr 0.01 over 4 steps: a segmentation of a few to some tens of groups a CT, where 2 steps at the
# default rate leave hundreds for each analysis to classify (then the slowest stage by far).
SMALL = """select = "last"
[shard.cls]
flags = "--workers 1 --max-samples 10"
[shard.seg]
flags = "--workers 1 --seg-negatives 12"
[train.cls]
flags = "--epochs 1 --max-steps 2 --batch-size 4 --balanced 1 --lr 0.0005 --momentum 0.9 --num-workers 0"
[train.seg]
flags = "--epochs 1 --max-steps 4 --batch-size 4 --lr 0.01 --num-workers 0"
[train.malignancy]
flags = "--epochs 1 --max-steps 2 --batch-size 4 --mix 1 1 0 --num-workers 0"
[analyze]
flags = ""
[evaluate]
flags = "--bootstrap 100"
"""


def write_recipe(path: Path, text: str = SMALL) -> Path:
    path.write_text(text)
    return path


# -- the recipe ---------------------------------------------------------------------------------------------------
def test_both_recipes_of_the_repository_parse_with_every_commands_parser(tmp_path):
    layout = Layout(tmp_path / "data", tmp_path / "out")
    for name in ("luna16", "synthetic"):
        recipe = recipes.load(ROOT / "launch" / "recipes" / f"{name}.toml")
        parsed = recipes.check(recipe, protocol.stage_parsers(layout))
        assert parsed["train.cls"].epochs >= 2 and recipe.select == "last"
    assert protocol.DEFAULT_RECIPE == ROOT / "launch" / "recipes" / "luna16.toml"


@pytest.mark.parametrize("text, said", [
    ('select = "best"', "select = 'best'; choose 'last' or 'inner'"),
    ('seed = 3', "unknown key 'seed'"),
    ('[train.cls]\nflags = "--epochs 2 --val-folds 3"', "[train.cls] gives --val-folds, which the protocol sets itself"),
    ('[analyze]\nflags = "--folds=3"', "[analyze] gives --folds, which the protocol sets itself"),
    ('[train.cls]\nflags = "--epochs two"', "[train.cls] flags '--epochs two': argument --epochs: invalid int value"),
    ('[train.seg]\nflags = "--balanced 1"', "--balanced is a flag of --task cls; --task seg does not use it"),
    ('[shard.cls]\nflags = "--seg-negatives 3"', "--seg-negatives is a flag of --task seg"),
    ('[evaluate]\nflags = "--bootstrap"', "argument --bootstrap: expected one argument"),
    ('[train.gan]\nflags = ""', "[train] holds the tables [train.cls], [train.seg], [train.malignancy]"),
    ('[analyze]\nepochs = 2', '[analyze] holds one key, flags = "..."'),
    ('[analyze]\nflags = "--batch-size \'8"', "[analyze] flags: No closing quotation"),
    ("select = ", "not TOML"),
])
def test_a_bad_recipe_is_one_line_naming_the_section_and_the_flag(text, said, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.toml", text)
    assert protocol.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--recipe", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --recipe {recipe}: ") and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# -- the stages ---------------------------------------------------------------------------------------------------
def test_each_fold_is_kept_unseen_by_its_models_flags():
    assert selection("last", 3, [0, 1, 3, 5]) == ["--val-folds", "3", "--select-on", "last"]
    assert selection("inner", 3, [0, 1, 3, 5]) == ["--val-folds", "5", "--exclude-folds", "3", "--select-on", "val"]
    assert selection("inner", 5, [0, 1, 3, 5]) == ["--val-folds", "0", "--exclude-folds", "5", "--select-on", "val"]


def _fake_outputs(layout: Layout, folds: list[int]) -> None:
    """The files the stages read, made by hand: the builds' manifests, the models, the submissions."""
    for task in ("cls", "seg"):
        layout.shards(task).mkdir(parents=True)
        (layout.shards(task) / "manifest.json").write_text(f'{{"task": "{task}"}}')
    for fold in folds:
        for task in ("cls", "seg", "malignancy"):
            layout.run(fold, task).mkdir(parents=True)
            layout.model(fold, task).write_bytes(f"{task} {fold}".encode())
        layout.analysis(fold).mkdir(parents=True)
        for name in ("submission.csv", "submission.provenance.json", "detections.csv"):
            (layout.analysis(fold) / name).write_text(name)


def _identities(recipe_text: str, layout: Layout, tmp_path: Path) -> dict[str, str]:
    recipe = recipes.load(write_recipe(tmp_path / "r.toml", recipe_text))
    stages = [*shard_stages(recipe, layout), *fold_stages(recipe, layout, 0, [0, 1]),
              *fold_stages(recipe, layout, 1, [0, 1]), merge_stage(recipe, layout, [0, 1], plot=False)]
    return {stage.name: stage.identity(layout) for stage in stages}


def test_a_changed_flag_or_input_changes_the_identity_of_what_depends_on_it_and_nothing_else(tmp_path):
    layout = Layout(tmp_path / "data", tmp_path / "out")
    layout.data.mkdir()
    (layout.data / "annotations.csv").write_text("a")
    assert None in _identities(SMALL, layout, tmp_path).values()  # the models are not there yet
    _fake_outputs(layout, [0, 1])
    before = _identities(SMALL, layout, tmp_path)
    assert None not in before.values()
    changed = _identities(SMALL.replace("--mix 1 1 0", "--mix 1 1 1"), layout, tmp_path)
    assert {name for name in before if before[name] != changed[name]} == {"malignancy-fold0", "malignancy-fold1"}
    layout.model(1, "malignancy").write_bytes(b"another model")
    changed = _identities(SMALL, layout, tmp_path)
    assert {name for name in before if before[name] != changed[name]} == {"analyze-fold1"}
    layout.model(1, "malignancy").write_bytes(b"malignancy 1")
    (layout.data / "annotations.csv").write_text("b")  # the data changed: the builds and the analyses
    changed = _identities(SMALL, layout, tmp_path)
    assert {name for name in before if before[name] != changed[name]} == {"shard-cls", "shard-seg", "analyze-fold0",
                                                                          "analyze-fold1"}
    moved = Layout(tmp_path / "moved-data", tmp_path / "moved-out")
    os.rename(layout.data, moved.data)
    os.rename(layout.out, moved.out)
    assert _identities(SMALL, moved, tmp_path) == changed  # folders moved keep their stages


def _writer(layout: Layout) -> Stage:
    """A stage whose command writes one file, its output."""
    output = layout.out / "w" / "f.txt"
    return Stage("w", "merge", "evaluate", ["-c", "import sys; open(sys.argv[1], 'w').write('made')", str(output)], False, [],
                 output.parent, lambda: {}, output=output)


def test_a_finished_stage_is_done_in_a_moved_folder_and_not_once_its_output_is_replaced(tmp_path, capsys):
    layout = Layout(tmp_path / "data", tmp_path / "out")
    Runner(layout, [sys.executable], {"merge"}).run(_writer(layout))
    moved = Layout(tmp_path / "data", tmp_path / "moved")
    os.rename(layout.out, moved.out)
    assert Runner(moved, [sys.executable], set()).done(_writer(moved)) is not None
    (moved.out / "w" / "f.txt").write_text("replaced")
    assert Runner(moved, [sys.executable], set()).done(_writer(moved)) is None


def test_a_stage_of_another_kind_runs_only_once_those_before_it_are_done(tmp_path, capsys):
    """A SLURM fold task started before the builds finished refuses, naming the stage and the command that does it."""
    (tmp_path / "data").mkdir()
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--recipe",
            str(write_recipe(tmp_path / "r.toml"))]
    assert protocol.main([*args, "--stages", "folds", "--folds", "3"]) == 1
    assert capsys.readouterr().err == "error: stage shard-cls is not done: run it first (--stages shards)\n"
    assert not (tmp_path / "out").exists()


STOPPED = """
import sys, subprocess
from luna_dist.common import cli
from luna_dist.cv.runner import run_stage
with cli.interrupts():
    try:
        run_stage([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"])
    except KeyboardInterrupt:
        sys.exit(cli.interruption()[1])
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_stage_ends_with_the_protocol_however_it_is_stopped(signum, code, tmp_path):
    runner = subprocess.Popen([sys.executable, "-c", STOPPED], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    stage = int(runner.stdout.readline())
    os.kill(runner.pid, signum)
    assert runner.wait(timeout=60) == code
    deadline = time.monotonic() + 10
    while _alive(stage) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(stage)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_slurm_form_runs_the_same_stages_as_jobs(tmp_path, capsys):
    data = tmp_path / "data"
    for fold in (0, 2):
        (data / f"subset{fold}").mkdir(parents=True)
        (data / f"subset{fold}" / f"1.2.{fold}.mhd").write_text("")
    recipe = write_recipe(tmp_path / "r.toml")
    assert protocol.main(["--data", str(data), "--out", str(tmp_path / "out"), "--recipe", str(recipe),
                          "--slurm"]) == 0
    folder = tmp_path / "out" / "slurm"
    assert f"submit them with: bash {folder / 'submit.sh'}" in capsys.readouterr().out
    assert "#SBATCH --array=0,2\n" in (folder / "folds.sbatch").read_text()
    for name in ("shards.sbatch", "folds.sbatch", "merge.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(folder / name)]).returncode == 0
        if name != "submit.sh":
            line = (folder / name).read_text().strip().splitlines()[-1]
            command = shlex.split(line.replace("$SLURM_ARRAY_TASK_ID", "0"))
            assert command[:3] == [sys.executable, "-m", "luna_dist.protocol"]
            args = protocol.build_parser().parse_args(command[3:])
            assert args.stages == [name.split(".")[0]] and args.recipe == recipe
    assert "--launcher accelerate launch --multi_gpu" in " ".join(shlex.split((folder / "folds.sbatch").read_text()
                                                                             .splitlines()[-1]))
    assert "dependency=afterok" in (folder / "submit.sh").read_text()


# -- the whole protocol -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """4 CTs of the smallest synthetic shape (CT k in subset k), every positive candidate and 12 negatives of
    each: every stage of two folds in a minute or two."""
    data = tmp_path_factory.mktemp("protocol") / "data"
    make_dataset(data, n_cts=4, seed=2, shape=MIN_SHAPE)
    lines = (data / "candidates.csv").read_text().splitlines(keepends=True)
    negatives: dict[str, int] = {}
    kept = [lines[0]]
    for line in lines[1:]:
        uid, *_, label = line.strip().split(",")
        negatives[uid] = negatives.get(uid, 0) + (label == "0")
        if label == "1" or negatives[uid] <= 12:
            kept.append(line)
    (data / "candidates.csv").write_text("".join(kept))
    return data


def _command(data: Path, out: Path, recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "luna_dist.protocol", "--data", str(data), "--out", str(out), "--recipe", str(recipe),
            "--folds", "0", "1", *extra]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _records(out: Path) -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in (out / "stages").glob("*.json") if ".started" not in path.name}


def _ran(stdout: str) -> list[str]:
    """The stages a protocol run started, in order (each prints `NAME: COMMAND` as it starts)."""
    return [line.split(":", 1)[0] for line in stdout.splitlines()
            if ": " in line and line.split(": ", 1)[1].startswith(sys.executable)]


@pytest.mark.slow
def test_the_protocol_scores_each_fold_with_models_that_never_saw_it(small_data, tmp_path, capsys):
    out, recipe = tmp_path / "out", write_recipe(tmp_path / "recipe.toml")

    # The plan, before anything: every stage to run, each estimated.
    assert protocol.main(_command(small_data, out, recipe, "--plan")[3:]) == 0
    planned = capsys.readouterr().out
    for stage in ("shard-cls", "shard-seg", "cls-fold0", "analyze-fold1", "merge"):
        line = next(line for line in planned.splitlines() if line.startswith(stage + " "))
        assert "to run" in line and line.endswith("*"), line
    assert not (out / "stages").exists()

    # Stopped (SIGTERM, as a batch system's time limit) while training fold 1's classifier.
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(_command(small_data, out, recipe), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 300
        while not (out / "stages" / "cls-fold1.started.json").exists() and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert ("error: stopped by SIGTERM in stage cls-fold1: the stages finished are kept "
            f"({out / 'stages'}); rerun the same command to go on from there") in log.read_text()
    assert not _processes_writing(out)  # the stage's process group ended with the protocol
    finished = _records(out)
    assert set(finished) == {"shard-cls", "shard-seg", "cls-fold0", "seg-fold0", "malignancy-fold0", "analyze-fold0"}

    # Rerun: it goes on at the stage it was in; nothing finished is redone.
    second = _run(_command(small_data, out, recipe))
    assert _ran(second.stdout) == ["cls-fold1", "seg-fold1", "malignancy-fold1", "analyze-fold1", "merge"]
    assert all(f"{name}: done, skipped" in second.stdout for name in finished)
    assert {name: _records(out)[name] for name in finished} == finished

    # Every fold was analysed by models that neither trained nor were selected on it.
    manifest = json.loads((out / "shards" / "cls" / "manifest.json").read_text())
    for fold in (0, 1):
        series = manifest["folds"][str(fold)]["series"]
        summary = json.loads((out / f"fold{fold}" / "analysis" / "summary.json").read_text())
        for role, model in summary["produced_by"]["models"].items():
            assert fold not in model["provenance"]["trained_on"] and model["provenance"]["selected_on"] == [], role
            assert model["provenance"]["selection"] == "the last epoch"
            assert provenance.read(Path(model["path"])).seen(series) is None
        parts = provenance.read_sidecar(out / f"fold{fold}" / "analysis" / "submission.csv")
        assert [part.series for part in parts] == [tuple(series)]

    # The merged CPM is evaluate's of the merged submission, which is every fold's marks.
    score = json.loads((out / "merged" / "score.json").read_text())
    check = tmp_path / "check.json"
    assert evaluate.main(["--shards", str(out / "shards" / "cls"), "--folds", "0", "1", "--predictions",
                          str(out / "merged" / "submission.csv"), "--bootstrap", "100", "--json", str(check)]) == 0
    assert json.loads(check.read_text()) == score
    folds = [read_marks(out / f"fold{fold}" / "analysis" / "submission.csv") for fold in (0, 1)]
    joined = Marks(*(np.concatenate([getattr(m, key) for m in folds]) for key in ("series", "xyz", "probability")))
    series, nodules, excluded = fold_findings(manifest, [0, 1])
    assert froc(series, nodules, joined, excluded).cpm == pytest.approx(score["cpm"])
    assert score["scans"] == 2 and score["nodules"] > 0 and score["marks_counted"] > 0
    assert f"CPM {score['cpm']:.4f}" in second.stdout

    # What produced it, and the page.
    made = json.loads((out / "protocol.json").read_text())
    assert made["recipe"]["sha256"] == recipes.load(recipe).sha256 and made["folds"] == [0, 1]
    assert made["builds"]["cls"]["identity"] == manifest["identity"]
    assert all(made["stages"][name]["seconds"] > 0 for name in (*finished, "cls-fold1", "analyze-fold1", "merge"))
    assert made["models"]["1"]["nodule"]["provenance"]["trained_on"] == [0, 2, 3]
    table = np.sum([json.loads((out / f"fold{fold}" / "analysis" / "summary.json").read_text())["confusion"]["table"]
                    for fold in (0, 1)], axis=0)
    assert made["confusion"]["table"] == table.tolist()
    page = (out / "index.html").read_text()
    assert 'href="fold0/analysis/report.html"' in page and 'href="fold1/analysis/report.html"' in page
    assert f"CPM {score['cpm']:.3f}" in page

    # A changed flag of the analysis redoes the analyses only: their findings are reused (the batch size shapes
    # none of them), so the merge, whose inputs are unchanged, is not redone either.
    before = _records(out)
    write_recipe(recipe, SMALL.replace('[analyze]\nflags = ""', '[analyze]\nflags = "--batch-size 16"'))
    third = _run(_command(small_data, out, recipe))
    assert _ran(third.stdout) == ["analyze-fold0", "analyze-fold1"]
    after = _records(out)
    assert {name for name in before if before[name] != after[name]} == {"analyze-fold0", "analyze-fold1"}

    # Scoring a fold with a model that saw it is refused: by the analysis, and by the protocol.
    fold1 = out / "fold1"
    args = ["--data", str(small_data), "--shards", str(out / "shards" / "cls"), "--folds", "0", "--seg-model",
            str(fold1 / "seg" / "best.pt"), "--cls-model", str(fold1 / "cls" / "best.pt"), "--out", str(tmp_path / "x")]
    capsys.readouterr()
    assert analyze.main(args) == 1
    assert capsys.readouterr().err.startswith(f"error: the segmentation model --seg-model {fold1 / 'seg' / 'best.pt'} "
                                              "trained on fold 0, and 1 of its series is scored here")
    layout = Layout(small_data, out)
    classifier, *_, analysis = fold_stages(recipes.load(recipe), layout, 0, [0, 1, 2, 3])
    assert Runner(layout, [sys.executable], set()).done(classifier) is not None
    (out / "fold0" / "cls" / "best.pt").write_bytes((fold1 / "cls" / "best.pt").read_bytes())
    with pytest.raises(ProtocolError, match=rf"^{out / 'fold0' / 'cls' / 'best.pt'} trained on fold 0"):
        check_unseen(analysis, layout)
    assert Runner(layout, [sys.executable], set()).done(classifier) is None  # a model replaced by hand: trained again

    # A fold without series is named.
    assert protocol.main(["--data", str(small_data), "--out", str(out), "--recipe", str(recipe), "--folds", "7",
                          "--stages", "merge"]) == 1
    assert capsys.readouterr().err.endswith(f"error: --folds 7: the build {out / 'shards' / 'cls'} has no series in "
                                            "it (its folds with series: [0, 1, 2, 3])\n")


def _processes_writing(out: Path) -> list[int]:
    """Processes whose command line names `out`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(out).encode() in (entry / "cmdline").read_bytes() and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
