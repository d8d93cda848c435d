"""What the three guidance tasks (generate, edit, spatial) share.

A frozen CLIP ready for guidance (:class:`Guide`), the optimisation loop (:func:`optimise`) and how its results
are recorded (:func:`record_trace`), evaluation views and relevance overlays, word choice and word scores for the
text tasks, and :func:`step_timings` for benchmarks. Each task module adds its own objective and ``run``.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.transforms import Normalize
from tqdm import tqdm

from explainguide.explain.engine import explain_pairs
from explainguide.explain.tokens import WordSelection, parse_flags, select_words, tokenize
from explainguide.generators import CutoutError, Generator, check_cutout_scale, make_cutouts
from explainguide.guidance import generation_word_scores
from explainguide.models.loading import ClipBundle
from explainguide.runtime import ConfigError, NonFiniteLoss, seed_everything
from explainguide.tasks.common import prompts_from_config
from explainguide.tracking import RunRecorder
from explainguide.viz import heatmap_overlay, labelled_grid, line_plot

Objective = Callable[[torch.Tensor], dict[str, torch.Tensor]]

# The tasks that optimise an image; their modules import this one, so they are loaded by name when needed.
GUIDANCE_TASKS = {name: f"explainguide.tasks.{name}" for name in ("generate", "edit", "spatial")}

# Cutouts for evaluation draw from their own seed, so a plain and a guided result are scored on the same views.
EVAL_SEED_OFFSET = 1_000_003


# ---------------------------------------------------------------------------------------------------------
# A frozen CLIP ready for guidance


@dataclass
class Guide:
    """A frozen CLIP with its input normalisation. Images are (B, 3, H, W) in [0, 1]."""

    bundle: ClipBundle
    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor  # (1, 3, 1, 1)

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    @property
    def size(self) -> int:
        """CLIP's input side (the cutout size)."""
        return self.bundle.image_size

    @property
    def device(self) -> torch.device:
        return self.bundle.device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP input: images (B, 3, H, W) in [0, 1] resized to `size` (antialiased, differentiable), normalised."""
        if tuple(images.shape[-2:]) != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return (images - self.mean) / self.std

    def tokens(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (N, L) on the model's device."""
        return tokenize(self.bundle.tokenizer, texts, self.bundle.context_length).to(self.device)

    @torch.no_grad()
    def text_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, E) features; the text is fixed during guidance, so no graph is kept."""
        return self.model.encode_text(token_ids)

    def cosine(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Plain (no relevance) cosine of CLIP inputs (B, 3, S, S) with text features (B or 1, E) -> (B,)."""
        return F.cosine_similarity(self.model.encode_image(images), text_features, dim=-1)

    def cutout_rng(self, seed: int) -> torch.Generator:
        """A seeded generator for cutouts on the model's device."""
        return torch.Generator(device=self.device).manual_seed(int(seed))


def load_guide(cfg: DictConfig) -> Guide:
    """Instantiate cfg.model, freeze it, and read its input normalisation from the bundle's preprocess."""
    bundle: ClipBundle = instantiate(cfg.model)
    bundle.model.requires_grad_(False)
    stats = [t for t in getattr(bundle.preprocess, "transforms", []) if isinstance(t, Normalize)]
    if not stats:
        raise ConfigError(f"model {bundle.name}: its preprocess has no Normalize step; guidance needs CLIP's mean/std")
    shape = dict(device=bundle.device, dtype=bundle.dtype)
    mean = torch.as_tensor(stats[0].mean, **shape).view(1, 3, 1, 1)
    std = torch.as_tensor(stats[0].std, **shape).view(1, 3, 1, 1)
    return Guide(bundle, mean, std)


def build_generator(cfg: DictConfig) -> Generator:
    """cfg.generator instantiated; its size checks, and the cutouts' for that size, run before any model loads."""
    generator = instantiate(cfg.generator)
    if cfg.task.get("cutouts"):
        try:
            check_cutout_scale(generator.size, cfg.task.cutouts.min_scale)
        except CutoutError as err:
            raise ConfigError(f"task.{err}") from None
    return generator


def eval_views(guide: Guide, image: torch.Tensor, cutouts: DictConfig, views: int, seed: int) -> torch.Tensor:
    """`views` augmented CLIP inputs (V, 3, S, S) of image (1, 3, H, W), identical for every image of a run."""
    options = {**cutouts, "n": views}
    with torch.no_grad():
        cut, _ = make_cutouts(image.to(guide.device), None, cut_size=guide.size,
                              generator=guide.cutout_rng(seed + EVAL_SEED_OFFSET), **options)
    return guide.pixels(cut)


