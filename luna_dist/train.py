"""`python -m luna_dist.train` and `launch/train.py`: train a LUNA16 model on a shard set.

    accelerate launch launch/train.py --shards shards/NAME            # per accelerate config
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 launch/train.py --shards ...
    python -m luna_dist.train --shards shards/NAME                    # one process

The loop is `luna_dist.training.trainer`, its flags `luna_dist.training.options`; this module turns what
stops a run into one line and an exit code.
"""

from __future__ import annotations

import sys

import torch

from luna_dist.common import cli
from luna_dist.data.worker_watch import WorkerLost
from luna_dist.devices.start import DeviceCheckError
from luna_dist.models.weights import WeightsError
from luna_dist.shards.format import ShardSetError
from luna_dist.training.checkpoint import CheckpointError, StateError
from luna_dist.training.options import build_parser, parse_args
from luna_dist.training.run_folder import RunFolderError
from luna_dist.training.run_log import LoggingError
from luna_dist.training.trainer import Diverged, Trainer

__all__ = ["build_parser", "main"]  # build_parser: for the flag tables of docs/ (`luna_dist.docs`)


def own_line(err: Exception) -> str:
    """The error's own message: one raised in a DataLoader worker arrives with the worker's traceback."""
    message = str(err)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = parse_args(argv)
    trainer = None
    try:
        with cli.interrupts():
            trainer = Trainer(args)
            trainer.run()
    except (ShardSetError, FileNotFoundError, CheckpointError, StateError, WeightsError, RunFolderError, Diverged,
            LoggingError, DeviceCheckError) as err:
        return cli.fail(own_line(err))
    except (KeyboardInterrupt, WorkerLost) as err:
        # A Ctrl-C or SIGTERM to the whole process group may end a data worker before the loop sees it.
        if isinstance(err, WorkerLost) and not cli.interrupted():
            if trainer is None:
                return cli.fail(str(err))
            rank = f"rank {trainer.accelerator.process_index}'s " if trainer.accelerator.num_processes > 1 else ""
            return cli.fail(trainer.stopped(f"{rank}{err}"))
        stopped, code = cli.interruption()
        if trainer is not None and trainer.accelerator.is_main_process:
            cli.fail(trainer.stopped(stopped))
        return code
    except RuntimeError as err:
        if trainer is None or (message := trainer.lost_peers(err)) is None:
            raise
        return cli.fail(message)
    finally:
        if trainer is not None:
            trainer.close()
        elif torch.distributed.is_initialized():
            # A Trainer that failed to start still joined the process group; left to the
            # interpreter's exit, gloo's threads can abort the process.
            torch.distributed.destroy_process_group()
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
