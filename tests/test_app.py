"""The Hydra app: composition (checkout and installed package), end-to-end runs, multirun, quoting, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from explainguide import app
from explainguide.app import run_task
from explainguide.runtime import ConfigError, RunContext

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "explainguide" / "conf"
EXPLAINGUIDE = [sys.executable, "-m", "explainguide"]
TRICKY_PROMPT = "a cat, sitting = happy: on a mat #1 — café 猫"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "override",
    [f"{group}={option}" for group in ("model", "dataset", "task", "loss", "logger") for option in group_options(group)]
    + [f"debug={option}" for option in group_options("debug")],
)
def test_every_config_option_composes(override):
    cfg = compose_config(override)
    OmegaConf.to_container(cfg.task, resolve=True)
    assert cfg.task.runner._target_.startswith("explainguide.tasks.")


def test_top_level_conf_is_the_package_conf():
    assert (REPO / "conf").resolve() == CONF.resolve()


def test_configs_compose_from_an_installed_wheel(tmp_path):
    """Build the wheel, unpack it alone, and compose from it: the YAML must travel as package data."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("explainguide-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from hydra import compose, initialize_config_module\n"
        "import explainguide, sys\n"
        f"assert explainguide.__file__.startswith({str(site)!r}), explainguide.__file__\n"
        "with initialize_config_module(version_base='1.3', config_module='explainguide.conf'):\n"
        "    cfg = compose(config_name='config', overrides=['task=explain', 'model=vit_b32_openai'])\n"
        "print(cfg.model.name, cfg.task.name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ViT-B-32", "explain"]
    assert (site / "explainguide" / "models" / "toy" / "toy_clip.json").is_file()


