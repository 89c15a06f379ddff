"""The protocol's stages run on this machine, one after another, each a process of its own.

A stage is skipped when `stages/NAME.json` holds its identity as it is now (`Stage.identity`) and
its output is still the one it wrote (a model replaced by hand is trained again); otherwise its
command runs, under the launcher for training and the analysis (so each uses
every device the launcher starts processes for), and the record is written once it exits 0.
Before it starts, `stages/NAME.started.json` notes the identity it runs with: a stage found
started with the same identity is continued (training `--resume`, a build or an analysis
rerun as it was, each of which resumes itself), one started with another is begun again
(training and builds with `--overwrite`).

What we start ends with us: each stage runs in a session of its own, so that a Ctrl-C or a
SIGTERM of the protocol reaches it once, forwarded to its whole process group (a launcher,
its ranks, their data workers), and the protocol waits for it to stop, which leaves it
resumable; a protocol killed outright has its stage sent SIGTERM by the kernel.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from luna_dist.common import cli
from luna_dist.common.atomic import write_json
from luna_dist.common.processes import killed_with_parent
from luna_dist.cv.stages import TASKS, Layout, Stage
from luna_dist.models import provenance
from luna_dist.models.weights import WeightsError
from luna_dist.shards.format import sha256_file
from luna_dist.training import run_folder
from luna_dist.training.checkpoint import newest_state

GRACE_SECONDS = 60.0
"""How long a stage may take to stop once told (a training saving nothing more, ranks ending) before it is
killed."""


class ProtocolError(Exception):
    """The protocol cannot go on; the message names the stage or file and what to do."""


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # damaged: the stage is not known to be done, and runs again


class Runner:
    """Runs stages of `layout` with `launcher` (a command line), only those of `kinds` (the others must be done)."""

    def __init__(self, layout: Layout, launcher: list[str], kinds: set[str]):
        self.layout, self.launcher, self.kinds = layout, launcher, kinds
        self.current: Stage | None = None  # the stage running, for the line of an interruption

    def done(self, stage: Stage, identity: str | None = None) -> dict | None:
        """The record of `stage` when it finished with its identity as it is now (`identity`, computed when not
        given) and its output (a model, a manifest, a submission) is the one it wrote; else None."""
        identity = identity or stage.identity(self.layout)
        record = read_record(self.layout.record(stage.name))
        if identity is None or record is None or record.get("identity") != identity:
            return None
        wrote, now = record.get("output"), _output(stage.output)  # by bytes: a folder moved keeps its stages
        return record if (wrote and wrote.get("sha256")) == (now and now["sha256"]) else None

    def run(self, stage: Stage) -> dict:
        """Skip `stage` when done, else run it; its record. ProtocolError when it may not run here or fails."""
        inputs = stage.inputs()
        identity = None if inputs is None else stage.identity(self.layout, inputs)
        if (record := self.done(stage, identity)) is not None:
            print(f"{stage.name}: done, skipped", flush=True)
            return record
        if stage.kind not in self.kinds:
            earlier = read_record(self.layout.record(stage.name))
            state = "not done" if earlier is None else "done with other inputs than it has now"
            raise ProtocolError(f"stage {stage.name} is {state}: run it first (--stages {stage.kind}"
                                + (f" --folds {stage.fold}" if stage.fold is not None else "") + ")")
        if identity is None:
            missing = ", ".join(str(path) for path in stage.reads if not path.exists()) or "an input"
            raise ProtocolError(f"stage {stage.name} cannot start: {missing} is not there; run the stages before it")
        if stage.name.startswith("analyze-"):
            check_unseen(stage, self.layout)
        argv = [*(self.launcher if stage.launched else [sys.executable]), *stage.command, *self._go_on(stage, identity)]
        self.layout.record(stage.name).parent.mkdir(parents=True, exist_ok=True)
        if stage.kind == "merge":
            stage.writes.mkdir(parents=True, exist_ok=True)  # evaluate writes its files into it
        write_json(self.layout.record(stage.name, started=True), {"identity": identity})
        print(f"{stage.name}: {shlex.join(argv)}", flush=True)
        self.current, began, started = stage, time.perf_counter(), _now()
        code = run_stage(argv)
        self.current = None
        if code != 0:
            raise ProtocolError(f"stage {stage.name} failed (exit {code}; its error is above): fix what it names and "
                                "rerun the same command, which skips the stages finished")
        seconds = time.perf_counter() - began
        record = {"stage": stage.name, "identity": identity, "inputs": inputs, "command": shlex.join(argv),
                  "launcher": shlex.join(self.launcher) if stage.launched else None, "started": started,
                  "finished": _now(), "seconds": round(seconds, 1),
                  "output": _output(stage.output)}
        write_json(self.layout.record(stage.name), record)
        print(f"{stage.name}: done in {seconds:.0f} s", flush=True)
        return record

    def _go_on(self, stage: Stage, identity: str) -> list[str]:
        """How a stage's command goes on from what an earlier start left: a training with --resume (same identity,
        a state saved) or --overwrite (anything else there); a build with --overwrite when it was started with
        other inputs."""
        same = (read_record(self.layout.record(stage.name, started=True)) or {}).get("identity") == identity
        module = stage.command[1]
        if module == "luna_dist.train":
            if same and newest_state(stage.writes) is not None:
                return ["--resume"]
            return ["--overwrite"] if run_folder.started(stage.writes) else []
        if module == "luna_dist.shard" and not same and stage.writes.exists():
            return ["--overwrite"]
        return []


def run_stage(argv: list[str]) -> int:
    """Run a stage's command in a session of its own and wait for it; a Ctrl-C or SIGTERM meanwhile is passed on to
    its process group, which is given GRACE_SECONDS to stop (then killed), and raised again."""
    process = subprocess.Popen(argv, start_new_session=True, preexec_fn=partial(killed_with_parent, signal.SIGTERM))
    try:
        return process.wait()
    except KeyboardInterrupt:
        signum = signal.SIGTERM if cli.interruption()[1] == cli.EXIT_TERMINATED else signal.SIGINT
        _signal_group(process.pid, signum)
        try:
            process.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        raise


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # it ended on its own


def check_unseen(stage: Stage, layout: Layout) -> None:
    """ProtocolError naming the model and the fold when one of fold K's three models trained or was selected on
    one of its series, or records nothing (the protocol's own models always say what they saw)."""
    manifest = json.loads((layout.shards("cls") / "manifest.json").read_text())
    scored = manifest["folds"][str(stage.fold)]["series"]
    for task in TASKS:
        path = layout.model(stage.fold, task)
        try:
            record = provenance.read(path)
        except WeightsError as err:
            raise ProtocolError(str(err)) from None
        if record is None or record.unknown is not None:
            raise ProtocolError(f"{path} does not record every fold it saw, so fold {stage.fold} is not scored with "
                                f"it: remove {path.parent} to train it again")
        if (problem := provenance.leak(str(path), record, scored)) is not None:
            raise ProtocolError(problem)


def _output(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return {"path": str(path), "sha256": sha256_file(path)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
