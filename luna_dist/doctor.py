"""`python -m luna_dist.doctor`: check this machine's device before trusting it with a run, and say how to feed it.

    python -m luna_dist.doctor                        # the device accelerate picks, the precision training would
    python -m luna_dist.doctor --device mps --json doctor.json --shards shards/synthetic

Four checks (docs/doctor.md): 1. the machine (torch, CUDA/cuDNN or MPS, the OS, the device and its
memory, the cores, /dev/shm, the Accelerate configuration, the precision); 2. every operation the
models and the augmentation run, forward and backward, against the CPU; 3. LunaModel and the UNet
against the CPU: forward, backward, an optimizer step, layer by layer; 4. the device's training
samples/s per task, a data worker's, and the --num-workers and --batch-size to use. Exit 0 when every
check passes, 1 naming each that failed; a table on stdout, and with --json the same as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from luna_dist.common import cli
from luna_dist.common.atomic import write_json
from luna_dist.devices import machine, numbers, ops, speed
from luna_dist.models.classifier import LunaModel
from luna_dist.models.unet import SegmentationModel
from luna_dist.shards.format import ShardSetError

if TYPE_CHECKING:
    from luna_dist.data.streams import ShardSet

SMALL_BUILD_CTS = 2
"""CTs of the build made for the worker's rate when no --shards are given: a worker's samples/s depends on the
samples' size and codec, not on how many there are."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="the device to check: cpu, cuda, cuda:N, mps (default: the one accelerate "
                                         "picks, as training would)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                        help="the mixed precision to check besides float32 (default: the one training would choose: "
                             "ACCELERATE_MIXED_PRECISION, else accelerate's default config file)")
    parser.add_argument("--shards", type=Path,
                        help="a shard build whose data worker's rate to measure (default: a small build of "
                             f"{SMALL_BUILD_CTS} synthetic CTs, made and removed)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per task and batch size")
    parser.add_argument("--worker-samples", type=int, default=3000, help="samples a data worker is timed on")
    parser.add_argument("--skip-speed", action="store_true",
                        help="leave out check 4, the slowest (it times every task and a data worker)")
    parser.add_argument("--json", type=Path, help="also write every figure and verdict here")
    return parser


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """--device, or the one accelerate picks; parser.error where this machine has no such device."""
    if not name:
        from accelerate import PartialState

        return PartialState().device
    try:
        device = torch.device(name)
    except RuntimeError as err:
        parser.error(f"--device {name}: {err}")
    present = {"cpu": lambda: True, "cuda": lambda: (device.index or 0) < torch.cuda.device_count(),
               "mps": torch.backends.mps.is_available}
    if device.type not in present or not present[device.type]():
        parser.error(f"--device {name}: no such device here (CUDA devices: {torch.cuda.device_count()}, MPS "
                     f"{'available' if torch.backends.mps.is_available() else 'not available'})")
    return device


# -- the checks ------------------------------------------------------------------------------------------------------
def check_machine(device: torch.device, precision: str) -> dict:
    facts = machine.facts(device, precision)
    return {"passed": True, "facts": facts, "notes": [facts["precision_warning"]] if facts["precision_warning"] else []}


def check_operations(device: torch.device, precision: str) -> dict:
    results = ops.check_ops(device, [precision])
    failed = [r for r in results if r.failed]
    return {"passed": not failed, "problem": failed[0].detail if failed else None,
            "operations": [vars(r) for r in results]}


def check_numbers(device: torch.device, precision: str) -> dict:
    """Both models in the layout training gives them on `device`, training; the UNet again evaluating only in
    the analysis's layout where that differs."""
    from luna_dist.common.hardware import seg_memory_format

    channels_last = device.type != "mps"
    checks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models = [LunaModel(), SegmentationModel()]
    for model in models:
        checks += numbers.check_model(model, device, [precision], numbers.layout_for(model, channels_last), 4)
    if seg_memory_format(device) != numbers.layout_for(models[1], channels_last):
        analysed = numbers.check_model(models[1], device, [precision], seg_memory_format(device), 4, training=False)
        for check in analysed:
            check.model += " (the analysis's layout)"
        checks += analysed
    failures = [line for check in checks if (line := check.failure_line())]
    return {"passed": not failures, "problem": failures[0] if failures else None,
            "models": [{"model": c.model, "precision": c.precision, "arithmetic": c.arithmetic,
                        "passed": c.first_failure is None,
                        "largest": {what: vars(found) for what in numbers.KINDS
                                    if (found := c.largest(what)) is not None}} for c in checks]}