def run_cli(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    where = [f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else [f"hydra.run.dir={tmp_path / 'run'}"]
    command = EXPLAINGUIDE + (["-m"] if multirun else []) + list(overrides) + where
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_explain_run_writes_everything_and_prints_the_output_dir(tmp_path):
    (tmp_path / "prompts.txt").write_text("a blue square\nthe sky: blue, = #2\n", encoding="utf-8")
    out = run_cli(tmp_path, "task=explain", "model=toy_random", "debug=default",
                  f"task.text=[\"{TRICKY_PROMPT}\"]", "task.prompts_file=prompts.txt")
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "run"
    assert out.stdout.strip().splitlines()[-1] == str(run_dir)
    for name in (".hydra/config.yaml", "metrics.json", "metrics.jsonl", "summary.md", "word_scores.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["status"] == "ok"
    assert metrics["prompts"] == [TRICKY_PROMPT, "a blue square", "the sky: blue, = #2"]
    pngs = sorted(p.name for p in (run_dir / "images").glob("*.png"))
    assert len(pngs) == 6 and any("heatmap" in p for p in pngs) and any("tokens" in p for p in pngs)


def test_a_prompts_file_alone_replaces_the_example_prompts_and_the_console_stays_terse(tmp_path):
    long_prompt = " ".join(["red circle"] * 20)  # 42 tokens: truncated for the toy model's 32
    (tmp_path / "prompts.txt").write_text(f"a green star\n{long_prompt}\n", encoding="utf-8")
    out = run_cli(tmp_path, "task=explain", "model=toy", "logger=none", "progress=false",
                  "task.prompts_file=prompts.txt")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["prompts"] == ["a green star", long_prompt]
    console, log_file = out.stdout + out.stderr, (tmp_path / "run" / "app.log").read_text()
    assert "[root][INFO]" not in console and "[root][INFO]" in log_file  # open_clip's model-loading lines
    warning_lines = [line for line in console.splitlines() if "PromptTruncatedWarning" in line]
    assert len(warning_lines) == 1 and "has 42 tokens" in warning_lines[0]  # one line, no source line after it
    assert "warnings.warn" not in console and "PromptTruncatedWarning" in log_file


def test_quoted_prompt_reaches_the_program_byte_identical():
    # Documented quoting: shell single quotes around key="value"; Hydra keeps , = : # and non-ASCII as is.
    cfg = compose_config("task=explain", f'task.text="{TRICKY_PROMPT}"')
    assert cfg.task.text == TRICKY_PROMPT
    assert cfg.task.text.encode() == TRICKY_PROMPT.encode()


def test_multirun_gives_one_folder_per_job(tmp_path):
    out = run_cli(tmp_path, "task=explain", "model=toy_random", "debug=default", "task.target=cosine,scaled",
                  multirun=True)
    assert out.returncode == 0, out.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert [p.name for p in jobs] == ["0", "1"]
    targets = {OmegaConf.load(p / ".hydra" / "config.yaml").task.target for p in jobs}
    assert targets == {"cosine", "scaled"}


def test_a_failed_sweep_job_is_recorded_and_the_others_still_run(tmp_path):
    out = run_cli(tmp_path, "task=explain", "model=toy_random", "debug=default", 'task.text="",a red circle',
                  multirun=True)
    assert out.returncode == 1
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: empty prompt '' in task.text/prompts_file; give non-empty text",
        f"error: 1 job(s) of the sweep did not finish: {tmp_path / 'sweep' / '0'} (each one's error is in its "
        "metrics.json and app.log)"]
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr
    status = {job: json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["status"] for job in "01"}
    assert status == {"0": "failed", "1": "ok"}
    rerun = run_cli(tmp_path, "task=explain", "model=toy_random", "debug=default", 'task.text="",a red circle',
                    multirun=True)  # the same sweep again: the job fails again, so the sweep does too
    assert rerun.returncode == 1 and "1 job(s) of the sweep did not finish" in rerun.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=ViT-B-99"], "unknown model.name='ViT-B-99'"),
        (["model=checkpoint", "model.checkpoint=missing.safetensors"], "missing.safetensors' does not exist"),
        (["loss.explainability=-1"], "loss.explainability=-1"),
        (["task.image_first_block=4"], "first_block=4 is outside the image tower's 4 blocks"),
        (["task.text=[\"  \"]"], "empty prompt"),
        (["task.target=bogus"], "task.target='bogus': use one of ['cosine', 'scaled']"),
        (["task.image=no_such_dir"], "no_such_dir"),
    ],
)
def test_bad_input_fails_with_one_clear_line(tmp_path, overrides, message):
    out = run_cli(tmp_path, "task=explain", "model=toy_random", "debug=default", *overrides)
    assert out.returncode == 1
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], out.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())  # failed, never left looking complete
    assert metrics["status"] == "failed" and message in metrics["error"]


def test_user_paths_resolve_against_the_launch_dir(tmp_path):
    cfg = compose_config("task=explain", "model=toy_random", "debug=default", "task.image=pics/cat.png")
    with pytest.raises(Exception) as err:
        run_task(cfg, RunContext(output_dir=tmp_path / "out", launch_dir=tmp_path))
    assert cfg.task.image == str(tmp_path / "pics" / "cat.png")
    assert str(tmp_path / "pics" / "cat.png") in str(err.value)


def test_prompt_learning_paths_resolve_and_flags_stay(tmp_path):
    from explainguide.runtime import resolve_user_paths

    cfg = compose_config("task=evaluate", "task.prompts=runs/a", "dataset=hf", "dataset.classnames_file=names.txt")
    resolve_user_paths(cfg, tmp_path)
    assert cfg.task.prompts == str(tmp_path / "runs" / "a")
    assert cfg.dataset.classnames_file == str(tmp_path / "names.txt")
    cfg = compose_config("task=prompt_learning", "task.shots_file='~/shots.json'")
    resolve_user_paths(cfg, tmp_path)
    assert cfg.task.resume is True and cfg.task.shots_file == str(Path("~/shots.json").expanduser())
    cfg = compose_config("task=prompt_learning", "task.resume=old_run")
    resolve_user_paths(cfg, tmp_path)
    assert cfg.task.resume == str(tmp_path / "old_run")


