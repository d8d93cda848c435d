"""RunRecorder: local files always complete, W&B offline/disabled, W&B failures degrade to a warning."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from PIL import Image

from explainguide.tracking import REFUSED_FILE, RunRecorder, record_failure, runs_not_ok

CONFIG = {"model": {"name": "tiny"}, "seed": 0, "lr": 1e-3}


@pytest.fixture(autouse=True)
def _quiet_hermetic_wandb(tmp_path, monkeypatch):
    # No prompts, no writes to the user's ~/.config/wandb or cache.
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


@pytest.fixture
def finished(monkeypatch):
    """Exit codes of every W&B run finished during the test, in order."""
    codes: list[int | None] = []
    original = wandb.Run.finish

    def spy(self, exit_code=None):
        codes.append(exit_code)
        return original(self, exit_code=exit_code)

    monkeypatch.setattr(wandb.Run, "finish", spy)
    return codes


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def our_warnings(caplog) -> list[str]:
    # wandb logs its own errors too; only the recorder's lines count here.
    return [r.getMessage() for r in caplog.records if r.name == "explainguide.tracking"]


def test_local_files_written_and_parseable(tmp_path):
    out = tmp_path / "job"
    with RunRecorder(out, CONFIG, name="zs-eval", group="sweep1", tags=["a", "b"], job_type="eval") as rec:
        assert read_json(out / "metrics.json")["status"] == "running"
        rec.log({"train/loss": np.float32(0.5), "lr": torch.tensor(0.1)}, step=1)
        # Each row is on disk before the run ends.
        assert json.loads((out / "metrics.jsonl").read_text())["step"] == 1
        rec.log({"train/loss": 0.25}, step=2)
        rec.summary({"test/acc1": torch.tensor(0.75)})
        rec.set_final("test/acc5", 0.9)
        rec.table("per_class", ["class", "acc|1"], [["cat", 0.5], ["dog", 1.0]])

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 0.5, "lr": pytest.approx(0.1)}, {"step": 2, "train/loss": 0.25}]
    assert read_json(out / "metrics.json") == {"status": "ok", "test/acc1": 0.75, "test/acc5": 0.9}
    with open(out / "per_class.csv", newline="") as f:
        assert list(csv.reader(f)) == [["class", "acc|1"], ["cat", "0.5"], ["dog", "1.0"]]
    md = (out / "summary.md").read_text()
    assert md.startswith("# zs-eval\n")
    for expected in ("- status: ok", "- job_type: eval", "- group: sweep1", "- tags: a, b",
                     "## Final values", "| test/acc1 | 0.75 |", "## per_class", "| class | acc\\|1 |",
                     "| dog | 1 |"):
        assert expected in md
    assert not (out / "wandb_run.json").exists() and not (out / "wandb").exists()
    assert not list(out.glob(".*.tmp"))
    assert rec.status == "ok" and rec.output_dir == out
    assert rec.status_line() == f"run ok: {out}"


def test_failure_marks_failed_reraises_and_finishes_wandb(tmp_path, finished):
    out = tmp_path / "job"
    with pytest.raises(ValueError, match="boom"):
        with RunRecorder(out, CONFIG, wandb_cfg={"mode": "offline"}) as rec:
            rec.log({"x": 1.0}, step=0)
            rec.summary({"partial": 3})
            raise ValueError("boom\nsecond line")

    metrics = read_json(out / "metrics.json")
    assert metrics == {"status": "failed", "error": "ValueError: boom", "partial": 3}
    md = (out / "summary.md").read_text()
    assert "- status: failed" in md and "ValueError: boom" in md
    assert finished == [1]
    assert rec.status_line().startswith("run failed (ValueError: boom)")


def test_offline_run_dir_and_wandb_run_json(tmp_path, finished):
    out = tmp_path / "job"
    with RunRecorder(out, CONFIG, wandb_cfg={"mode": "offline", "project": "p"}, name="n", tags=["t"]) as rec:
        rec.log({"train/loss": 1.0}, step=1)
        rec.image("val/heatmap", np.zeros((4, 4, 3), np.uint8))
        rec.table("preds", ["i", "label"], [[0, "cat"]])
        rec.log({"train/loss": 0.5}, step=2)

    info = read_json(out / "wandb_run.json")
    assert set(info) == {"id", "url", "mode", "dir"} and info["mode"] == "offline"
    run_dir = Path(info["dir"])
    assert run_dir.is_dir() and run_dir.is_relative_to(out) and run_dir.name.endswith(info["id"])
    assert (run_dir / f"run-{info['id']}.wandb").is_file()
    assert finished == [0]
    assert info["id"] in (out / "summary.md").read_text()
    assert f"wandb sync {run_dir}" in rec.status_line()


def test_disabled_mode_keeps_local_files(tmp_path, caplog):
    out = tmp_path / "job"
    with caplog.at_level(logging.WARNING, logger="explainguide.tracking"):
        with RunRecorder(out, CONFIG, wandb_cfg={"mode": "disabled"}) as rec:
            rec.log({"x": 1.0}, step=0)
            rec.image("img", np.ones((2, 3, 3)))
            rec.table("t", ["a"], [[1]])
            rec.summary({"final": 2.0})
    assert not our_warnings(caplog)  # the W&B calls themselves worked
    assert read_json(out / "metrics.json") == {"status": "ok", "final": 2.0}
    assert not (out / "wandb_run.json").exists()
    assert (out / "images" / "img.png").is_file() and (out / "t.csv").is_file()


def test_wandb_init_failure_degrades_to_one_warning(tmp_path, monkeypatch, caplog):
    def no_network(**kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", no_network)
    out = tmp_path / "job"
    with caplog.at_level(logging.WARNING, logger="explainguide.tracking"):
        with RunRecorder(out, CONFIG, wandb_cfg={"mode": "online", "project": "p"}) as rec:
            rec.log({"x": 1.0}, step=0)
            rec.image("img", np.zeros((2, 2)))
            rec.table("t", ["a"], [[1]])
            rec.summary({"final": 2.0})
    [warning] = our_warnings(caplog)
    assert warning.startswith("W&B init failed (RuntimeError: network unreachable)")
    assert read_json(out / "metrics.json") == {"status": "ok", "final": 2.0}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "t.csv").is_file() and (out / "images" / "img.png").is_file()
    assert not (out / "wandb_run.json").exists()


def test_online_without_api_key_degrades(tmp_path, monkeypatch, caplog):
    # The real failure on a machine without W&B credentials (or network).
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    out = tmp_path / "job"
    with caplog.at_level(logging.WARNING, logger="explainguide.tracking"):
        with RunRecorder(out, CONFIG, wandb_cfg={"mode": "online", "project": "p"}) as rec:
            rec.log({"x": 1.0}, step=0)
    [warning] = our_warnings(caplog)
    assert warning.startswith("W&B init failed (UsageError")
    assert read_json(out / "metrics.json") == {"status": "ok"}


def test_wandb_log_failure_turns_wandb_off_and_finishes_run(tmp_path, monkeypatch, caplog, finished):
    def broken_log(self, *args, **kwargs):
        raise ConnectionError("lost connection")

    monkeypatch.setattr(wandb.Run, "log", broken_log)
    out = tmp_path / "job"
    with caplog.at_level(logging.WARNING, logger="explainguide.tracking"):
        with RunRecorder(out, CONFIG, wandb_cfg={"mode": "offline"}) as rec:
            rec.log({"x": 1.0}, step=0)
            rec.log({"x": 2.0}, step=1)
    [warning] = our_warnings(caplog)
    assert warning.startswith("W&B log failed (ConnectionError: lost connection)")
    assert finished == [1]  # finished once, when W&B was switched off
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert read_json(out / "metrics.json")["status"] == "ok"


def test_sequential_recorders_get_distinct_runs(tmp_path, finished):
    # A run some other code left open must not capture ours (reinit).
    stray = wandb.init(mode="offline", dir=str(tmp_path), reinit="create_new")
    ids = []
    for job in range(2):
        out = tmp_path / str(job)
        with RunRecorder(out, {**CONFIG, "seed": job}, wandb_cfg={"mode": "offline"}) as rec:
            rec.log({"x": float(job)}, step=0)
        info = read_json(out / "wandb_run.json")
        assert Path(info["dir"]).is_relative_to(out)
        ids.append(info["id"])
    stray.finish()
    assert len({*ids, stray.id}) == 3
    assert finished == [0, 0, None]


def test_image_from_chw_float_tensor(tmp_path):
    chw = torch.zeros(3, 8, 5)
    chw[0] = 1.0  # pure red
    chw[2, 0, 0] = 0.5
    with RunRecorder(tmp_path, CONFIG) as rec:
        path = rec.image("val/overlay", chw, step=7, caption="a cat")
    assert path == tmp_path / "images" / "val_overlay_000007.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.text["Caption"] == "a cat"
        pixels = np.asarray(img)
    assert pixels.shape == (8, 5, 3) and pixels.dtype == np.uint8
    assert pixels[1, 1].tolist() == [255, 0, 0] and pixels[0, 0].tolist() == [255, 0, 128]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"config": "not a dict"}, TypeError),
        ({"wandb_cfg": {"mode": "cloud"}}, ValueError),
        ({"wandb_cfg": {"projcet": "typo"}}, ValueError),
    ],
)
def test_bad_arguments_fail_early(tmp_path, kwargs, error):
    with pytest.raises(error):
        RunRecorder(tmp_path, **{"config": CONFIG, **kwargs})


def test_runs_not_ok_are_those_written_since_a_time_that_say_anything_but_ok(tmp_path):
    import os
    import time

    for name, status in (("old_failure", "failed"), ("ok", "ok"), ("failed", "failed"), ("killed", "running")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": status}))
    since = time.time() - 10
    os.utime(tmp_path / "old_failure" / "metrics.json", (since - 100, since - 100))  # an earlier sweep's
    assert runs_not_ok(tmp_path, since) == [tmp_path / "failed", tmp_path / "killed"]


def test_a_failure_updates_an_earlier_failure_but_keeps_a_finished_record(tmp_path):
    import time

    since = time.time() - 1
    for name, record in (("failed_before", {"status": "failed", "error": "old"}), ("finished", {"status": "ok",
                                                                                                  "test/acc1": 0.9})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
        record_failure(tmp_path / name, ValueError("new"))
    assert read_json(tmp_path / "failed_before" / "metrics.json") == {"status": "failed", "error": "ValueError: new"}
    assert read_json(tmp_path / "finished" / "metrics.json") == {"status": "ok", "test/acc1": 0.9}
    assert read_json(tmp_path / "finished" / REFUSED_FILE) == {"error": "ValueError: new"}
    assert runs_not_ok(tmp_path, since) == [tmp_path / "failed_before", tmp_path / "finished"]
