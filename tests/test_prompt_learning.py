"""task=prompt_learning and task=evaluate on debug-size shapes runs (toy CLIP with random weights, CPU)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from explainguide.app import run_task
from explainguide.data import DatasetError
from explainguide.data.few_shot import save_indices
from explainguide.explain.class_scores import class_name_scores
from explainguide.explain.tokens import tokenize
from explainguide.models import load_clip
from explainguide.prompts import PromptLearner, decode_prompts
from explainguide.runtime import ConfigError, NonFiniteLoss, RunContext
from explainguide.tasks import prompt_learning
from explainguide.tasks.prompt_learning import check_finite, warmup_cosine

# 36 classes, 72 images per split, 1 shot -> 36 training images = 2 steps of 16 per epoch (the last 4 dropped).
DEBUG = ["model=toy_random", "logger=none", "progress=false", "dataset.size=72", "seed=1", "loss.also_minimize=false"]
TRAIN = ["task=prompt_learning", "task.n_ctx=4", "task.batch_size=16"]


def compose_config(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        return compose(config_name="config", overrides=[*DEBUG, *overrides])


def train(output_dir: Path, *overrides: str) -> dict:
    return run_task(compose_config(*TRAIN, *overrides), RunContext(output_dir=output_dir, launch_dir=output_dir))


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A finished 4-epoch run."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir, "task.epochs=4")
    return run_dir


def test_run_writes_prompts_shots_checkpoint_and_per_epoch_metrics(straight):
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    assert {"test/acc1", "test/mean_per_class_acc", "test/class_name_score", "train/loss", "train/ce"} <= set(metrics)
    assert metrics["dataset"] == "shapes" and metrics["lambda"] == 1.0 and metrics["seed"] == 1
    rows = read_rows(straight)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert {"train/loss", "train/ce", "train/expl", "train/lr", "test/acc1"} <= set(rows[0])
    assert rows[0]["train/lr"] == 1e-5 and rows[1]["train/lr"] == 0.002  # warm-up epoch, then the cosine
    shots = json.loads((straight / "shots.json").read_text())
    assert len(shots["indices"]) == 36 and shots["meta"]["k"] == 1
    assert load_file(str(straight / "prompts.safetensors"))["ctx"].dtype == torch.float32
    assert (straight / "checkpoint.pt").is_file() and (straight / "test_per_class.csv").is_file()
    rows = list(csv.reader((straight / "learned_prompts.csv").read_text(encoding="utf-8").splitlines()))[1:]
    assert len(rows) == 36 and all(f" {name} " in f" {words.strip()} " for name, words in rows)  # whole words


def test_evaluate_reloads_the_saved_prompts_exactly(straight, tmp_path):
    cfg = compose_config("task=evaluate", f"task.prompts={straight}")
    metrics = run_task(cfg, RunContext(output_dir=tmp_path, launch_dir=tmp_path))
    trained = json.loads((straight / "metrics.json").read_text())
    for key in ("test/acc1", "test/mean_per_class_acc", "test/class_name_score"):
        assert metrics[key] == trained[key], key


def _class_folder(root: Path, classes: list[str]) -> Path:
    """One folder per class (`_` for spaces), two shapes-world test images of that class in each."""
    from torchvision.utils import save_image

    from explainguide.data.shapes import CLASSNAMES, ShapesClassification

    world = ShapesClassification(split="test", n=72)
    for name in classes:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        items = [index for index in range(len(world)) if index % len(CLASSNAMES) == CLASSNAMES.index(name)]
        for index in items[:2]:
            save_image(world[index][0], folder / f"{index}.png")
    return root


def test_evaluate_on_a_subset_of_the_learned_classes(straight, tmp_path):
    # ImageNet -> ImageNet-A/R: only the dataset's classes compete, in the dataset's label order.
    root = _class_folder(tmp_path / "data", ["red circle", "blue square"])
    cfg = compose_config("task=evaluate", f"task.prompts={straight}", "dataset=image_folder", f"dataset.root={root}")
    metrics = run_task(cfg, RunContext(output_dir=tmp_path / "out", launch_dir=tmp_path))
    rows = (tmp_path / "out" / "test_per_class.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in rows[1:]] == [["blue square", "2"], ["red circle", "2"]]
    assert 0 <= metrics["test/acc1"] <= 1 and math.isfinite(metrics["test/class_name_score"])


def test_evaluate_rejects_a_class_it_has_no_prompt_for(straight, tmp_path):
    root = _class_folder(tmp_path / "data", ["red circle"])
    (root / "purple_unicorn").mkdir()
    (root / "purple_unicorn" / "a.png").write_bytes((root / "red_circle").iterdir().__next__().read_bytes())
    cfg = compose_config("task=evaluate", f"task.prompts={straight}", "dataset=image_folder", f"dataset.root={root}")
    with pytest.raises(ConfigError, match=r"1 classes .* no prompt for, e.g. 'purple unicorn'"):
        run_task(cfg, RunContext(output_dir=tmp_path / "out", launch_dir=tmp_path))


def test_evaluate_refuses_prompts_learned_on_other_weights(straight, tmp_path):
    # `straight` was trained on model=toy_random; its context vectors mean nothing for the trained toy CLIP.
    cfg = compose_config("task=evaluate", f"task.prompts={straight}", "model=toy")
    with pytest.raises(ConfigError, match=r"learned with model.pretrained=None, this run has model.pretrained='bundled'"):
        run_task(cfg, RunContext(output_dir=tmp_path / "out", launch_dir=tmp_path))


def test_interrupted_run_resumes_to_the_straight_result(straight, tmp_path, monkeypatch):
    save = prompt_learning._save_checkpoint

    def save_then_crash(path, state):
        save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt("simulated kill after epoch 2")

    monkeypatch.setattr(prompt_learning, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "task.epochs=4")
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    monkeypatch.setattr(prompt_learning, "_save_checkpoint", save)
    train(tmp_path, "task.epochs=4")  # task.resume=true: continue in the same output dir
    assert read_rows(tmp_path) == read_rows(straight)
    assert torch.equal(load_file(str(tmp_path / "prompts.safetensors"))["ctx"],
                       load_file(str(straight / "prompts.safetensors"))["ctx"])


def test_a_finished_run_is_not_extended_on_another_schedule(straight):
    # The cosine spans task.epochs: epochs 5-6 of a 6-epoch run follow another lr curve than a 4-epoch run's.
    with pytest.raises(ConfigError, match=r"task.epochs=4, this run has 6; use that value, task.resume=false"):
        train(straight, "task.epochs=6")


def test_rerun_of_a_finished_run_is_skipped(straight, monkeypatch):
    monkeypatch.setattr(prompt_learning, "train_step", lambda *args: pytest.fail("a finished run trained again"))
    before = (straight / "metrics.json").read_text()
    assert train(straight, "task.epochs=4")["status"] == "ok"
    assert (straight / "metrics.json").read_text() == before


def test_resume_refuses_a_checkpoint_of_another_config(straight):
    with pytest.raises(ConfigError, match=r"task.batch_size=16, this run has 8; use that value, task.resume=false"):
        train(straight, "task.epochs=4", "task.batch_size=8")


def test_shots_are_shared_across_lambda_and_reusable(tmp_path):
    train(tmp_path / "lambda0", "task.epochs=0", "loss.explainability=0")
    train(tmp_path / "lambda2", "task.epochs=0", "loss.explainability=2")
    train(tmp_path / "seed2", "task.epochs=0", "seed=2", f"task.shots_file={tmp_path / 'lambda0' / 'shots.json'}")
    shots = {name: json.loads((tmp_path / name / "shots.json").read_text())["indices"]
             for name in ("lambda0", "lambda2", "seed2")}
    assert shots["lambda0"] == shots["lambda2"] == shots["seed2"]


def test_shots_file_from_another_split_is_rejected(tmp_path):
    train(tmp_path / "small", "task.epochs=0", "dataset.size=36")
    other = tmp_path / "small" / "shots.json"
    with pytest.raises(ConfigError, match=r"was drawn from n_images=36, this run has n_images=72"):
        train(tmp_path / "big", "task.epochs=0", f"task.shots_file={other}")
    handmade = tmp_path / "handmade.json"
    handmade.write_text(json.dumps({"indices": [0, 500]}))
    with pytest.raises(ConfigError, match=r"holds index 500, outside the 72 images of split 'train'"):
        train(tmp_path / "hand", "task.epochs=0", f"task.shots_file={handmade}")
    meta = json.loads((tmp_path / "small" / "shots.json").read_text())["meta"]
    assert meta["n_images"] == 36 and meta["dataset"] == "shapes" and meta["k"] == 1
    with pytest.raises(ConfigError, match=r"holds 1 shots per class, this run has task.shots=2; set task.shots=1"):
        train(tmp_path / "two", "task.epochs=0", "dataset.size=36", "task.shots=2", f"task.shots_file={other}")


def test_nan_loss_stops_the_run_naming_step_and_term(tmp_path, monkeypatch):
    objective = prompt_learning.training_objective

    def nan_expl(*args):
        terms = objective(*args)
        return {**terms, "total": terms["total"] * math.nan}

    monkeypatch.setattr(prompt_learning, "training_objective", nan_expl)
    with pytest.raises(NonFiniteLoss, match=r"train/loss is nan at step 1"):
        train(tmp_path, "task.epochs=1")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "train/loss is nan at step 1" in metrics["error"]


def test_check_finite_names_the_first_bad_term():
    terms = {"total": torch.tensor(1.0), "ce": torch.tensor(1.0), "expl": torch.tensor(-math.inf)}
    with pytest.raises(NonFiniteLoss, match=r"train/expl is -inf at step 7"):
        check_finite(terms, 7)


def test_also_minimize_training_runs_all_pairs(tmp_path):
    save_indices(tmp_path / "eight.json", list(range(8)), {"note": "8 images, one step of 8"})
    metrics = train(tmp_path / "run", "task.epochs=1", "task.batch_size=8", "loss.also_minimize=true",
                    f"task.shots_file={tmp_path / 'eight.json'}")
    assert metrics["also_minimize"] is True and metrics["n_train_images"] == 8
    assert math.isfinite(metrics["train/expl"])


def test_warmup_cosine_is_coops_schedule():
    lrs = [warmup_cosine(epoch, 0.002, 50, warmup_epochs=1, warmup_lr=1e-5) for epoch in range(50)]
    assert lrs[0] == 1e-5 and lrs[1] == 0.002
    assert lrs[49] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 48 / 50)))
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))


@pytest.fixture(scope="module")
def toy():
    return load_clip("toy_clip", random_init=True, device="cpu")


@pytest.mark.parametrize("class_specific", [False, True])
def test_decoded_prompts_from_ctx_init_give_back_the_words(toy, class_specific):
    names = ["red circle", "blue star", "golden_retriever"]
    learner = PromptLearner(toy.model, toy.tokenizer, toy.context_length, names, n_ctx=None,
                            ctx_init="a photo of a", class_token_position="end", class_specific=class_specific)
    expected = tokenize(toy.tokenizer, [f"a photo of a {name.replace('_', ' ')}." for name in names],
                        toy.context_length)
    assert torch.equal(decode_prompts(learner, toy.model), expected)


def test_class_specific_random_contexts_are_drawn_per_class(toy):
    torch.manual_seed(0)
    learner = PromptLearner(toy.model, toy.tokenizer, toy.context_length, ["red circle", "blue star"], n_ctx=4,
                            class_specific=True)
    assert learner.ctx.shape == (2, 4, learner.ctx.shape[-1])
    assert not torch.allclose(learner.ctx[0], learner.ctx[1])


def test_shots_file_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / "shots.txt").write_text("red circle\n")
    with pytest.raises(DatasetError, match=r"shots.txt: not a k-shot file"):
        train(tmp_path / "run", f"task.shots_file={tmp_path / 'shots.txt'}")


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_label_scores_equal_all_pairs_when_the_labels_miss_the_longest_name(toy, position):
    """The label-only path encodes just the label prompts, which can end before the longest class name's EOT."""
    names = ["opossum", "wet car", "yorkshire terrier with a very long name"]
    learner = PromptLearner(toy.model, toy.tokenizer, toy.context_length, names, n_ctx=4,
                            class_token_position=position)
    features = torch.randn(3, toy.model.text_projection.shape[1], generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0])
    all_pairs = class_name_scores(toy.model, features, learner(), learner.token_ids, learner.class_mask)
    label_only = class_name_scores(toy.model, features, learner(), learner.token_ids, learner.class_mask,
                                   labels=labels)
    torch.testing.assert_close(label_only.scores, all_pairs.scores[torch.arange(3), labels], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(label_only.logits, all_pairs.logits)


@pytest.mark.parametrize("overrides, message", [
    (["task.ctx_init='a photo of a'", "task.n_ctx=16"],
     r"task.n_ctx=16 but task.ctx_init='a photo of a' has 4 tokens; set task.n_ctx=4"),
    (["task.class_token_position=sideways"], r"task.class_token_position='sideways'; use one of"),
    (["task.epochs=-1"], r"task.epochs=-1: give an integer >= 0$"),
    (["task.batch_size=0"], r"task.batch_size=0: give an integer >= 1$"),
    (["task.n_ctx=null"], r"task.n_ctx is null and task.ctx_init is empty: give task.n_ctx"),
    (["task.n_ctx=abc"], r"task.n_ctx='abc': give an integer >= 1 \(or null\)"),
    (["task.class_specific=maybe"], r"task.class_specific='maybe': give true or false"),
    (["loss.also_minimize=2"], r"loss.also_minimize=2: give true or false"),
    (["task.optimizer.lr=-0.1"], r"task.optimizer.lr=-0.1: give a finite number > 0"),
])
def test_bad_learner_options_fail_before_any_image_is_encoded(tmp_path, monkeypatch, overrides, message):
    def encoding_is_too_late(*args):
        raise AssertionError("images were encoded before the options were checked")

    monkeypatch.setattr(prompt_learning, "split_features", encoding_is_too_late)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, *overrides)


