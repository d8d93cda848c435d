"""Sweeps: the experiment presets, a debug-size CoOp multirun end to end (table == the jobs' metrics.json),
rerun skipping, the submitit path, the SLURM launcher's local values, and make_table's zero-shot table."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from explainguide import app
from explainguide.tasks import prompt_learning

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "explainguide" / "conf"
sys.path.insert(0, str(REPO / "scripts"))
import make_table  # noqa: E402

# Two λ × two seeds, one epoch of 36 one-shot images in 2 steps of 16, toy CLIP with random weights.
DEBUG_SWEEP = ["experiment=coop_shapes", "model=toy_random", "dataset.size=72", "task.epochs=1", "task.n_ctx=4",
               "task.batch_size=16", "loss.also_minimize=false", "loss.explainability=0,1", "seed=1,2",
               "logger=none", "progress=false"]


def compose_hydra(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "explainguide", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(command, cwd=sweep_dir.parent, capture_output=True, text=True, timeout=600)


def sweep_in_process(monkeypatch, sweep_dir: Path, *overrides: str) -> None:
    """The app's own entry point with the basic launcher, in this process (no second torch import)."""
    monkeypatch.setattr(sys, "argv", ["explainguide", *overrides, f"hydra.sweep.dir={sweep_dir}"])
    try:
        app.main()
    finally:
        GlobalHydra.instance().clear()


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(path.parent.parent for path in sweep_dir.rglob(".hydra/config.yaml"))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("coop_*.yaml")))
def test_every_coop_preset_is_one_multirun_of_lambda_and_seeds(experiment):
    cfg = compose_hydra(f"experiment={experiment}")
    assert cfg.task.name == "prompt_learning" and cfg.task.shots == 1
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"loss.explainability": "0,0.5,1,2", "seed": "1,2,3"}
    # Job dirs named by the overrides: a rerun finds the same dirs, and skips the finished jobs.
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.override_dirname}"


