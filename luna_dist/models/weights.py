"""The networks' weights: initialised, and loaded from files that cannot run code."""

import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
    """Kaiming init scaled for ReLU, so activations keep their size through the layers."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
            # fan_out = output units times kernel elements, as kaiming's mode="fan_out".
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            bound = 1 / math.sqrt(fan_out)
            # A small normal bias init: normal_ takes (mean, std), so this is
            # mean -bound, std bound, as in the book (not a uniform in ±bound).
            nn.init.normal_(module.bias, -bound, bound)


class WeightsError(ValueError):
    """A file that holds no weights of the model asked for; the message names the file and what it holds."""


_WEIGHTS_HINT = "pass a best.pt, a run's state/ folder or its model.safetensors"


def load_tensors(file: Path):
    """What a torch file holds, read by torch's weights-only unpickler: tensors, numbers, strings and containers of
    them, never code. WeightsError naming the file when it holds other pickled objects; ValueError when it is no
    torch file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message suggests weights_only=False, which would run the code
        with open(file, "rb") as f:  # a torch file is a zip archive holding a pickle, or (before torch 1.6) a pickle
            zipped = zipfile.is_zipfile(f)
            f.seek(0)
            pickled = f.read(1) == pickle.PROTO
        if not (zipped or pickled):
            raise ValueError("not a torch file") from None
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        raise WeightsError(f"{file}: holds pickled Python objects besides tensors{f' ({found[1]})' if found else ''}; "
                           "refused: loading them could run code") from None


def load_weights(path: Path) -> dict:
    """Model weights from a best-model file (best.pt), a saved training state folder or its model.safetensors.

    FileNotFoundError when there is no such file; WeightsError when the file is damaged
    (truncated, not a checkpoint at all), holds something else (an optimizer state) or holds
    pickled objects besides tensors (refused: unpickling them could run code).
    """
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors; {_WEIGHTS_HINT}" if path.is_dir()
                                else f"{path}: checkpoint not found")
    try:
        checkpoint = {"model": load_file(file)} if file.suffix == ".safetensors" else load_tensors(file)
    except WeightsError:
        raise
    except Exception as err:  # torch and safetensors each word a damaged file their own way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{file}: not a readable checkpoint ({reason[:200]}); truncated or another kind of "
                           f"file? {_WEIGHTS_HINT}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        held = (", ".join(sorted(map(str, checkpoint))[:6]) if isinstance(checkpoint, dict)
                else type(checkpoint).__name__)
        raise WeightsError(f"{file}: holds no model weights (it holds {held}); {_WEIGHTS_HINT}")
    _refuse_nonfinite(file, checkpoint["model"])
    return checkpoint["model"]


def _refuse_nonfinite(file: Path, weights: dict) -> None:
    """WeightsError naming the first tensor (in the file's order) holding a NaN or an infinity: such weights
    give every input a probability of NaN, which nothing downstream may turn into a finding or a score."""
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(f"{file}: {name} holds {count:,} of its {tensor.numel():,} values that are not finite "
                               "numbers (NaN or infinity): the weights of a diverged model; pass weights saved "
                               "before it diverged")


def load_into(model: nn.Module, path: Path) -> nn.Module:
    """`model` with the weights of `path` (see `load_weights`); WeightsError naming the file when they are
    another network's."""
    weights = load_weights(path)
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    resized = [name for name in expected if name in weights and weights[name].shape != expected[name].shape]
    if missing or unexpected or resized:
        problems = [f"{len(names)} {what}, e.g. {names[0]}" for names, what in
                    ((missing, "of its tensors missing"), (unexpected, "unexpected"), (resized, "of another shape"))
                    if names]
        raise WeightsError(f"{path}: not weights of a {type(model).__name__} ({'; '.join(problems)})")
    model.load_state_dict(weights)
    return model
