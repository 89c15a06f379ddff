"""The one training loop (`trainer`) and what it composes: its options (`options`), checkpoints (`checkpoint`),
run folder (`run_folder`), logs (`run_log`), metrics (`metrics`) and the tasks (`tasks`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "Trainer": "luna_dist.training.trainer",
    "parse_args": "luna_dist.training.options",
    "TASKS": "luna_dist.training.tasks",
    "Task": "luna_dist.training.tasks",
})
