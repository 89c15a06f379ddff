"""What differs per model, for the one training loop of `luna_dist.training.trainer`: one module per task.

    cls          tasks/classifier.py    nodule or not, LunaModel on 32x48x48 chunks
    malignancy   tasks/malignancy.py    malignant or benign, the classifier fine-tuned
    seg          tasks/segmentation.py  nodule pixels, a 2-D UNet on 7-slice stacks

A task (`base.Task`) names its sample module, its model and optimizer, its kinds of
training sample and their shares, what it records per sample, the metrics, log lines and
report made of those records and its best-model rules; docs/adding-a-task.md walks through
a new one. `SHARED_FLAGS` says which tasks use the loop's flags that not every task uses.
"""

from luna_dist.training.tasks.base import Task
from luna_dist.training.tasks.classifier import NoduleClassifier
from luna_dist.training.tasks.malignancy import Malignancy
from luna_dist.training.tasks.segmentation import Segmentation

TASKS: dict[str, type[Task]] = {task.name: task for task in (NoduleClassifier, Malignancy, Segmentation)}
SHARED_FLAGS = {"--momentum": ("cls", "malignancy")}
"""Flags of the loop that some tasks use: given with another --task, they are refused."""

__all__ = ["TASKS", "SHARED_FLAGS", "Task"]
