"""task=spatial: draw each phrase inside its box or mask (the reference's VQGAN+CLIP spatial conditioning).

Per phrase i ("a photo of " + phrase) and step: n cutouts of the image and the same geometric cutouts of the
mask; loss_i = mean spherical distance of CLIP(cutouts) and CLIP(cutouts ⊙ mask) to the text
+ λ_i·(−dice(soft-binarised image relevance of the cutouts, their masks)). The image relevance uses blocks from
``task.first_block`` on (the reference: the last block only), the cosine target and second order; λ_i = λ/√(area
fraction of the mask) when ``loss.spatial_area_scaling``. Masking multiplies the *normalised* cutout, so
outside the mask it is CLIP's mean colour, as the reference does. Phrases' losses add up.

Boxes are checked before anything is built: reversed, zero-area or wholly outside boxes are errors, boxes
reaching outside are clipped with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchvision.transforms.functional import to_grayscale, to_tensor

from explainguide.explain.capture import image_blocks
from explainguide.explain.engine import explain_pairs
from explainguide.explain.scores import spatial_relevance_map
from explainguide.generators import Generator, make_cutouts
from explainguide.generators.base import resolve_size
from explainguide.guidance import (
    area_scaled_weight,
    augclip_score,
    binarize_mask,
    box_mask,
    check_box,
    fraction_inside,
    similarity_loss,
    spatial_dice,
)
from explainguide.images import load_image
from explainguide.runtime import ConfigError, RunContext
from explainguide.tasks.common import open_recorder
from explainguide.tasks.guided import (
    Guide,
    Objective,
    build_generator,
    eval_views,
    image_relevance,
    load_guide,
    logger_for,
    optimise,
    record_trace,
    snapshot_logger,
)
from explainguide.viz import heatmap_overlay

log = logging.getLogger(__name__)

LAMBDA_KEY = "loss.spatial"
PHRASE_KEYS = ("text", "box", "mask")
# Below this share of the image a region's λ_i = λ/√area grows large (10x λ at 1 %) and few patches cover it.
SMALL_AREA = 0.01
# Above this share the dice term is met by any map: the region conditions (almost) nothing.
LARGE_AREA = 0.95


@dataclass(frozen=True)
class Region:
    """One phrase and where it goes: the CLIP text (prefix + phrase), a mask (H, W) in {0, 1}, and its λ_i."""

    text: str
    mask: torch.Tensor
    weight: float


def _region_mask(entry: DictConfig, index: int, size: tuple[int, int], launch_dir: Path) -> torch.Tensor:
    """The entry's box or mask file as a (H, W) mask at `size`; exactly one of the two must be given."""
    where = f"task.phrases[{index}]"
    box, mask_file = entry.get("box"), entry.get("mask")
    if (box is None) == (mask_file is None):
        raise ConfigError(f"{where} needs exactly one of box=[left, top, width, height] or mask=<image file>")
    if box is not None:
        return box_mask(check_box(box, size, f"{where}.box"), size)
    path = Path(mask_file).expanduser()
    path = path if path.is_absolute() else launch_dir / path
    if not path.is_file():
        raise ConfigError(f"{where}.mask={mask_file!r}: {path} does not exist; give a mask image (white = inside), "
                          "relative paths start at the launch dir")
    picture = load_image(path)
    return binarize_mask(to_tensor(to_grayscale(picture))[0], size, f"{where}.mask={mask_file}")