@pytest.mark.parametrize("overrides, keys", [(["task=evaluate"], "task.prompts"),
                                              (["task=generate", "generator=vqgan"], "generator.checkpoint, generator.config")])
def test_required_values_are_named_with_the_fix(tmp_path, overrides, keys):
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError, match=rf"^{keys} must be set \(no default\); add {keys.split(', ')[0]}=<value>"):
        run_task(cfg, RunContext(output_dir=tmp_path, launch_dir=tmp_path))


def test_negative_lambda_is_rejected_before_any_work(tmp_path):
    cfg = compose_config("loss.explainability=-0.5")
    with pytest.raises(ConfigError, match=r"loss.explainability=-0.5: give a finite number >= 0"):
        run_task(cfg, RunContext(output_dir=tmp_path, launch_dir=tmp_path))
    assert not any(tmp_path.iterdir())


def test_main_job_debug_size_end_to_end(tmp_path):
    """`make run`'s job (zero-shot template comparison, bundled toy CLIP) at debug size."""
    out = run_cli(tmp_path, "debug=default", "dataset.limit=30", "task.n_heatmaps=2")
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "run"
    assert out.stdout.strip().splitlines()[-1] == str(run_dir)
    rows = (run_dir / "templates.csv").read_text().splitlines()
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.model.name == "toy_clip" and cfg.model.pretrained == "bundled"
    assert rows[0] == "template,accuracy,class_name_score" and len(rows) - 1 >= 6
    for row in rows[1:]:
        accuracy, score = (float(x) for x in row.rsplit(",", 2)[1:])
        assert 0 <= accuracy <= 1 and 0 < score <= 1
    images = {p.name for p in (run_dir / "images").glob("*.png")}
    assert "accuracy_vs_explainability.png" in images
    assert sum(name.startswith("heatmap_") for name in images) == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["zero_shot/n_images"] == 30
    assert "templates" in (run_dir / "summary.md").read_text()


def _ctrl_c(cfg, ctx):
    raise KeyboardInterrupt


def _sigterm(cfg, ctx):
    os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or a scheduler would
    pytest.fail("SIGTERM did not stop the run")


@pytest.mark.parametrize("stop, code, line", [(_ctrl_c, 130, "error: interrupted;"),
                                              (_sigterm, 143, "error: terminated (SIGTERM);")])
def test_ctrl_c_and_sigterm_are_one_line_an_exit_code_and_a_failed_record(tmp_path, monkeypatch, capsys, stop,
                                                                          code, line):
    monkeypatch.setattr(app, "run_task", stop)
    monkeypatch.setattr(sys, "argv", ["explainguide", "task=explain", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_info:
        app.main()
    assert exit_info.value.code == code
    assert capsys.readouterr().err.startswith(line)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handed back after the run


def test_an_interrupted_prompt_learning_run_says_how_to_continue_it(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, ctx):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    monkeypatch.setattr(app, "run_task", interrupted)
    monkeypatch.setattr(sys, "argv", ["explainguide", "task=prompt_learning", "logger=none", f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit):
        app.main()
    assert f"run the same command with hydra.run.dir={run_dir}" in capsys.readouterr().err


def test_default_run_dirs_carry_the_process_id_so_same_second_runs_stay_apart():
    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        cfg = compose(config_name="config", overrides=["task=explain"], return_hydra_config=True)
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        assert OmegaConf.select(cfg, key).endswith(f"_{os.getpid()}")


@pytest.mark.parametrize("content, message", [(b"\n  \n", "has no prompts"), (b"caf\xe9\n", "is not UTF-8 text")])
def test_an_empty_or_undecodable_prompts_file_is_named(tmp_path, content, message):
    from explainguide.tasks.common import prompts_from_config

    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        prompts_from_config(None, str(path))
    assert str(path) in str(err.value)