def image_relevance(guide: Guide, image: torch.Tensor, token_ids: torch.Tensor, first_block: int) -> torch.Tensor:
    """CLS relevance rows (N, 1 + P) of one image (1, 3, H, W) for N prompts (N, L), cosine target, no graph."""
    result = explain_pairs(guide.model, guide.pixels(image.to(guide.device)), token_ids, target="cosine",
                           text=False, image=True, image_first_block=first_block)
    return result.image_row.detach()


def relevance_overlay(image: torch.Tensor, cls_row: torch.Tensor) -> np.ndarray:
    """Heat map of one CLS row (1 + g²,) over image (1, 3, H, W) -> (H, W, 3) uint8."""
    patches = cls_row[1:].float().cpu()
    grid = int(round(patches.numel() ** 0.5))
    return heatmap_overlay(image[0].detach().cpu(), patches.reshape(grid, grid))


# ---------------------------------------------------------------------------------------------------------
# The optimisation loop and its record


@dataclass
class Trace:
    """What one optimisation left: final image (1, 3, H, W) on the CPU, per-step terms, snapshots (step, image)."""

    image: torch.Tensor
    history: dict[str, list[float]] = field(default_factory=dict)
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)


def optimise(
    generator: Generator,
    objective: Objective,
    steps: int,
    lr: float,
    lambda_key: str,
    snapshot_every: int = 0,
    progress: bool = False,
    desc: str = "guide",
    log: Callable[[dict[str, float], int], None] | None = None,
    on_snapshot: Callable[[int, torch.Tensor], None] | None = None,
) -> Trace:
    """Adam on the generator's trainable latents for `steps` steps of objective(generator()) -> {"loss", ...}.

    Every value the objective returns is recorded per step (and passed to `log(values, step)`); the image is
    snapshotted at the start, every `snapshot_every` steps (0: no others) and at the end, each also passed to
    `on_snapshot(step, image)` as it is taken (so loggers see steps in order). A non-finite value
    stops the run before its step is taken, naming the step, the terms and `lambda_key` (the task's λ) to lower.
    """
    if steps < 1 or lr <= 0:
        raise ConfigError(f"task.steps={steps}, task.lr={lr}: give steps >= 1 and lr > 0")
    parameters = [p for p in generator.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    trace = Trace(image=torch.empty(0))
    generator.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        image = generator()
        if step == 0 or (snapshot_every and step % snapshot_every == 0):
            _snapshot(trace, step, image, on_snapshot)
        terms = objective(image)
        values = {name: float(value.detach()) for name, value in terms.items()}
        bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
        if bad:
            raise NonFiniteLoss(f"{desc}: non-finite loss at step {step} ({', '.join(bad)}); the run stopped. "
                                     f"Lower task.lr (now {lr}) or the λ {lambda_key}")
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        for name, value in values.items():
            trace.history.setdefault(name, []).append(value)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        if log is not None:
            log(values, step)
    generator.eval()
    with torch.no_grad():
        trace.image = generator().detach().cpu()
    _snapshot(trace, steps, trace.image, on_snapshot)
    return trace


def _snapshot(trace: Trace, step: int, image: torch.Tensor, on_snapshot) -> None:
    trace.snapshots.append((step, image.detach().cpu()))
    if on_snapshot is not None:
        on_snapshot(step, trace.snapshots[-1][1])


def record_trace(recorder: RunRecorder, trace: Trace, name: str) -> None:
    """Save the final image `name`, the grid of its snapshots, and the loss curves (the snapshots themselves are
    saved as they are taken, by `snapshot_logger`)."""
    recorder.image(name, trace.image[0])
    grid = labelled_grid([snapshot[0] for _, snapshot in trace.snapshots],
                         [f"step {step}" for step, _ in trace.snapshots])
    recorder.image(f"{name}_grid", grid, caption="steps " + ", ".join(str(step) for step, _ in trace.snapshots))
    steps = list(range(len(trace.history["loss"])))
    curves = {term: (steps, values, None) for term, values in trace.history.items()}
    recorder.image(f"{name}_loss", line_plot(curves, "step", "value", f"{name}: loss terms"))


def logger_for(recorder: RunRecorder, prefix: str, offset: int = 0) -> Callable[[dict[str, float], int], None]:
    """log(values, step) writing `prefix`/name at step + offset (phases of one run keep steps increasing)."""
    return lambda values, step: recorder.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step + offset)


