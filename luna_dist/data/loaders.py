"""DataLoaders over the pipelines: workers started from a fork server, watched, reusing their batches' memory."""

from __future__ import annotations

import functools
import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType

import webdataset as wds

from luna_dist.data.batch_memory import PooledLoader, leased
from luna_dist.data.streams import ShardSet, TrainStreamConfig, train_pipeline, val_pipeline
from luna_dist.data.worker_watch import WORKER_TIMEOUT, Beats, WatchedLoader


def train_loader(shards: ShardSet, config: TrainStreamConfig, epoch: int, collate: Callable[[list[dict]], tuple],
                 pin_memory: bool = False, worker_timeout: float = WORKER_TIMEOUT) -> PooledLoader:
    """The batches of one epoch for this rank: exactly `config.steps` of them."""
    return pooled_loader(train_pipeline(shards, config, epoch, collate), config.num_workers, pin_memory,
                         worker_timeout)


def pooled_loader(pipeline: wds.DataPipeline, num_workers: int, pin_memory: bool,
                  worker_timeout: float = WORKER_TIMEOUT, **loader_options) -> PooledLoader:
    """A pipeline's batches through `num_workers` DataLoader workers, which reuse the shared memory of the
    batches the training process has let go of (`luna_dist.data.batch_memory`); a worker that dies, or shows no
    sign of life for `worker_timeout` seconds, stops the reading naming it (`luna_dist.data.worker_watch`)."""
    if num_workers:
        beats = Beats(num_workers)
        loader_options = {"multiprocessing_context": worker_start(), **loader_options, "worker_init_fn": beats.start}
    loader = wds.WebLoader(wds.DataPipeline(pipeline, leased), batch_size=None, num_workers=num_workers,
                           pin_memory=pin_memory, **loader_options)
    return PooledLoader(WatchedLoader(loader, beats, worker_timeout) if num_workers else loader)


@functools.cache
def worker_start() -> multiprocessing.context.BaseContext:
    """How DataLoader workers start: never by forking the process that reads through them.

    The training process runs threads (TensorBoard's writers, tqdm's monitor, the DataLoader's
    own queue feeders and pin thread, C++ threads that call into Python), and a fork copies
    whatever lock one of them holds at that instant into a child that has none of them.
    Python 3.11.7 and older deadlock there on the interpreter's own lock (CPython
    gh-112275): a validation worker that never started, its rank waiting on it for ever.
    Where the platform forks (Linux), the workers are forked from a server process instead,
    started once, single-threaded, with the readers and Blosc2 imported; elsewhere (macOS,
    Windows) the platform's own `spawn`. Either way a worker runs the main module again, so
    a script that reads shards through these loaders needs `if __name__ == "__main__":`.
    The server and its workers end with the process that started them (`luna_dist.data.fork_server`).
    """
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method != "fork":
        return multiprocessing.get_context(method)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["luna_dist.data.fork_server", *_server_imports(sys.modules["__main__"])])
    return context


def _server_imports(main: ModuleType) -> list[str]:
    """What the fork server imports, so that the main module, run again in each worker, finds its imports
    done: every luna_dist module the process that starts the workers has imported (a script such as
    `launch/train.py`, a notebook, or `python -m X`'s own imports), and Blosc2 (the readers import it when
    they meet an lz4 member). Never X itself: runpy warned in each worker that X was imported before it
    ran as the main module (and ran twice). A package's `__main__` is not run again, as spawn leaves it out."""
    name = getattr(getattr(main, "__spec__", None), "name", None)
    imported = {module for module in sys.modules if module.startswith("luna_dist.")}
    return sorted({"blosc2", *imported} - {name})


def val_loader(shards: ShardSet, folds: Iterable[int], batch_size: int, num_workers: int, labels: tuple[str, ...],
               batcher: Callable[..., Iterator], pin_memory: bool = False,
               worker_timeout: float = WORKER_TIMEOUT) -> PooledLoader:
    return pooled_loader(val_pipeline(shards, folds, batch_size, labels, batcher), num_workers, pin_memory,
                         worker_timeout)