def open_shards(path: Path) -> ShardSet:
    """The build at `path`, of either task (ShardSetError naming what is wrong)."""
    from luna_dist.data.streams import open_shard_set
    from luna_dist.shards import chunk_samples, seg_samples

    try:
        return open_shard_set(path, chunk_samples)
    except ShardSetError as err:
        try:
            return open_shard_set(path, seg_samples)
        except ShardSetError:
            raise err from None


def check_speed(device: torch.device, precision: str, shard_set: ShardSet | None, steps: int,
                samples: int) -> dict:
    """Check 4: each task's samples/s on the device, a data worker's on `shard_set` (None: a small build made
    here), and from the two the workers and batch to use. A device that cannot train the shards' task at
    --batch-size 32 (out of memory) fails the check saying so."""
    from luna_dist.shards.build import build
    from luna_dist.shards.options import BuildOptions
    from luna_dist.synthetic.generator import make_dataset

    channels_last = device.type != "mps"
    sizes = speed.BATCH_SIZES[:1] if device.type == "cpu" else speed.BATCH_SIZES
    rates: dict[str, dict[int, float]] = {}
    for task in speed.TASKS:
        rates[task] = {}
        for size in sizes:
            try:
                rates[task][size] = speed.device_rate(task, device, size, steps, precision, channels_last)
            except torch.OutOfMemoryError:
                break
    built = str(shard_set.root) if shard_set is not None else f"a build of {SMALL_BUILD_CTS} synthetic CTs, removed"
    with tempfile.TemporaryDirectory(prefix="luna_dist-doctor-") as scratch:
        if shard_set is None:
            with contextlib.redirect_stdout(io.StringIO()):  # the scratch build's tables and counts: not the doctor's
                make_dataset(Path(scratch) / "data", n_cts=SMALL_BUILD_CTS)
                build(BuildOptions(data=Path(scratch) / "data", out=Path(scratch) / "shards", workers=1,
                                   progress=False))
            shard_set = open_shards(Path(scratch) / "shards")
        worker = speed.worker_rate(shard_set, 32, samples)
    cores = machine.usable_cores()
    task = "seg" if shard_set.manifest.get("task") == "seg" else "cls"  # the task that trains on these shards
    result = {"device_samples_per_s": rates, "worker_samples_per_s": worker, "shards": built,
              "shards_task": task, "cores": cores}
    if 32 not in rates[task]:
        return {**result, "passed": False,
                "problem": f"the device ran out of memory training --task {task} at --batch-size 32: train with a "
                           "smaller --batch-size, or on a device with more memory"}
    advice = speed.recommend_workers(rates[task][32], worker, cores)
    batch = speed.recommend_batch(rates[task])
    at_batch = speed.recommend_workers(rates[task][batch], worker, cores)
    result.update({"advice": advice.as_dict(), "batch_size": batch, "advice_at_batch": at_batch.as_dict(),
                   "per_task": {name: speed.recommend_workers(r[32], worker, cores).as_dict()
                                for name, r in rates.items()  # the tasks that train on these shards, at batch 32
                                if (name == "seg") == (task == "seg") and 32 in r}})
    starving = advice.waiting > speed.STARVED
    result["passed"] = not starving
    result["problem"] = (f"even {advice.workers} data worker(s), the most {cores} core(s) allow, leave the device "
                         f"waiting {advice.waiting:.0%} of an epoch ({advice.reason}): a machine with more cores "
                         "feeds it") if starving else None
    return result


def shared_memory_verdict(found: dict) -> None:
    """Fail the machine check where /dev/shm cannot hold what the advised workers keep there."""
    facts = found["machine"]["facts"]
    workers = found["speed"]["advice"]["workers"] if "speed" in found else max(0, facts["usable_cores"] - 1)
    if problem := machine.shared_memory_problem(facts["shared_memory_bytes"], workers, 32):
        found["machine"].update(passed=False, problem=problem)


# -- the table -------------------------------------------------------------------------------------------------------
def _bytes(count: int | None) -> str:
    return "unknown" if count is None else f"{count / 2**30:,.1f} GiB"