def test_debug_sweep_table_matches_the_jobs_and_reruns_skip(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    overrides = [*DEBUG_SWEEP, f"model.cache_dir={tmp_path / 'weights' / 'cache'}"]  # a path: no nested job dirs
    sweep_in_process(monkeypatch, sweep_dir, *overrides)
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 4 and all(json.loads((j / "metrics.json").read_text())["status"] == "ok" for j in jobs)
    assert all(job.parent == sweep_dir for job in jobs)

    make_table.main([str(sweep_dir), "--out", str(tmp_path / "table"), "--name", "coop"])
    rows = list(csv.DictReader((tmp_path / "table" / "coop.csv").open()))
    by_lambda: dict[float, list[float]] = {}
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        by_lambda.setdefault(metrics["lambda"], []).append(metrics["test/acc1"])
    assert {float(row["lambda"]) for row in rows} == set(by_lambda) == {0.0, 1.0}
    for row in rows:
        values = by_lambda[float(row["lambda"])]
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert row["n_ok"] == "2" and row["seeds_ok"] == "1 2"
    assert (tmp_path / "table" / "coop_test_acc1_vs_lambda.png").is_file()

    # The same command again: the same job dirs, each already finished, so nothing trains or rewrites.
    stamps = {job: (job / "metrics.json").stat().st_mtime_ns for job in jobs}
    monkeypatch.setattr(prompt_learning, "train_step", lambda *args: pytest.fail("a finished job trained again"))
    sweep_in_process(monkeypatch, sweep_dir, *overrides)
    assert job_dirs(sweep_dir) == jobs
    assert {job: (job / "metrics.json").stat().st_mtime_ns for job in jobs} == stamps


def write_sweep(sweep_dir: Path, jobs: list[tuple[dict, dict]], params: dict) -> None:
    """A CoOp sweep on disk as Hydra leaves it: job dirs of (config changes, metrics.json), and multirun.yaml
    asking for `params`. A config change is {"seed": s} or {"loss.explainability": λ} or any dotted key."""
    base = OmegaConf.create(OmegaConf.to_container(compose_hydra("experiment=coop_shapes", "model=toy_random"),
                                                   resolve=False))
    hydra = base.pop("hydra")
    for number, (changes, metrics) in enumerate(jobs):
        job, config = sweep_dir / str(number), base.copy()
        for key, value in changes.items():
            OmegaConf.update(config, key, value)
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(config, job / ".hydra" / "config.yaml")
        (job / "metrics.json").write_text(json.dumps(metrics))
    hydra.sweeper.params = params
    hydra.overrides.task = ["experiment=coop_shapes", "model=toy_random"]
    OmegaConf.save(OmegaConf.merge(base, {"hydra": hydra}), sweep_dir / "multirun.yaml")


def ok(acc: float) -> dict:
    return {"status": "ok", "test/acc1": acc}


FAILED = {"status": "failed", "error": "boom"}


def test_table_names_failed_and_missing_seeds_and_never_averages_them(tmp_path):
    """A sweep of 2 λ × 3 seeds on disk where λ=1 has one failed seed and one that never ran."""
    sweep_dir = tmp_path / "sweep"
    runs = [(0.0, 1, ok(0.5)), (0.0, 2, ok(0.6)), (0.0, 3, ok(0.7)), (1.0, 1, ok(0.9)), (1.0, 2, FAILED)]
    write_sweep(sweep_dir, [({"loss.explainability": lam, "seed": seed}, metrics) for lam, seed, metrics in runs],
                {"loss.explainability": "0,1", "seed": "1,2,3"})
    make_table.main([str(sweep_dir), "--name", "coop"])
    markdown = (sweep_dir / "coop.md").read_text()
    assert "| shapes | toy_clip/random-init | **60.00 ± 10.00** | 90.00 (1/3 seeds; failed 2; missing 3) |" in markdown
    rows = {row["lambda"]: row for row in csv.DictReader((sweep_dir / "coop.csv").open())}
    assert rows["1.0"]["mean"] == "0.9" and rows["1.0"]["n_ok"] == "1" and rows["1.0"]["best"] == "False"
    assert rows["1.0"]["seeds_failed"] == "2" and rows["1.0"]["seeds_missing"] == "3"


def test_a_sweep_whose_jobs_all_failed_still_gets_its_table(tmp_path):
    sweep_dir = tmp_path / "sweep"
    write_sweep(sweep_dir, [({"loss.explainability": 0.0, "seed": seed}, FAILED) for seed in (1, 2)],
                {"loss.explainability": "0", "seed": "1,2"})
    make_table.main([str(sweep_dir), "--name", "coop"])
    assert "failed 1, 2" in (sweep_dir / "coop.md").read_text()


def test_a_lambda_that_is_not_a_number_is_listed_not_tabulated(tmp_path):
    sweep_dir = tmp_path / "sweep"
    write_sweep(sweep_dir, [({"loss.explainability": 0.0, "seed": 1}, ok(0.5)),
                            ({"loss.explainability": "abc", "seed": 1}, FAILED)],
                {"loss.explainability": "0,abc", "seed": "1"})
    make_table.main([str(sweep_dir), "--name", "coop"])
    markdown = (sweep_dir / "coop.md").read_text()
    assert "| shapes | toy_clip/random-init | **50.00** |" in markdown
    notes = markdown.split("## Not tabulated")[1]
    assert "λ='abc', asked for by the sweep" in notes and f"{sweep_dir / '1'}: λ='abc' is not a number" in notes


def test_a_job_is_tabulated_by_what_its_metrics_recorded(tmp_path):
    # A refused rerun into a finished job dir leaves Hydra's .hydra/config.yaml saying λ=1; metrics.json says 0.
    sweep_dir = tmp_path / "sweep"
    write_sweep(sweep_dir, [({"loss.explainability": 1.0, "seed": 1}, {**ok(0.5), "lambda": 0.0, "seed": 1})],
                {"loss.explainability": "0", "seed": "1"})
    make_table.main([str(sweep_dir), "--name", "coop"])
    rows = list(csv.DictReader((sweep_dir / "coop.csv").open()))
    assert [(row["lambda"], row["mean"]) for row in rows] == [("0.0", "0.5")]


def test_two_image_folders_are_two_rows_named_by_their_folder(tmp_path):
    sweep_dir = tmp_path / "sweep"
    write_sweep(sweep_dir, [({"dataset.name": "image_folder", "dataset.root": f"/data/{name}"}, ok(acc))
                            for name, acc in (("pets", 0.5), ("cars", 0.25))], {"seed": "0"})
    make_table.main([str(sweep_dir), "--name", "coop"])
    rows = {row["dataset"]: row["mean"] for row in csv.DictReader((sweep_dir / "coop.csv").open())}
    assert rows["image_folder:pets"] == "0.5" and rows["image_folder:cars"] == "0.25"


def test_jobs_that_differ_in_another_key_are_refused_naming_the_key(tmp_path):
    sweep_dir = tmp_path / "sweep"
    write_sweep(sweep_dir, [({"task.n_ctx": 4}, ok(0.5)), ({"task.n_ctx": 8}, ok(0.6))], {"task.n_ctx": "4,8"})
    with pytest.raises(SystemExit, match=r"differ in task\.n_ctx, which the table has no axis for"):
        make_table.main([str(sweep_dir), "--name", "coop"])


def test_a_folder_without_jobs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no prompt_learning or zero_shot jobs found in"):
        make_table.main([str(tmp_path)])
    assert not (tmp_path / "results.md").exists()


def test_zero_shot_runs_give_a_template_by_dataset_table(tmp_path):
    base = OmegaConf.to_container(compose_hydra("task=zero_shot", "model=toy"), resolve=False)
    base.pop("hydra")
    runs = {"shapes": ("ok", [("{}", 0.5), ("a photo of a {}.", 0.75)]), "image_folder": ("failed", [])}
    for name, (status, templates) in runs.items():
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({**base, "dataset": {**base["dataset"], "name": name}}),
                       job / ".hydra" / "config.yaml")
        (job / "metrics.json").write_text(json.dumps({"status": status}))
        with (job / "templates.csv").open("w") as handle:
            handle.write("template,accuracy,class_name_score\n")
            handle.writelines(f"{template},{acc},0.1\n" for template, acc in templates)
    make_table.main([str(tmp_path), "--name", "zs"])
    table = list(csv.reader((tmp_path / "zs_zero_shot.csv").open()))
    assert table[0] == ["template", "image_folder (toy_clip/bundled)", "shapes (toy_clip/bundled)"]
    assert table[1:] == [["a photo of a {}.", "— (1 run(s) not ok)", "75.00"], ["{}", "— (1 run(s) not ok)", "50.00"]]