def snapshot_logger(recorder: RunRecorder, name: str, offset: int = 0) -> Callable[[int, torch.Tensor], None]:
    """on_snapshot(step, image) saving images/`name`_progress_<step + offset>.png, logged at the step it shows."""
    return lambda step, image: recorder.image(f"{name}_progress", image[0], step=step + offset)


def step_timings(task: str, lam: float, steps: int, overrides: Sequence[str] = ("model=toy",)) -> float:
    """Milliseconds per optimisation step of task=`task` (a key of GUIDANCE_TASKS) at its config defaults,
    with its λ set to `lam` (loss.explainability, or loss.spatial for spatial); one untimed warm-up step first.

    `overrides` are extra Hydra overrides (e.g. "device=cuda", "generator.size=64").
    """
    if task not in GUIDANCE_TASKS:
        raise ValueError(f"step_timings: task={task!r} is not a guidance task; use one of {list(GUIDANCE_TASKS)}")
    module = importlib.import_module(GUIDANCE_TASKS[task])  # each defines LAMBDA_KEY and setup(cfg, guide, generator)
    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        cfg = compose(config_name="config",
                      overrides=[f"task={task}", f"{module.LAMBDA_KEY}={lam}", "logger=none", *overrides])
    seed_everything(cfg.seed)
    guide = load_guide(cfg)
    generator, objective = module.setup(cfg, guide, build_generator(cfg))
    optimise(generator, objective, steps=1, lr=cfg.task.lr, lambda_key=module.LAMBDA_KEY)
    if guide.device.type == "cuda":
        torch.cuda.synchronize(guide.device)
    start = time.perf_counter()
    optimise(generator, objective, steps=steps, lr=cfg.task.lr, lambda_key=module.LAMBDA_KEY)
    if guide.device.type == "cuda":
        torch.cuda.synchronize(guide.device)
    return (time.perf_counter() - start) * 1000.0 / steps


# ---------------------------------------------------------------------------------------------------------
# Words of a prompt (generate and edit)


def single_prompt(text) -> str:
    prompts = prompts_from_config(text, None)
    if len(prompts) != 1:
        raise ConfigError(f"task.text has {len(prompts)} prompts; generation takes one, e.g. task.text='a red circle'")
    return prompts[0]


def check_word_flags(word_mode: str, words) -> None:
    """task.words as flags (word_mode=flags), checked without the tokenizer, so before any model is loaded:
    numbers >= 0 with at least one nonzero (their count needs the tokenizer: :func:`word_choice` checks it)."""
    if word_mode != "flags" or words is None:
        return
    try:
        flags = parse_flags(words)
    except ValueError as err:
        raise ConfigError(f"task.words: {err}") from None
    if not any(flags):
        raise ConfigError(f"task.words={words!r} marks no word (all flags are 0); give each desired word a nonzero "
                          "flag, e.g. task.words='\"0 1 0\"' for the second of three words")


def word_choice(guide: Guide, prompt: str, word_mode: str, words) -> tuple[WordSelection, bool]:
    """The candidate words and whether they were chosen automatically (task.words null: the semantic words)."""
    check_word_flags(word_mode, words)
    tokenizer, length = guide.bundle.tokenizer, guide.bundle.context_length
    try:
        if words is None:
            return select_words(tokenizer, prompt, length, "semantic", None), True
        return select_words(tokenizer, prompt, length, word_mode, words), False
    except ValueError as err:
        raise ConfigError(f"task.word_mode={word_mode}, task.words={words!r}: {err}") from None


def score_words(
    guide: Guide, views: torch.Tensor, token_ids: torch.Tensor, spans: list[list[int]]
) -> tuple[list[float], float]:
    """Generation score of each word (`spans`: token positions per word) and the AugCLIP score, over the eval
    views (V, 3, S, S) of one image. token_ids (1, L). Returns (mean score per word, mean cosine over the views)."""
    n = views.shape[0]
    result = explain_pairs(guide.model, views, token_ids.expand(n, -1), target="cosine", text=True, image=False)
    scores = generation_word_scores(result.text_row.detach(), token_ids.argmax(dim=-1).expand(n), spans)
    return scores.mean(dim=0).tolist(), float(result.similarity.detach().mean())
