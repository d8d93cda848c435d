#!/usr/bin/env python
"""Result tables from sweeps: CoOp (dataset × λ, mean ± std over seeds) and zero-shot (template × dataset).

    python scripts/make_table.py outputs/sweeps/coop_1shot [--out DIR] [--name NAME] [--metric test/acc1 ...]
    python scripts/make_table.py --wandb-group coop_caltech101 [--wandb-project explainguide] [--wandb-entity E]

Offline it reads job dirs (`.hydra/config.yaml` + `metrics.json`, plus `templates.csv` of zero-shot runs) and the
sweep's `multirun.yaml` for the seeds and λ that were asked for; online it reads a W&B group through the API.
Writes NAME.md, NAME.csv and NAME_<metric>_vs_lambda.png (CoOp) and NAME_zero_shot.csv (zero-shot) to --out.
Every asked-for job shows up: a cell averages only the seeds that finished and names the failed, unfinished and
missing ones; the best λ of a row (bold) is chosen among cells whose seeds all finished.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from explainguide.tasks.prompt_learning import run_identity, table_row
from explainguide.viz import line_plot

SWEPT = ("loss.explainability", "seed")  # the CoOp sweep axes read from multirun.yaml
PERCENT = {"test/acc1", "test/mean_per_class_acc", "accuracy"}  # shown ×100 with 2 decimals
WANDB_STATES = {"finished": "ok", "failed": "failed", "crashed": "failed", "killed": "failed", "running": "running"}


@dataclass
class Job:
    """One run: its resolved config, status (ok | failed | running | incomplete) and final metrics."""

    config: dict
    status: str
    metrics: dict
    where: str
    templates: list[dict] = field(default_factory=list)  # zero-shot: rows of templates.csv

    @property
    def task(self) -> str:
        return self.config["task"]["name"]


# -- sources ---------------------------------------------------------------------------------------------------

def jobs_from_dirs(root: Path) -> tuple[list[Job], list[dict]]:
    """Every job dir under `root`, and the grids its sweeps asked for (one per multirun.yaml)."""
    jobs = []
    for hydra_config in sorted(root.rglob(".hydra/config.yaml")):
        job_dir = hydra_config.parent.parent
        config = OmegaConf.to_container(OmegaConf.load(hydra_config), resolve=True)
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
        templates_file = job_dir / "templates.csv"
        templates = list(csv.DictReader(templates_file.open(encoding="utf-8"))) if templates_file.is_file() else []
        jobs.append(Job(config, metrics.get("status", "incomplete"), metrics, str(job_dir), templates))
    grids = [_declared_grid(path) for path in sorted(root.rglob("multirun.yaml"))]
    return jobs, [grid for grid in grids if grid]


def _declared_grid(path: Path) -> dict | None:
    """What a CoOp multirun.yaml asked for: {"row": table_row, "where": its dir, "lambda": [...], "not_numbers":
    [...], "seed": [...]}; None for other tasks."""
    saved = OmegaConf.load(path)
    if saved.task.name != "prompt_learning":
        return None
    overrides = [f"{key}={value}" for key, value in (saved.hydra.sweeper.params or {}).items()]
    overrides += list(saved.hydra.overrides.task)  # the command line wins, as in the sweep itself
    values = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group in SWEPT:
            sweep = override.is_sweep_override()
            values[override.key_or_group] = list(override.sweep_string_iterator()) if sweep else [override.value()]
    config = OmegaConf.to_container(saved, resolve=False)
    config.pop("hydra")
    lambdas = values.get("loss.explainability", [config["loss"]["explainability"]])
    return {"row": table_row(config), "where": str(path.parent),
            "lambda": [float(value) for value in lambdas if _is_number(value)],
            "not_numbers": [value for value in lambdas if not _is_number(value)],
            "seed": [int(value) for value in values.get("seed", [config["seed"]])]}


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def not_tabulated(jobs: list[Job], grids: list[dict]) -> tuple[list[Job], list[str]]:
    """The jobs a CoOp table can hold, and a note for each λ that is not a number (such a job failed its config
    check, and has no column to show in)."""
    notes = [f"λ={value!r}, asked for by the sweep in {grid['where']}, is not a number: not tabulated"
             for grid in grids for value in grid.get("not_numbers", [])]
    kept = []
    for job in jobs:
        lam = job.config.get("loss", {}).get("explainability")
        if job.task == "prompt_learning" and not _is_number(lam):
            notes.append(f"{job.where}: λ={lam!r} is not a number ({job.status}): not tabulated")
        else:
            kept.append(job)
    return kept, notes


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(first: dict, second: dict) -> list[str]:
    """The config keys (dotted) whose values differ between two resolved configs."""
    a, b = _flat(first), _flat(second)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def jobs_from_wandb(group: str, project: str, entity: str | None) -> tuple[list[Job], list[dict]]:
    """The runs of a W&B group (needs network and a W&B login); W&B keeps no record of asked-for jobs."""
    import wandb

    path = f"{entity}/{project}" if entity else project
    try:
        runs = list(wandb.Api(timeout=30).runs(path, filters={"group": group}))
    except Exception as err:  # no login, no network, unknown project: wandb raises many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SystemExit(f"could not read W&B group {group!r} of {path!r} ({type(err).__name__}: {first}); run "
                         "`wandb login` on a machine with network and check --wandb-project/--wandb-entity, or "
                         "give the sweep dir instead") from None
    return [Job(dict(run.config), WANDB_STATES.get(run.state, run.state), dict(run.summary._json_dict), run.url)
            for run in runs], []


# -- CoOp table --------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    ok: dict[int, float]  # seed -> value
    failed: list[int]
    unfinished: list[int]
    missing: list[int]

    @property
    def complete(self) -> bool:
        return bool(self.ok) and not (self.failed or self.unfinished or self.missing)

    def mean_std(self) -> tuple[float | None, float | None]:
        values = list(self.ok.values())
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def job_identity(job: Job) -> dict:
    """run_identity of the job's config, overridden by what its metrics.json recorded: a refused rerun into a
    finished job's dir rewrites .hydra/config.yaml (Hydra saves it before the run starts), never the metrics."""
    recorded = {key: job.metrics[key] for key in ("dataset", "model", "lambda", "seed") if key in job.metrics}
    return {**run_identity(job.config), **recorded}


