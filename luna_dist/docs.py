"""`python -m luna_dist.docs [--check]`: the flag tables of docs/, written from the commands' own parsers.

A page holds a command's table between the lines `<!-- flags: luna_dist.NAME -->` and
`<!-- end flags -->`; this writes it there from the command's `build_parser()`, so each
flag is described once, in its `help`, and the pages cannot drift from the code.
`--check` changes nothing and fails, naming the page, where a table is out of date (a
test runs it).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKER = re.compile(r"(<!-- flags: (luna_dist\.\w+) -->\n)(.*?)(<!-- end flags -->)", re.DOTALL)


def _parser(module: str) -> argparse.ArgumentParser:
    built = importlib.import_module(module).build_parser()
    return built[0] if isinstance(built, tuple) else built


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(f"`{flag}`" for flag in action.option_strings)
    else:
        name = f"`{action.dest}`"
    if action.choices is not None:
        name += " " + "|".join(f"`{choice}`" for choice in action.choices)
    elif action.nargs != 0 and action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
        name += f" {metavar}"
    default = "" if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
        or action.nargs == 0 \
        else f"`{' '.join(map(str, action.default)) if isinstance(action.default, list) else action.default}`"
    text = (action.help or "") % {**vars(action), "default": action.default, "prog": ""} if action.help else ""
    return f"| {_cell(name)} | {_cell(default)} | {_cell(text)} |"


def table(module: str) -> str:
    """The markdown table of a command's flags, its argument groups as sections."""
    parser = _parser(module)
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        if group.title not in ("positional arguments", "options", "optional arguments"):
            lines.append(f"| **{_cell(group.title)}** | | |")
        lines += [_row(action) for action in actions]
    return "\n".join(lines) + "\n"


def refreshed(text: str) -> str:
    return MARKER.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; fail where a table is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        if (new := refreshed(text)) != text:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"error: out of date: {', '.join(map(str, stale))}; run python -m luna_dist.docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
