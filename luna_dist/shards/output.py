"""A build's output folder: who may write it, what it holds, and its work files."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from luna_dist.common.atomic import write_json
from luna_dist.common.processes import killed_with_parent
from luna_dist.shards.format import MANIFEST
from luna_dist.shards.options import BuildError, BuildOptions, OutputError
from luna_dist.shards.writer import WORK

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writer is not detected
    fcntl = None

LOCK = "lock"

LOCK_WAIT_S = 10.0
"""How long a build waits for another writer of its --out (workers of a killed build end within ms)."""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise BuildError(f"{path}: unreadable ({err}); remove it or build with --overwrite") from err


def check_output(options: BuildOptions, identity: dict) -> dict | None:
    """Refuse an output folder holding another build (or clear it with --overwrite); return its manifest, if any.

    A plan without a finished CT is replaced: it holds nothing to keep.
    """
    out, work = options.out, options.out / WORK
    manifest = read_json(out / MANIFEST)
    plan = read_json(work / "plan.json")
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


def is_complete(manifest: dict | None, series: dict[str, Path]) -> bool:
    """Nothing left to do: no CT failed, and no skipped series has found its .mhd since."""
    if manifest is None or manifest["failed"]:
        return False
    return not any(skipped["series_uid"] in series for skipped in manifest["skipped"])


def prepare_work(options: BuildOptions, identity: dict) -> None:
    work = options.out / WORK
    (work / "done").mkdir(parents=True, exist_ok=True)
    (work / "pos").mkdir(parents=True, exist_ok=True)
    remove_partials(options.out)
    (work / LOCK).write_text(f"{os.getpid()}\n")  # held by this build (`sole_writer`): a refused one names it
    write_json(work / "plan.json", {"identity": identity})


def remove_partials(out: Path) -> None:
    """Files a killed or failed build was writing: never part of the result."""
    for partial in list(out.glob("*.partial")) + list((out / WORK).rglob("*.partial")):
        partial.unlink(missing_ok=True)


@contextmanager
def sole_writer(out: Path):
    """Hold an exclusive lock on `.build/lock` while the build writes.

    Pool workers share the lock through the descriptor they inherit, so a rerun started
    while workers of a killed build still write waits for them to end, then refuses:
    their output never mixes into the new build. The holder writes its PID into the
    lock file once it starts writing (`prepare_work`), so a refused build can name it.
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


def end_with_parent() -> None:
    """Pool initializer: a worker ends when the build process dies, rather than writing on unseen."""
    killed_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None:  # elsewhere (and should the parent die before prctl): wait on its sentinel
        threading.Thread(target=exit_after, args=(parent,), daemon=True).start()


def exit_after(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(1)


def output_error(err: OSError, out: Path, series_uid: str | None = None) -> OutputError:
    """One line naming the path, and what a rerun does: finished CTs stay journaled."""
    done = len(list((out / WORK).glob("done/*.json")))
    during = f" while writing the shards of CT {series_uid}" if series_uid else ""
    fix = "free some space" if err.errno == errno.ENOSPC else "make it writable or choose another --out"
    return OutputError(f"{err.filename or out}: {err.strerror}{during}; nothing finished was lost "
                       f"({done} CT(s) done and kept): {fix}, then rerun the same command to resume")