@pytest.mark.gpu
def test_amp_on_cuda_keeps_ctx_fp32(tmp_path):
    metrics = train(tmp_path, "task.epochs=1", "device=cuda", "loss.also_minimize=true", "task.batch_size=8")
    assert math.isfinite(metrics["train/loss"])
    assert load_file(str(tmp_path / "prompts.safetensors"))["ctx"].dtype == torch.float32


@pytest.mark.parametrize("content", [None, b"not a safetensors file"])
def test_evaluate_rejects_a_missing_or_foreign_prompts_file(tmp_path, content):
    path = tmp_path / "prompts.safetensors"
    if content is not None:
        path.write_bytes(content)
    cfg = compose_config("task=evaluate", f"task.prompts={path}")
    message = "does not exist" if content is None else "is not a learned-prompts file"
    with pytest.raises(ConfigError, match=message):
        run_task(cfg, RunContext(output_dir=tmp_path / "out", launch_dir=tmp_path))


def test_evaluate_names_an_empty_prompts_value(tmp_path):
    cfg = compose_config("task=evaluate", "task.prompts=''")
    with pytest.raises(ConfigError, match=r"^task.prompts is empty; give the prompts.safetensors"):
        run_task(cfg, RunContext(output_dir=tmp_path / "out", launch_dir=tmp_path))


def test_a_class_without_test_images_has_an_empty_accuracy_cell(tmp_path):
    from explainguide.tasks.evaluate import record_evaluation
    from explainguide.tracking import RunRecorder

    result = {"acc1": 1.0, "mean_per_class_acc": 1.0, "class_name_score": 0.5,
              "per_class_acc": [1.0, 0.0], "per_class_count": [3, 0]}
    with RunRecorder(tmp_path, {}) as recorder:
        record_evaluation(recorder, result, ["red circle", "blue square"], "test")
    with open(tmp_path / "test_per_class.csv", newline="") as handle:
        assert list(csv.reader(handle))[1:] == [["red circle", "3", "1.0"], ["blue square", "0", ""]]
    assert "| blue square | 0 |  |" in (tmp_path / "summary.md").read_text()