def regions_from_config(cfg: DictConfig, launch_dir: Path) -> list[Region]:
    """task.phrases checked against the configured generator size, before any network is built.

    Each entry: {text: phrase, box: [left, top, width, height]} or {text: phrase, mask: file (white = inside)};
    relative mask files are read from `launch_dir`.
    """
    task = cfg.task
    phrases = task.get("phrases")
    if not phrases:
        raise ConfigError("task.phrases is empty; give e.g. '[{text: a red circle, box: [0, 16, 32, 32]}]'")
    size = resolve_size(cfg.generator.size, cfg.generator.name)
    lam, scale_by_area = float(cfg.loss.spatial), bool(cfg.loss.spatial_area_scaling)
    regions = []
    for index, entry in enumerate(phrases):
        where = f"task.phrases[{index}]"
        unknown = sorted(set(entry) - set(PHRASE_KEYS)) if isinstance(entry, DictConfig) else []
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {unknown}; its keys are {list(PHRASE_KEYS)}, "
                              "e.g. {text: a red circle, box: [0, 16, 32, 32]}")
        phrase = str(entry.get("text") or "").strip() if isinstance(entry, DictConfig) else ""
        if not phrase:
            raise ConfigError(f"{where}={entry!r} has no text; give {{text: <phrase>, box: [...]}}")
        mask = _region_mask(entry, index, size, launch_dir)
        region = Region(task.prefix + phrase, mask, area_scaled_weight(lam, mask, scale_by_area))
        area = float(mask.mean())
        if area < SMALL_AREA:
            log.warning("%s covers %.2f %% of the %dx%d image (%d px), so λ_i = %.3g (loss.spatial=%g%s); enlarge "
                        "its box or mask", where, 100 * area, size[1], size[0], int(mask.sum()), region.weight, lam,
                        ", divided by √area" if scale_by_area else "")
        if area > LARGE_AREA:
            log.warning("%s covers %.0f %% of the image: any relevance map lies inside it, so the spatial term "
                        "conditions nothing; give a smaller box or mask", where, 100 * area)
        regions.append(region)
    return regions


def resolve_block(first_block: int, depth: int) -> int:
    """A block index of a `depth`-block tower; negative counts from the end (−1: the last block)."""
    if not -depth <= first_block < depth:
        raise ConfigError(f"task.first_block={first_block} is outside the image tower's {depth} blocks; "
                          f"use 0..{depth - 1} or -{depth}..-1")
    return first_block % depth


def mask_stack(regions: list[Region], size: tuple[int, int]) -> torch.Tensor:
    """The regions' masks as (1, K, H, W) at the generator's `size` (nearest, if it rounded the configured size)."""
    masks = torch.stack([region.mask for region in regions])[None]
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=tuple(size), mode="nearest")
    return masks


def spatial_objective(
    guide: Guide,
    token_ids: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    first_block: int,
    threshold: float,
    temperature: float,
    similarity_weight: float,
    similarity: str,
    cutouts: DictConfig,
    rng: torch.Generator,
) -> Objective:
    """Σ_i [w·mean sim over cutouts and masked cutouts + λ_i·(−mean dice)], K phrases at once.

    token_ids (K, L); masks (1, K, H, W); weights (K,) the λ_i. With any λ_i > 0 the unmasked cosines come from
    the relevance forward, so each cutout is encoded once per phrase and not again.
    """
    text_features = guide.text_features(token_ids)  # (K, E)
    phrases = token_ids.shape[0]
    explain = bool((weights > 0).any())

    def objective(image: torch.Tensor) -> dict[str, torch.Tensor]:
        cut, cut_masks = make_cutouts(image, masks, cut_size=guide.size, generator=rng, **cutouts)
        pixels = guide.pixels(cut)  # (n, 3, S, S)
        n, side = pixels.shape[0], pixels.shape[-1]
        per_phrase = cut_masks.transpose(0, 1).reshape(phrases * n, 1, side, side)  # phrase-major
        repeated = pixels.repeat(phrases, 1, 1, 1)
        masked_cosine = guide.cosine(repeated * per_phrase, text_features.repeat_interleave(n, dim=0))
        terms = {}
        if explain:
            result = explain_pairs(guide.model, repeated, token_ids.repeat_interleave(n, dim=0), target="cosine",
                                   order="second", text=False, image=True, image_first_block=first_block)
            cosine = result.similarity
            dice = spatial_dice(result.image_row, per_phrase, threshold, temperature).view(phrases, n).mean(dim=1)
            explainability = -(weights * dice).sum()
            terms["dice"] = dice.mean()
        else:
            features = guide.model.encode_image(pixels)
            cosine = F.cosine_similarity(features[None], text_features[:, None], dim=-1).reshape(-1)
            explainability = torch.zeros((), device=guide.device)
        # Each phrase's loss is the mean over its 2n views; phrases add up (all have 2n views).
        sim = phrases * similarity_loss(similarity, torch.cat([cosine, masked_cosine]))
        return {"loss": similarity_weight * sim + explainability, "similarity": sim,
                "explainability": explainability, "cosine": cosine.mean(), **terms}

    return objective