def machine_rows(facts: dict) -> list[tuple[str, str]]:
    device = f"{facts['device']}: {facts['device_name']}, {_bytes(facts['device_memory_bytes'])}"
    if "compute_capability" in facts:
        device += (f", compute capability {facts['compute_capability']}, TF32 convolutions "
                   f"{'on' if facts['tf32_convolutions'] else 'off'}")
    if "macos" in facts:
        device += f", macOS {facts['macos']}"
    settings = ", ".join(f"{k} {v}" for k, v in facts["accelerate_settings"].items()) or "none"
    shm = facts["shared_memory_bytes"]
    return [("torch", f"{facts['torch']}, CUDA {facts['cuda']}, cuDNN {facts['cudnn']}, MPS {facts['mps']}"),
            ("OS", facts["os"]), ("device", device),
            ("CPU", f"{facts['usable_cores']} usable core(s) of {facts['cpu_cores']}; "
                    f"{' '.join(facts['cpu_features'])}"),
            ("shared memory", "none (not Linux: workers spawn)" if shm is None else f"/dev/shm {_bytes(shm)}"),
            ("accelerate", f"{facts['accelerate_config']}: {settings}"),
            ("precision", f"{facts['mixed_precision']}{' (bf16 native)' if facts['bf16_native'] else ''}")]


def operation_rows(found: dict) -> list[tuple[str, str]]:
    rows = []
    for op in found["operations"]:
        figure = f"{op['difference']:.1e} (tolerance {op['tolerance']:.0e})" if op["status"] in ("ok", "differs") \
            else op["detail"]
        rows.append((f"{op['name']} {op['precision']}", f"{op['status']}: {figure}  [{op['used_by']}]"))
    return rows


def _at(where: str) -> str:
    return f" ({where})" if where else ""


def number_rows(found: dict) -> list[tuple[str, str]]:
    rows = []
    for check in found["models"]:
        largest = "; ".join(f"{what} {item['value']:.1e}{_at(item['where'])} of {item['tolerance']:.0e}"
                            for what, item in check["largest"].items())
        verdict = "ok" if check["passed"] else "DIFFERS"
        rows.append((f"{check['model']} {check['precision']} ({check['arithmetic']})", f"{verdict}: {largest}"))
    return rows


def speed_rows(found: dict) -> list[tuple[str, str]]:
    rows = [(f"{task} samples/s", ", ".join(f"{rate:,.0f} at batch {size}" for size, rate in rates.items()))
            for task, rates in found["device_samples_per_s"].items()]
    rows.append(("a data worker", f"{found['worker_samples_per_s']:,.0f} samples/s ({found['shards']})"))
    if "advice" not in found:  # the device could not train the shards' task at batch 32: the problem says so
        return rows
    advice, batch = found["advice"], found["batch_size"]
    rows += [("advice", f"--task {found['shards_task']}: --num-workers {advice['workers']} at --batch-size 32: "
                        f"the device waits ~{advice['waiting_share']:.0%} of an epoch ({advice['reason']})")]
    if batch != 32:
        at = found["advice_at_batch"]
        rows.append(("", f"--batch-size {batch} trains faster: with --num-workers {at['workers']} it waits ~"
                         f"{at['waiting_share']:.0%}"))
    return rows


TITLES = {"machine": ("1. the machine", machine_rows), "operations": ("2. operations against the CPU", operation_rows),
          "numbers": ("3. the models against the CPU", number_rows), "speed": ("4. speed", speed_rows)}


def table(found: dict) -> str:
    lines = []
    for name, (title, rows_of) in TITLES.items():
        if name not in found:
            lines.append(f"{title:<60} left out")
            continue
        check = found[name]
        lines.append(f"{title:<60} {'passed' if check['passed'] else 'FAILED'}")
        rows = rows_of(check["facts"] if name == "machine" else check)
        width = max((len(key) for key, _ in rows), default=0)
        lines += [f"   {key:<{width}}  {value}" for key, value in rows]
        lines += [f"   note: {note}" for note in check.get("notes", [])]
        if check.get("problem"):
            lines.append(f"   problem: {check['problem']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_at_least(parser, args, {"steps": 1, "worker_samples": 64})
    device = _device(parser, args.device)
    precision = args.mixed_precision or machine.chosen_precision()
    try:  # before the checks, which take a while: a wrong --shards fails at once
        shard_set = open_shards(args.shards) if args.shards and not args.skip_speed else None
    except ShardSetError as err:
        return cli.fail(f"--shards: {err}")
    found = {"machine": check_machine(device, precision), "operations": check_operations(device, precision),
             "numbers": check_numbers(device, precision)}
    if not args.skip_speed:
        found["speed"] = check_speed(device, precision, shard_set, args.steps, args.worker_samples)
    shared_memory_verdict(found)
    failed = [name for name in TITLES if name in found and not found[name]["passed"]]
    found["passed"], found["failed"] = not failed, failed
    print(table(found))
    if args.json:
        write_json(args.json, found)
    if failed:
        return cli.fail("; ".join(f"check {list(TITLES).index(name) + 1}, {name}: {found[name]['problem']}"
                                  for name in failed))
    print("every check passed")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
