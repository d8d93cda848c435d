#!/usr/bin/env python
"""λ = 0 against λ > 0 on the shapes world with the toy CLIP: spatial conditioning and two-object generation.

    python scripts/measure_generation.py spatial --seeds 0 1 2 3 4 --lambdas 0 0.15 0.5
    python scripts/measure_generation.py generate --seeds 0 1 2 3 4 --lam 0.1
    python scripts/measure_generation.py spatial -- generator=fft task.steps=150   # extra Hydra overrides

Every run is a real task run (`experiment=spatial_shapes` / `generate_shapes`, composed in-process) writing to
--out; the script reads its metrics.json and final images and prints Markdown tables (mean ± std over seeds),
plus one JSON row per phrase or word with --json.

Colour masks decide what was drawn. A pixel has colour c when its hue is nearest to c's among the world's six
object colours and it is saturated and bright enough (HSV S >= --saturation, V >= --value); a 2x2 opening then
drops single-pixel speckle. An object is *present* when the largest 8-connected blob of its colour covers at least
--min-area of the image (1 % = 41 px at 64 px; the world's small objects cover 2.5-5 %). Shapes are not checked,
only colours. Hue rather than RGB distance, because CLIP-guided colours come out desaturated (pink for red).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from matplotlib.colors import rgb_to_hsv
from PIL import Image
from scipy import ndimage

from explainguide.app import run_task
from explainguide.data.shapes import COLOURS, parse_caption
from explainguide.guidance import box_mask, fraction_inside
from explainguide.runtime import RunContext

REPO = Path(__file__).resolve().parents[1]

SPATIAL_SETTINGS = {
    "one object": [("a red circle", [2, 16, 28, 32])],
    "two objects": [("a red circle", [2, 16, 28, 32]), ("a blue square", [34, 16, 28, 32])],
}
GENERATION_PROMPTS = [
    "a yellow star and a purple cross",
    "a red circle and a blue square",
    "a green triangle and an orange heart",
]


# ---------------------------------------------------------------------------------------------------------
# Colour masks (pure array functions)


def colour_mask(image: np.ndarray, colour: str, min_saturation: float, min_value: float) -> np.ndarray:
    """(H, W) bool: pixels of image (H, W, 3) uint8 whose hue is nearest to `colour`'s among the world's six
    colours, with HSV saturation >= min_saturation and value >= min_value; then a 2x2 binary opening removes
    single-pixel speckle."""
    hsv = rgb_to_hsv(image.astype(np.float32) / 255.0)
    palette = rgb_to_hsv(np.array(list(COLOURS.values()), dtype=np.float32))[:, 0]  # (C,) hues in [0, 1)
    gap = np.abs(hsv[..., :1] - palette)
    nearest = np.minimum(gap, 1 - gap).argmin(axis=-1)  # hue is circular
    mask = (nearest == list(COLOURS).index(colour)) & (hsv[..., 1] >= min_saturation) & (hsv[..., 2] >= min_value)
    return ndimage.binary_opening(mask, structure=np.ones((2, 2)))


def largest_blob_fraction(mask: np.ndarray) -> float:
    """Area of the largest 8-connected component of mask (H, W), as a fraction of the image."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return 0.0
    return float(np.bincount(labels.ravel())[1:].max()) / mask.size


def phrase_colour(phrase: str) -> str:
    pairs = parse_caption(phrase)
    if not pairs:
        raise ValueError(f"phrase {phrase!r} names no colour and shape of the shapes world")
    return pairs[0][0]


# ---------------------------------------------------------------------------------------------------------
# Runs