def coop_cells(jobs: list[Job], grids: list[dict], metric: str) -> dict[tuple, dict[float, Cell]]:
    """{(dataset, model): {λ: Cell}} over the jobs seen and the seeds/λ their sweeps asked for."""
    seen: dict[tuple, dict[float, dict[int, Job]]] = defaultdict(lambda: defaultdict(dict))
    for job in jobs:
        if job.task == "prompt_learning":
            key = job_identity(job)
            by_seed = seen[(key["dataset"], key["model"])][key["lambda"]]
            if key["seed"] in by_seed:
                other = by_seed[key["seed"]]
                keys = ", ".join(differing_keys(other.config, job.config)) or "nothing"
                raise SystemExit(f"two jobs for {key['dataset']} {key['model']} λ={key['lambda']:g} "
                                 f"seed={key['seed']} ({other.where} and {job.where}) differ in {keys}, which the "
                                 "table has no axis for; give a folder whose jobs differ only in λ and seed")
            by_seed[key["seed"]] = job
    finished = [job for job in jobs if job.status == "ok"]
    if seen and finished and not any(metric in job.metrics for job in finished):  # a typo, not a failed sweep
        available = sorted({key for job in jobs for key in job.metrics if "/" in key})
        raise SystemExit(f"--metric {metric} is in no finished job's metrics; available: {available}")
    expected: dict[tuple, set] = defaultdict(set)
    for grid in grids:
        expected[grid["row"]].update(itertools.product(grid["lambda"], grid["seed"]))
    table = {}
    for row in sorted(set(seen) | set(expected)):
        pairs = expected[row] | {(lam, seed) for lam, by_seed in seen[row].items() for seed in by_seed}
        cells = {}
        for lam in sorted({lam for lam, _ in pairs}):
            cell = Cell({}, [], [], [])
            for seed in sorted(seed for l, seed in pairs if l == lam):
                job = seen[row][lam].get(seed)
                if job is None:
                    cell.missing.append(seed)
                elif job.status == "ok" and metric in job.metrics:
                    cell.ok[seed] = float(job.metrics[metric])
                elif job.status in ("ok", "failed"):
                    cell.failed.append(seed)
                else:
                    cell.unfinished.append(seed)
            cells[lam] = cell
        table[row] = cells
    return table


def _number(metric: str, value: float) -> str:
    return f"{100 * value:.2f}" if metric in PERCENT else f"{value:.4f}"


def cell_text(metric: str, cell: Cell, best: bool) -> str:
    mean, std = cell.mean_std()
    text = "—" if mean is None else _number(metric, mean) + ("" if std is None else f" ± {_number(metric, std)}")
    if best:
        text = f"**{text}**"
    notes = [f"{len(cell.ok)}/{len(cell.ok) + len(cell.failed) + len(cell.unfinished) + len(cell.missing)} seeds"]
    notes += [f"{what} {', '.join(map(str, seeds))}" for what, seeds in
              (("failed", cell.failed), ("unfinished", cell.unfinished), ("missing", cell.missing)) if seeds]
    return text if cell.complete else f"{text} ({'; '.join(notes)})"


def best_lambdas(cells: dict[float, Cell]) -> set[float]:
    means = {lam: cell.mean_std()[0] for lam, cell in cells.items() if cell.complete}
    return {lam for lam, mean in means.items() if mean == max(means.values())} if means else set()


def coop_markdown(metric: str, table: dict) -> list[str]:
    lambdas = sorted({lam for cells in table.values() for lam in cells})
    lines = ["| dataset | model | " + " | ".join(f"λ={lam:g}" for lam in lambdas) + " |",
             "|---|---|" + "---|" * len(lambdas)]
    for (dataset, model), cells in table.items():
        best = best_lambdas(cells)
        row = [cell_text(metric, cells[lam], lam in best) if lam in cells else "not run" for lam in lambdas]
        lines.append(f"| {dataset} | {model} | " + " | ".join(row) + " |")
    return lines