def test_submitit_local_launcher_runs_a_tiny_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in DEBUG_SWEEP if not o.startswith(("loss.explainability", "seed"))]
    out = sweep(sweep_dir, *overrides, "loss.explainability=0", "seed=1", "hydra/launcher=submitit_local",
                "hydra.launcher.timeout_min=10")
    assert out.returncode == 0, out.stderr[-3000:]
    (job,) = job_dirs(sweep_dir)
    assert json.loads((job / "metrics.json").read_text())["status"] == "ok"
    assert any((sweep_dir / ".submitit").iterdir())


def test_slurm_launcher_takes_cluster_values_from_conf_local(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "slurm.yaml").write_text("partition: my_gpu_partition\naccount: my_lab\n")
    cfg = compose_hydra("experiment=coop_shapes", "hydra/launcher=slurm", f"hydra.searchpath=[file://{tmp_path}]")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.gpus_per_node) == ("my_gpu_partition", "my_lab", 1)
    assert compose_hydra("experiment=coop_shapes", "hydra/launcher=slurm").hydra.launcher.partition is None


def test_a_wandb_group_that_cannot_be_read_is_one_line(monkeypatch):
    import wandb

    def no_login(*args, **kwargs):
        raise wandb.errors.UsageError("No API key configured.\nmore text")

    monkeypatch.setattr(wandb, "Api", no_login)
    with pytest.raises(SystemExit, match=r"could not read W&B group 'g' of 'explainguide' \(UsageError: No API key "
                                         r"configured.\); run `wandb login`") as exit_info:
        make_table.main(["--wandb-group", "g"])
    assert "\n" not in str(exit_info.value)
