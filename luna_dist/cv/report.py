"""What the protocol produced, and what produced it: `protocol.json` and the page `index.html`.

The page links each fold's analysis report and shows the merged submission's FROC and CPM with
its bootstrap interval (`merged/score.json`, written by `luna_dist.evaluate`), each fold's CPM,
the merged confusion table (the sum of the folds'), the models of each fold with the folds they
trained and were selected on, the builds' identities and the time of every stage.
`protocol.json` holds the same, and the recipe's text and the versions.
"""

from __future__ import annotations

import html
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from luna_dist import __version__
from luna_dist.analysis.findings import CONFUSION_COLUMNS, CONFUSION_ROWS, confusion_cells
from luna_dist.analysis.report import html_page
from luna_dist.common.atomic import atomic_open, write_json
from luna_dist.cv.recipe import Recipe
from luna_dist.cv.runner import read_record
from luna_dist.cv.stages import Layout
from luna_dist.shards.format import sha256_file

PAGE, RECORD = "index.html", "protocol.json"


def produced(layout: Layout, recipe: Recipe, folds: list[int], launcher: str, stages: list[str]) -> dict:
    """Everything `protocol.json` holds, read from what the stages wrote."""
    score = json.loads((layout.merged / "score.json").read_text())
    summaries = {fold: json.loads((layout.analysis(fold) / "summary.json").read_text()) for fold in folds}
    table = np.sum([summary["confusion"]["table"] for summary in summaries.values()], axis=0)
    builds = {}
    for task in ("cls", "seg"):
        manifest_path = layout.shards(task) / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        builds[task] = {"path": str(layout.shards(task)), "manifest_sha256": sha256_file(manifest_path),
                        "identity": manifest["identity"], "counts": manifest["counts"]}
    records = {name: read_record(layout.record(name)) or {} for name in stages}
    return {
        "luna_dist": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "command": sys.argv,
        "recipe": {"path": str(recipe.path), "sha256": recipe.sha256, "select": recipe.select,
                   "description": recipe.description, "text": recipe.text},
        "data": str(layout.data), "launcher": launcher, "folds": folds, "builds": builds,
        "score": score,
        "fold_scores": {str(fold): {key: summary["froc"][key] for key in ("cpm", "cpm_ci", "scans", "nodules",
                                                                          "detected")}
                        for fold, summary in summaries.items()},
        "confusion": {"rows": list(CONFUSION_ROWS), "columns": list(CONFUSION_COLUMNS), "table": table.tolist()},
        "models": {str(fold): summary["produced_by"]["models"] for fold, summary in summaries.items()},
        "stages": {name: {key: record.get(key) for key in ("seconds", "started", "finished", "command", "identity")}
                   for name, record in records.items()},
    }


def write(layout: Layout, made: dict) -> Path:
    """protocol.json and index.html under --out; the page's path."""
    write_json(layout.out / RECORD, made)
    with atomic_open(layout.out / PAGE, encoding="utf-8") as f:
        f.write(page(layout, made))
    return layout.out / PAGE


