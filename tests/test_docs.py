"""The documentation's flag tables are the commands' own, and every page it links to exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from luna_dist import docs

ROOT = Path(__file__).resolve().parents[1]


def test_flag_tables_are_those_of_the_parsers():
    """docs/*.md carry each command's flags as its parser describes them (python -m luna_dist.docs writes them)."""
    assert docs.main(["--check"]) == 0


@pytest.mark.parametrize("module", ["luna_dist.shard", "luna_dist.train", "luna_dist.analyze", "luna_dist.evaluate",
                                    "luna_dist.synth", "luna_dist.bench", "luna_dist.rehearsal"])
def test_every_command_has_its_table_and_every_flag_is_in_it(module):
    pages = [p for p in (ROOT / "docs").glob("*.md") if f"<!-- flags: {module} -->" in p.read_text()]
    assert len(pages) == 1, f"{module}: one page holds its flags, found {pages}"
    parser = docs._parser(module)
    text = pages[0].read_text()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag != "-h" and flag != "--help":
                assert f"`{flag}`" in text, f"{flag} of {module} is not in {pages[0].name}"


def test_links_between_pages_point_to_pages_that_exist():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"


def test_every_command_of_the_gpu_benchmark_script_parses():
    """launch/bench_gpu.sh runs only where a GPU is lent: a flag it misspells would cost that rare run."""
    script = (ROOT / "launch" / "bench_gpu.sh").read_text().replace("\\\n", " ")
    commands = [line.split("python -m ", 1)[1] for line in script.splitlines()
                if "python -m luna_dist." in line and not line.lstrip().startswith("#")]
    assert len(commands) >= 3
    for command in commands:
        module, *args = shlex.split(command)
        docs._parser(module).parse_args(args)  # exits (SystemExit) on a flag its parser does not take