def coop_rows(metric: str, table: dict) -> list[list]:
    rows = []
    for (dataset, model), cells in table.items():
        best = best_lambdas(cells)
        for lam, cell in cells.items():
            mean, std = cell.mean_std()
            rows.append([dataset, model, lam, metric, mean, std, len(cell.ok), " ".join(map(str, cell.ok)),
                         " ".join(map(str, cell.failed)), " ".join(map(str, cell.unfinished)),
                         " ".join(map(str, cell.missing)), lam in best])
    return rows


COOP_COLUMNS = ["dataset", "model", "lambda", "metric", "mean", "std", "n_ok", "seeds_ok", "seeds_failed",
                "seeds_unfinished", "seeds_missing", "best"]


def coop_plot(metric: str, table: dict, path: Path) -> None:
    series = {}
    for (dataset, model), cells in table.items():
        points = [(lam, *cell.mean_std()) for lam, cell in cells.items() if cell.ok]
        if points:
            series[f"{dataset} ({model})"] = ([p[0] for p in points], [p[1] for p in points],
                                              [p[2] or 0.0 for p in points])
    if series:
        line_plot(series, "λ (loss.explainability)", metric, f"{metric} vs λ (mean ± std over seeds)", path)


# -- zero-shot table -----------------------------------------------------------------------------------------------

def zero_shot_table(jobs: list[Job]) -> tuple[list[str], list[list[str]]]:
    """Columns (dataset, model) and rows template -> accuracy (%), from zero-shot runs; failed runs say so."""
    columns: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        if job.task == "zero_shot":
            key = run_identity(job.config)
            columns[f"{key['dataset']} ({key['model']})"].append(job)
    names = sorted(columns)
    templates = sorted({row["template"] for group in columns.values() for job in group for row in job.templates})
    rows = []
    for template in templates:
        cells = []
        for name in names:
            values = [float(row["accuracy"]) for job in columns[name] if job.status == "ok"
                      for row in job.templates if row["template"] == template]
            not_ok = sum(job.status != "ok" for job in columns[name])
            text = "—" if not values else _number("accuracy", statistics.fmean(values))
            cells.append(text if not not_ok else f"{text} ({not_ok} run(s) not ok)")
        rows.append([template, *cells])
    return names, rows


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]


def write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a sweep dir (or any folder of job dirs)")
    parser.add_argument("--wandb-group", help="read this W&B group through the API instead of dirs (online)")
    parser.add_argument("--wandb-project", default="explainguide")
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--metric", action="append", help="metric(s) of metrics.json to tabulate (default test/acc1)")
    parser.add_argument("--out", type=Path, help="output folder (default: the sweep dir, or . for W&B)")
    parser.add_argument("--name", default="results", help="file name stem of the outputs")
    args = parser.parse_args(argv)
    if (args.sweep_dir is None) == (args.wandb_group is None):
        parser.error("give a sweep dir or --wandb-group (one of them)")
    if args.sweep_dir is not None and not args.sweep_dir.is_dir():
        parser.error(f"sweep dir {str(args.sweep_dir)!r} does not exist; give the hydra.sweep.dir of a multirun")
    jobs, grids = (jobs_from_dirs(args.sweep_dir) if args.sweep_dir is not None
                   else jobs_from_wandb(args.wandb_group, args.wandb_project, args.wandb_entity))
    source = str(args.sweep_dir) if args.sweep_dir is not None else f"W&B group {args.wandb_group}"
    if not any(job.task in ("prompt_learning", "zero_shot") for job in jobs):
        raise SystemExit(f"no prompt_learning or zero_shot jobs found in {source}; give the hydra.sweep.dir of a "
                         "multirun (or a folder holding job dirs)")
    jobs, notes = not_tabulated(jobs, grids)
    out = args.out or args.sweep_dir or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Results: {source}", ""]
    csv_rows = []
    for metric in args.metric or ["test/acc1"]:
        table = coop_cells(jobs, grids, metric)
        if not table:
            continue
        scale = " (%)" if metric in PERCENT else ""
        lines += [f"## CoOp: {metric}{scale}, mean ± std over seeds", "", *coop_markdown(metric, table), ""]
        csv_rows += coop_rows(metric, table)
        coop_plot(metric, table, out / f"{args.name}_{metric.replace('/', '_')}_vs_lambda.png")
    if csv_rows:
        write_csv(out / f"{args.name}.csv", COOP_COLUMNS, csv_rows)
    columns, rows = zero_shot_table(jobs)
    if columns:
        lines += ["## Zero-shot accuracy (%) per template", "", *markdown_table(["template", *columns], rows), ""]
        write_csv(out / f"{args.name}_zero_shot.csv", ["template", *columns], rows)
    if notes:
        lines += ["## Not tabulated", "", *(f"- {note}" for note in notes), ""]
    (out / f"{args.name}.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