def run_once(overrides: Sequence[str], out: Path) -> tuple[dict, Path]:
    """One task run into `out`; returns its metrics.json and images folder."""
    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        cfg = compose(config_name="config", overrides=list(overrides))
    run_task(cfg, RunContext(output_dir=out, launch_dir=REPO, name=out.name))
    return json.loads((out / "metrics.json").read_text(encoding="utf-8")), out / "images"


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def spatial(args: argparse.Namespace) -> list[dict]:
    rows = []
    for setting, phrases in SPATIAL_SETTINGS.items():
        spec = ", ".join(f"{{text: {text}, box: [{', '.join(map(str, box))}]}}" for text, box in phrases)
        for lam in args.lambdas:
            for seed in args.seeds:
                name = f"spatial_{setting.replace(' ', '_')}_lam{lam}_seed{seed}"
                start = time.perf_counter()
                metrics, pictures = run_once(
                    ["experiment=spatial_shapes", f"seed={seed}", f"loss.spatial={lam}", f"task.phrases=[{spec}]",
                     "logger=none", "progress=false", *args.overrides], args.out / name)
                image = read_png(pictures / "final.png")
                size = image.shape[:2]
                for k, (text, box) in enumerate(phrases):
                    colour = colour_mask(image, phrase_colour(text), args.saturation, args.value)
                    colour = torch.from_numpy(colour).float()
                    rows.append({
                        "setting": setting, "lambda": lam, "seed": seed, "phrase": text,
                        "area_fraction": metrics["spatial/area_fraction"][k],
                        "relevance_in_box": metrics["spatial/relevance_in_mask"][k],
                        "colour_in_box": float(fraction_inside(colour, box_mask(tuple(box), size))),
                        "colour_pixels": float(colour.mean()),
                        "augclip": metrics["spatial/augclip"][k],
                        "seconds": time.perf_counter() - start,
                    })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def spatial_table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["setting"], row["phrase"], row["lambda"])].append(row)
    lines = ["| setting | phrase | box area | λ | relevance in box | target colour in box | colour pixels | AugCLIP "
             "| n |", "|---|---|---|---|---|---|---|---|---|"]
    for (setting, phrase, lam), group in groups.items():
        lines.append(
            f"| {setting} | {phrase} | {group[0]['area_fraction']:.3f} | {lam:g} | "
            f"{mean_std([r['relevance_in_box'] for r in group])} | {mean_std([r['colour_in_box'] for r in group])} | "
            f"{mean_std([r['colour_pixels'] for r in group])} | {mean_std([r['augclip'] for r in group])} "
            f"| {len(group)} |")
    return "\n".join(lines)


def generate(args: argparse.Namespace) -> list[dict]:
    rows = []
    for prompt in GENERATION_PROMPTS:
        colours = [colour for colour, _ in parse_caption(prompt)]
        for seed in args.seeds:
            name = f"generate_{prompt.replace(' ', '_')}_lam{args.lam}_seed{seed}"
            metrics, pictures = run_once(
                ["experiment=generate_shapes", f"seed={seed}", f"loss.explainability={args.lam}",
                 f"task.text='{prompt}'", "logger=none", "progress=false", *args.overrides], args.out / name)
            words = metrics["generate/words"]
            chosen = metrics["generate/chosen"]
            for phase, picture in (("plain", "plain.png"), ("guided", "guided.png")):
                image = read_png(pictures / picture)
                blobs = [largest_blob_fraction(colour_mask(image, c, args.saturation, args.value)) for c in colours]
                scores = metrics[f"generate/word_scores_{phase}"]
                rows.append({
                    "prompt": prompt, "lambda": 0.0 if phase == "plain" else args.lam, "seed": seed,
                    "present": [b >= args.min_area for b in blobs], "blob_fraction": blobs,
                    "both_present": all(b >= args.min_area for b in blobs),
                    "chosen_scores": {w: s for w, s in zip(words, scores) if w in chosen},
                    "min_chosen_score": min(s for w, s in zip(words, scores) if w in chosen),
                    "augclip": metrics[f"generate/augclip_{phase}"],
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def generation_table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["prompt"], row["lambda"])].append(row)
    lines = ["| prompt | λ | both present | each present | min chosen-word score | mean chosen-word score "
             "| AugCLIP | n |", "|---|---|---|---|---|---|---|---|"]
    for (prompt, lam), group in groups.items():
        each = " / ".join(f"{sum(r['present'][k] for r in group)}" for k in range(len(group[0]["present"])))
        means = [statistics.mean(r["chosen_scores"].values()) for r in group]
        lines.append(
            f"| {prompt} | {lam:g} | {sum(r['both_present'] for r in group)}/{len(group)} | {each} | "
            f"{mean_std([r['min_chosen_score'] for r in group])} | {mean_std(means)} | "
            f"{mean_std([r['augclip'] for r in group])} | {len(group)} |")
    return "\n".join(lines)


COMMANDS = {"spatial": (spatial, spatial_table), "generate": (generate, generation_table)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.15], help="spatial: loss.spatial values")
    parser.add_argument("--lam", type=float, default=0.1, help="generate: loss.explainability of the guided run")
    parser.add_argument("--saturation", type=float, default=0.4, help="colour mask: min HSV saturation")
    parser.add_argument("--value", type=float, default=0.35, help="colour mask: min HSV value")
    parser.add_argument("--min-area", type=float, default=0.01, help="presence: min largest-blob fraction")
    parser.add_argument("--out", type=Path, help="run folders go here",
                        default=REPO / "outputs" / "measure_generation" / time.strftime("%Y%m%d_%H%M%S"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    argv = list(argv if argv is not None else sys.argv[1:])
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1:]  # extra Hydra overrides, after --
    torch.set_num_threads(args.threads)
    measure, table = COMMANDS[args.command]
    rows = measure(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