def page(layout: Layout, made: dict) -> str:
    score, recipe = made["score"], made["recipe"]
    body = [f"<h1>LUNA16 protocol {_e(layout.out)}</h1>",
            f"<p>{len(made['folds'])} fold(s) of {_e(made['data'])}, each analysed end to end by a UNet, a nodule "
            f"classifier and a malignancy model trained without it; each model kept "
            f"{_e(_selection(recipe['select']))}. Recipe {_e(recipe['path'])} (sha256 <code>{recipe['sha256'][:16]}"
            f"…</code>), luna_dist {_e(made['luna_dist'])}, torch {_e(made['torch'])}, Python {_e(made['python'])}. "
            f"Files: <a href=\"merged/submission.csv\">merged/submission.csv</a>, <a href=\"merged/score.json\">"
            f"merged/score.json</a>, <a href=\"{RECORD}\">{RECORD}</a>.</p>",
            "<h2>The merged submission</h2>", _froc(score)]
    if (layout.merged / "froc.png").is_file():
        body.append("<img src=\"merged/froc.png\" alt=\"FROC curve of the merged submission\" width=\"640\">")
    body += ["<h2>Each fold</h2>",
             "<table><tr><th>fold</th><th>scans</th><th>nodules</th><th>detected</th><th>CPM</th><th>95 % interval</th>"
             "<th>analysis</th><th>models: trained on folds, selected on</th></tr>"]
    for fold in made["folds"]:
        result, models = made["fold_scores"][str(fold)], made["models"][str(fold)]
        interval = "–" if not result["cpm_ci"] else f"{result['cpm_ci'][0]:.3f}–{result['cpm_ci'][1]:.3f}"
        body.append(f"<tr><td class=\"n\">{fold}</td><td class=\"n\">{result['scans']}</td>"
                    f"<td class=\"n\">{result['nodules']}</td><td class=\"n\">{result['detected']}</td>"
                    f"<td class=\"n\">{_number(result['cpm'])}</td><td class=\"n\">{interval}</td>"
                    f"<td><a href=\"fold{fold}/analysis/report.html\">report</a></td><td>{_models(models)}</td></tr>")
    body.append("</table>")
    body += ["<h2>Merged confusion table</h2>", "<p class=\"note\">The sum of the folds' tables: each nodule and each "
             "detection counted once, by the models of its fold.</p>",
             "<table><tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in CONFUSION_COLUMNS) + "</tr>"]
    for name, cells in zip(CONFUSION_ROWS, confusion_cells(np.array(made["confusion"]["table"]))):
        body.append(f"<tr><th>{_e(name)}</th>" + "".join(f"<td class=\"n\">{c}</td>" for c in cells) + "</tr>")
    body += ["</table>", "<h2>Shard builds</h2>", "<table><tr><th>build</th><th>samples</th>"
             "<th>sha256 of its manifest</th></tr>"]
    for build in made["builds"].values():
        body.append(f"<tr><td class=\"path\">{_e(build['path'])}</td><td class=\"n\">{build['counts']['samples']:,}"
                    f"</td><td><code>{build['manifest_sha256']}</code></td></tr>")
    body += ["</table>", "<h2>Stages</h2>", "<table><tr><th>stage</th><th>seconds</th><th>finished</th>"
             "<th>command</th></tr>"]
    for name, stage in made["stages"].items():
        seconds = "–" if stage["seconds"] is None else f"{stage['seconds']:,.1f}"
        body.append(f"<tr><td>{_e(name)}</td><td class=\"n\">{seconds}</td><td>{_e(stage['finished'] or '')}</td>"
                    f"<td><code>{_e(stage['command'] or '')}</code></td></tr>")
    body.append("</table>")
    return html_page(f"LUNA16 protocol {layout.out}", body)


def _froc(score: dict) -> str:
    interval = (f" (95 % interval {score['cpm_ci'][0]:.3f}–{score['cpm_ci'][1]:.3f}, {score.get('bootstrap')} "
                "bootstraps)" if score.get("cpm_ci") else "")
    sensitivities = ", ".join(f"{rate:g}: {_number(s)}" for rate, s in zip(score["fp_rates"], score["sensitivities"]))
    return (f"<p>LUNA16 FROC over {score['scans']} scans and {score['nodules']} nodules ({score['detected']} "
            f"detected, {score['false_positives']} false positives): <b>CPM {_number(score['cpm'])}</b>{interval}; "
            f"sensitivity at false positives per scan {sensitivities}.</p>")


def _models(models: dict) -> str:
    shown = []
    for role, model in models.items():
        if model is None:
            continue
        seen = model.get("provenance") or {}
        shown.append(f"{_e(role)} {seen.get('trained_on')}, {seen.get('selected_on') or 'none'} "
                     f"(<code title=\"{_e(model['sha256'])}\">{_e(model['sha256'][:12])}</code>)")
    return "<br>".join(shown)


def _selection(select: str) -> str:
    return ("its last epoch (validated on the fold it scores, for display only)" if select == "last" else
            "its best epoch on the next fold, the fold it scores left out")


def _number(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def _e(value) -> str:
    return html.escape(str(value), quote=True)