def setup(cfg: DictConfig, guide: Guide, generator: Generator) -> tuple[Generator, Objective]:
    """The generator on the model's device and the spatial objective at the configured λ (mask files relative to
    the working directory)."""
    return setup_regions(cfg, guide, generator, regions_from_config(cfg, Path.cwd()))


def setup_regions(cfg: DictConfig, guide: Guide, generator: Generator, regions: list[Region]
                  ) -> tuple[Generator, Objective]:
    """The generator on the model's device and the spatial objective for checked `regions`."""
    task = cfg.task
    generator = generator.to(guide.device)
    depth = len(image_blocks(guide.model))
    objective = spatial_objective(
        guide, guide.tokens([r.text for r in regions]), mask_stack(regions, generator.size).to(guide.device),
        torch.tensor([r.weight for r in regions], device=guide.device), resolve_block(task.first_block, depth),
        task.threshold, task.temperature, float(cfg.loss.similarity), task.similarity, task.cutouts,
        guide.cutout_rng(cfg.seed))
    return generator, objective


def outline(picture: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """picture (H, W, 3) uint8 with the border of mask (H, W) painted white."""
    m = mask[None, None].float()
    border = (m - (-F.max_pool2d(-m, 3, stride=1, padding=1)))[0, 0].bool().numpy()
    painted = picture.copy()
    painted[border] = 255
    return painted


def run(cfg: DictConfig, ctx: RunContext) -> dict:
    task = cfg.task
    regions = regions_from_config(cfg, ctx.launch_dir)  # boxes and masks fail here, before anything is built
    generator = build_generator(cfg)
    guide = load_guide(cfg)
    generator, objective = setup_regions(cfg, guide, generator, regions)
    depth = len(image_blocks(guide.model))
    first_block = resolve_block(task.first_block, depth)
    masks = mask_stack(regions, generator.size)  # (1, K, H, W)
    token_ids = guide.tokens([r.text for r in regions])
    for region in regions:
        log.info("phrase %r: mask area %.3f, λ_i %.4g", region.text, float(region.mask.mean()), region.weight)

    with open_recorder(cfg, ctx, job_type="spatial") as recorder:
        trace = optimise(generator, objective, task.steps, task.lr, LAMBDA_KEY, task.snapshot_every, cfg.progress,
                         desc="spatial", log=logger_for(recorder, "spatial"),
                         on_snapshot=snapshot_logger(recorder, "final"))
        record_trace(recorder, trace, "final")
        rows = image_relevance(guide, trace.image, token_ids, first_block).cpu()  # (K, 1 + P)
        relevance = spatial_relevance_map(rows, tuple(generator.size))  # (K, 1, H, W)
        inside = fraction_inside(relevance[:, 0].clamp(min=0), masks[0])  # bicubic resizing can undershoot 0
        dice = spatial_dice(rows, masks.transpose(0, 1), task.threshold, task.temperature)
        with torch.no_grad():
            features = guide.model.encode_image(eval_views(guide, trace.image, task.cutouts, task.eval_views, cfg.seed))
        text_features = guide.text_features(token_ids)
        augclip = [float(augclip_score(features, text_features[k])) for k in range(len(regions))]
        for k, region in enumerate(regions):
            overlay = outline(heatmap_overlay(trace.image[0], relevance[k, 0]), masks[0, k])
            recorder.image(f"relevance_{k:02d}", overlay, caption=region.text)
        areas = [float(r.mask.mean()) for r in regions]
        recorder.table("phrases", ["phrase", "area_fraction", "lambda_i", "relevance_in_mask", "dice", "augclip"],
                       [[r.text, round(a, 4), round(r.weight, 4), round(float(i), 4), round(float(d), 4), round(c, 4)]
                        for r, a, i, d, c in zip(regions, areas, inside, dice, augclip)])
        metrics = {
            "spatial/phrases": [r.text for r in regions],
            "spatial/lambda": float(cfg.loss.spatial),
            "spatial/lambda_i": [r.weight for r in regions],
            "spatial/area_fraction": areas,
            "spatial/relevance_in_mask": inside.tolist(),
            "spatial/dice": dice.tolist(),
            "spatial/augclip": augclip,
            "model_source": guide.bundle.source,
        }
        recorder.summary(metrics)
    return metrics
