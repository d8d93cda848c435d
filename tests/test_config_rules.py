"""The config rule table: what each kind of rule admits, and that every rule names a real config key."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from explainguide.config_rules import RULES, Rule, precision_problem, rule_violations
from explainguide.runtime import ConfigError, validate

TASKS = ["zero_shot", "explain", "prompt_learning", "evaluate", "generate", "edit", "spatial"]


def compose_task(task: str, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        return compose(config_name="config", overrides=[f"task={task}", *overrides])


@pytest.mark.parametrize("rule, value, admitted", [
    (Rule(int, low=1), 3, True),
    (Rule(int, low=1), 0, False),
    (Rule(int, low=1), 2.5, False),
    (Rule(int, low=1), True, False),  # YAML true is not a count
    (Rule(int, low=1), "3", False),
    (Rule(int, low=1), None, False),
    (Rule(int, low=1, nullable=True), None, True),
    (Rule(float, low=0), 0, True),
    (Rule(float, low=0, open_low=True), 0, False),
    (Rule(float, low=0), math.inf, False),
    (Rule(float, low=0), math.nan, False),
    (Rule(float, low=0, high=1), 1.0, True),
    (Rule(float, low=0, high=1), 1.5, False),
    (Rule(bool), False, True),
    (Rule(bool), 1, False),
    (Rule(bool), "yes", False),
])
def test_rule_admits(rule, value, admitted):
    assert rule.admits(value) is admitted


def test_every_rule_key_exists_in_some_config():
    """A misspelt key in the table would never be checked."""
    present = set()
    for task in TASKS:
        cfg = compose_task(task, "task.prompts=x" if task == "evaluate" else "seed=0")
        present |= {key for key in RULES if OmegaConf.select(cfg, key, default=KeyError) is not KeyError}
    assert sorted(set(RULES) - present) == []


@pytest.mark.parametrize("task", TASKS)
def test_the_shipped_defaults_pass_their_rules(task):
    cfg = compose_task(task, "task.prompts=x" if task == "evaluate" else "seed=0")
    assert rule_violations(cfg) == []


def test_several_bad_values_are_named_in_one_line():
    cfg = compose_task("generate", "task.steps=0", "task.lr=nan")
    with pytest.raises(ConfigError, match=r"^task.steps=0: give an integer >= 1; task.lr=nan: give a finite number "
                                          r"> 0 and <= 1e\+06$"):
        validate(cfg)


@pytest.mark.parametrize("task, precision, refused", [("zero_shot", "fp16", True), ("prompt_learning", "bf16", True),
                                                      ("generate", "fp16", True), ("explain", "fp16", False),
                                                      ("zero_shot", "fp32", False)])
def test_low_precision_is_refused_where_the_task_computes_in_fp32(task, precision, refused):
    cfg = OmegaConf.create({"task": {"name": task}, "model": {"precision": precision}})
    problem = precision_problem(cfg)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(f"model.precision='{precision}' works with task=explain only; task={task}")
