"""The documentation's flag tables are the commands' own, and every page it links to exists."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from luna_dist import docs

ROOT = Path(__file__).resolve().parents[1]


def test_flag_tables_are_those_of_the_parsers():
    """docs/*.md carry each command's flags as its parser describes them (python -m luna_dist.docs writes them)."""
    assert docs.main(["--check"]) == 0


def test_flag_tables_hold_no_path_of_this_checkout():
    """A default shown as this checkout's path would make the tables differ, and --check fail, in every other one."""
    modules = {module for page in (ROOT / "docs").glob("*.md") for module in docs.MARKER.findall(page.read_text())}
    assert "luna_dist.protocol" in {module for _, module, *_ in modules}
    for _, module, *_ in modules:
        assert str(ROOT) not in docs.table(module), module


@pytest.mark.parametrize("module", ["luna_dist.shard", "luna_dist.train", "luna_dist.analyze", "luna_dist.evaluate",
                                    "luna_dist.synth", "luna_dist.bench", "luna_dist.rehearsal", "luna_dist.protocol",
                                    "luna_dist.doctor"])
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
    """Pages, the pictures they show and the notebook they link to."""
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png|ipynb))", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"


def test_every_command_of_the_gpu_benchmark_script_parses():
    """launch/bench_gpu.sh runs only where a GPU is lent: a flag it misspells would cost that rare run. Each command
    ends where the shell's `||`, `&&`, `;` or `|` begins another."""
    script = (ROOT / "launch" / "bench_gpu.sh").read_text().replace("\\\n", " ")
    commands = [line.split("python -m ", 1)[1] for line in script.splitlines()
                if "python -m luna_dist." in line and not line.lstrip().startswith("#")]
    modules = [command.split()[0] for command in commands]
    assert len(commands) >= 4 and "luna_dist.doctor" in modules and "luna_dist.bench" in modules
    for command in commands:
        words = shlex.split(command, posix=True)
        module, *args = words[:next((n for n, word in enumerate(words) if word in ("||", "&&", ";", "|")), None)]
        docs._parser(module).parse_args(args)  # exits (SystemExit) on a flag its parser does not take


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _resolves(dotted: str) -> bool:
    """A dotted name the docs give: a module, then attributes of it."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


FILE_SUFFIXES = {"safetensors", "json", "csv", "pt", "bin", "tar", "png", "md", "html", "raw", "mhd", "gz"}
"""What follows a name that is a file's, not a module's (`model.safetensors`)."""


def test_the_docs_name_modules_that_exist():
    """After the modules moved into packages, a page naming `luna_dist.shard_format`, `stream.py` or
    `shard_io.read_manifest` sends a reader nowhere: every dotted name and file the pages give exists."""
    gone = ("shard_format", "shard_tar", "shard_io", "shard_inputs", "shard_write", "shard_plan", "bench_data",
            "bench_train", "ct_files", "stream", "model")
    files = {path.relative_to(ROOT).as_posix() for path in ROOT.glob("**/*.py") if ".venv" not in path.parts}
    for page in _pages():
        text = page.read_text()
        for dotted in re.findall(r"\b(luna_dist(?:\.\w+)+)", text):
            if any(part.isupper() for part in dotted.split(".")):  # a placeholder: luna_dist.NAME
                continue
            assert _resolves(dotted.rstrip(".")), f"{page.name} names {dotted}, which does not exist"
        for named in re.findall(r"\b([\w/]+\.py)\b", text):
            if re.search(r"(^|[/._])[A-Z][A-Z0-9]+(?=[/._])", named):  # a placeholder: tasks/NAME.py, NAME_samples.py
                continue
            assert any(file == named or file.endswith("/" + named) for file in files), \
                f"{page.name} names {named}, which does not exist"
        for old in gone:
            for match in re.finditer(rf"(?<![\w./-]){old}\.(\w+)", text):
                assert match[1] in FILE_SUFFIXES, f"{page.name} names the module {old} ({match[0]}), now gone"


@pytest.mark.slow
def test_the_library_page_runs_as_written(tmp_path):
    """docs/library.md's example is the library's tested use from Python: run as a script, it goes from synthetic
    data to shards, a trained classifier, an analysed CT and LUNA16's score."""
    page = (ROOT / "docs" / "library.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    assert len(blocks) == 1
    (tmp_path / "example.py").write_text(blocks[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    assert (tmp_path / "library-example" / "runs" / "cls" / "best.pt").is_file()
    assert 0 <= float(printed[-1]) <= 1  # the CPM
