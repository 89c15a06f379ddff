"""A protocol's recipe: each stage's flags, as its command takes them, in a TOML file of the repository.

    description = "..."
    select = "last"                       # how each fold's models keep their epoch: "last" or "inner"
    [shard.cls]    flags = "--workers 16"  # python -m luna_dist.shard
    [shard.seg]    flags = "..."           # python -m luna_dist.shard --task seg
    [train.cls]    flags = "--epochs 10 --epoch-samples 200000 --balanced 1 --augment"
    [train.seg]    flags = "..."           # launch/train.py --task seg
    [train.malignancy] flags = "..."       # launch/train.py --task malignancy, fine-tuned from the fold's classifier
    [analyze]      flags = "..."           # python -m luna_dist.analyze
    [evaluate]     flags = "..."           # python -m luna_dist.evaluate, of the merged submission

`select`: "last" trains fold K's models on the other folds, validates them on fold K for
display and keeps their last epoch (`--val-folds K --select-on last`); "inner" keeps the
best epoch on the next fold J, fold K left out (`--val-folds J --exclude-folds K`). Either
way no model is chosen on the fold it scores. The flags the protocol sets (where a stage
reads and writes, which folds) are refused in a recipe, naming them; every section's flags
are parsed by its command's own parser when the recipe is read, so a misspelt flag costs
seconds, not a stage.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS = ("shard.cls", "shard.seg", "train.cls", "train.seg", "train.malignancy", "analyze", "evaluate")
SELECT = ("last", "inner")

OWNED = {
    "shard": {"--data", "--out", "--task", "--plan", "--overwrite"},
    "train": {"--task", "--shards", "--out", "--run-name", "--val-folds", "--exclude-folds", "--select-on", "--resume",
              "--overwrite", "--finetune", "--checkpoint", "--eval-only", "--metrics-json"},
    "analyze": {"--data", "--ct", "--shards", "--folds", "--series", "--seg-model", "--cls-model", "--mal-model",
                "--candidates", "--out"},
    "evaluate": {"--annotations", "--excluded", "--seriesuids", "--shards", "--folds", "--predictions", "--merged",
                 "--json", "--plot"},
}
"""The flags the protocol gives each command itself: where it reads and writes, and which folds."""


class RecipeError(Exception):
    """A recipe that cannot be used; the message names the file, the section and the flag."""


@dataclass(frozen=True)
class Recipe:
    path: Path
    text: str
    select: str
    description: str = ""
    flags: dict[str, tuple[str, ...]] = field(default_factory=dict)  # section -> its flags, split as a shell would

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def section(self, name: str) -> list[str]:
        return list(self.flags.get(name, ()))


def load(path: Path) -> Recipe:
    """The recipe at `path`, its keys checked; RecipeError naming the file and what is wrong."""
    try:
        text = Path(path).read_text()
        data = tomllib.loads(text)
    except OSError as err:
        raise RecipeError(f"--recipe {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"--recipe {path}: not TOML ({err})") from None
    unknown = sorted(set(data) - {"description", "select", "shard", "train", "analyze", "evaluate"})
    if unknown:
        raise RecipeError(f"--recipe {path}: unknown key {unknown[0]!r}; a recipe holds description, select and the "
                          f"sections {', '.join(SECTIONS)}")
    select = data.get("select", "last")
    if select not in SELECT:
        raise RecipeError(f"--recipe {path}: select = {select!r}; choose {' or '.join(map(repr, SELECT))}")
    flags = {}
    for name in SECTIONS:
        table = _table(data, name, path)
        if table is None:
            continue
        if set(table) - {"flags"} or not isinstance(table.get("flags", ""), str):
            raise RecipeError(f"--recipe {path}: [{name}] holds one key, flags = \"...\" (the command's flags)")
        try:
            flags[name] = tuple(shlex.split(table.get("flags", "")))
        except ValueError as err:
            raise RecipeError(f"--recipe {path}: [{name}] flags: {err}") from None
        owned = sorted({flag.split("=", 1)[0] for flag in flags[name]} & OWNED[name.split(".")[0]])
        if owned:
            raise RecipeError(f"--recipe {path}: [{name}] gives {owned[0]}, which the protocol sets itself (where "
                              "each stage reads and writes, and which folds it trains, chooses and scores on)")
    return Recipe(Path(path), text, select, str(data.get("description", "")), flags)


def _table(data: dict, name: str, path: Path) -> dict | None:
    group, _, member = name.partition(".")
    table = data.get(group)
    if table is not None and member:
        if not isinstance(table, dict) or set(table) - {"cls", "seg", "malignancy"}:
            raise RecipeError(f"--recipe {path}: [{group}] holds the tables "
                              + ", ".join(f"[{s}]" for s in SECTIONS if s.startswith(group + ".")))
        table = table.get(member)
    if table is not None and not isinstance(table, dict):
        raise RecipeError(f"--recipe {path}: {name} is not a table: write [{name}] then flags = \"...\"")
    return table


def check(recipe: Recipe, parsers: dict[str, Callable[[list[str]], argparse.Namespace]]) -> dict:
    """Each section's flags parsed by its command's parser (`parsers`: section -> a function that parses the
    stage's whole command line, the protocol's flags included); the parsed arguments by section. RecipeError
    with the parser's own message where one refuses them."""
    parsed = {}
    for name in SECTIONS:
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                parsed[name] = parsers[name](recipe.section(name))
        except SystemExit:
            reason = said.getvalue().strip().splitlines()[-1:] or ["refused"]
            raise RecipeError(f"--recipe {recipe.path}: [{name}] flags {shlex.join(recipe.section(name))!r}: "
                              f"{reason[0].split('error: ', 1)[-1]}") from None
    return parsed
