"""The embedded "shapes" world: a seeded, procedural image–caption world with exact object boxes.

Every image holds 1–3 flat, coloured shapes (colour × shape × size × position; by default placed on the
8-pixel patch grid, see ``ShapesWorld(position_snap=...)``) over a low-contrast grey background (noise,
gradient and soft blotches, never saturated, so never similar to an object colour).
Nothing is read from disk: every sample is drawn on the fly from a seed, so the same seed always gives the
same pixels, objects, boxes and caption.

Views
-----
* :class:`ShapesWorld` – the generator itself: ``sample(rng)``, ``samples(n, seed)``, ``batch(n, seed)``,
  ``render(specs, rng)`` for hand-specified scenes, and ``caption(objects, rng)``.
* :class:`ShapesCaptions` – an endless ``IterableDataset`` of ``(image, caption)`` pairs for CLIP training.
* :class:`ShapesClassification` – single-object images, classes = colour × shape ("red circle", ...), with
  ``train``/``val``/``test`` splits whose per-index seeds are derived from ``(seed, split, index)``, so the
  splits never share an image. It exposes ``classnames`` and ``templates`` like any zero-shot dataset.

Images are float32 tensors in [0, 1] of shape (3, H, W); :func:`normalize` applies the CLIP mean/std.
Each object carries its bounding box ``(left, top, width, height)`` in pixels, tight to its drawn pixels,
and its boolean mask (:func:`object_masks`). Objects never overlap, so each mask is fully visible.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from explainguide.data.templates import COMPARISON_TEMPLATES

try:  # the canonical constants; fall back to their (fixed) values if open_clip is unavailable
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
except Exception:  # pragma: no cover
    OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
    OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "IMAGE_SIZE", "COLOURS", "SHAPES", "SIZES", "SIZE_RANGES", "CLASSNAMES", "TEMPLATES", "CAPTION_TEMPLATES",
    "SPLITS", "ObjectSpec", "ShapeObject", "ShapeSample", "ShapesWorld", "ShapesCaptions",
    "ShapesClassification", "object_masks", "object_boxes", "parse_caption", "normalize", "denormalize",
    "collate_samples",
]

IMAGE_SIZE = 64

#: colour name -> RGB in [0, 1]; saturated and pairwise far apart (min distance > 0.3).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.10, 0.68, 0.20),
    "blue": (0.12, 0.28, 0.92),
    "yellow": (0.96, 0.88, 0.08),
    "purple": (0.58, 0.16, 0.80),
    "orange": (1.00, 0.52, 0.02),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES: tuple[str, ...] = ("small", "large")
#: diameter range (inclusive, pixels at 64 px; scaled with the image size) of each size word.
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (12, 17), "large": (23, 30)}
_ANGLES = tuple(range(-15, 16, 5))  # degrees; small enough that a square never looks like a diamond

CLASSNAMES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]

#: zero-shot prompt templates (each with one "{}" for the class name): the comparison set's first six, then two
#: that fit a clean drawn world better than its "a bad photo of the {}." and "art of the {}.".
TEMPLATES: list[str] = [*COMPARISON_TEMPLATES[:6], "a good photo of a {}.", "an image of a {}."]

#: training caption templates; "{}" is the full noun phrase list, articles included.
CAPTION_TEMPLATES: list[str] = [
    "{}", "{}", "{}.", "a photo of {}.", "a photo of {}", "a picture of {}.", "an image of {}.",
    "a drawing of {}.", "a rendering of {}.", "a painting of {}.", "a close-up photo of {}.",
    "a good photo of {}.", "there is {} in the picture.", "{} on a plain background.",
    "a simple illustration of {}.", "itap of {}.", "a blurry photo of {}.", "a cropped photo of {}.",
]

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_STREAM_KEY = 1000  # seed key of the caption stream, distinct from every classification split
_BATCH_KEY = 2000  # seed key of ShapesWorld.batch / samples

_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_PAIR_RE = re.compile(rf"\b({_COLOUR_RE})\s+({_SHAPE_RE})\b")
_ARTICLE_RE = re.compile(r"\b(an?) ([a-z])")


# ----------------------------------------------------------------------------------------------------------
# shape stencils


def _polygon_inside(u: np.ndarray, v: np.ndarray, verts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < x_at)
    return inside


_STAR = [
    (r * np.sin(k * np.pi / 5), -r * np.cos(k * np.pi / 5)) for k, r in zip(range(10), [1.0, 0.48] * 5)
]
_TRIANGLE = [(0.0, -1.0), (1.0, 0.78), (-1.0, 0.78)]


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in [-1, 1]^2 coordinates (u right, v down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "triangle":
        return _polygon_inside(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon_inside(u, v, _STAR)
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.34) & (b <= 1.0)) | ((b <= 0.34) & (a <= 1.0))
    if shape == "heart":
        x, y = u * 1.2, -(v * 1.2) + 0.15  # y up
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=4096)
def _stencil(shape: str, diameter: int, angle: int, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage (h, w) float32 in [0, 1] of one shape, cropped tight to its nonzero pixels."""
    d = int(diameter)
    c = (np.arange(d * ss, dtype=np.float64) + 0.5) / ss  # sub-pixel centres in pixel units
    half = d / 2.0
    yy, xx = np.meshgrid((c - half) / half, (c - half) / half, indexing="ij")
    t = np.deg2rad(angle)
    u = np.cos(t) * xx + np.sin(t) * yy  # rotate the sampling grid by -angle
    v = -np.sin(t) * xx + np.cos(t) * yy
    cov = _inside(shape, u, v).reshape(d, ss, d, ss).mean(axis=(1, 3)).astype(np.float32)
    cov[cov < 2.0 / (ss * ss)] = 0.0  # drop near-invisible slivers: every kept pixel is visibly drawn
    rows, cols = np.nonzero(cov.any(axis=1))[0], np.nonzero(cov.any(axis=0))[0]
    out = cov[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    out.setflags(write=False)
    return out


# ----------------------------------------------------------------------------------------------------------
# data records


@dataclass
class ObjectSpec:
    """What to draw. Unset fields are drawn at random by :meth:`ShapesWorld.render`.

    ``position`` is the object's (left, top) in pixels; ``centre`` its approximate centre (x, y).
    """

    colour: str
    shape: str
    size: str | None = None
    diameter: int | None = None
    angle: int | None = None
    position: tuple[int, int] | None = None
    centre: tuple[float, float] | None = None


@dataclass
class ShapeObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    diameter: int
    angle: int
    box: tuple[int, int, int, int]  # left, top, width, height (pixels), tight to the drawn pixels
    image_size: int
    local_mask: np.ndarray = field(repr=False)  # (height, width) bool, the drawn pixels inside the box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def label(self) -> int:
        return CLASSNAMES.index(self.name)

    @property
    def centre(self) -> tuple[float, float]:
        l, t, w, h = self.box
        return (l + w / 2.0, t + h / 2.0)

    @property
    def mask(self) -> np.ndarray:
        """Full-image (H, W) boolean mask of the drawn pixels."""
        m = np.zeros((self.image_size, self.image_size), dtype=bool)
        l, t, w, h = self.box
        m[t: t + h, l: l + w] = self.local_mask
        return m

    @property
    def location(self) -> str | None:
        """'left'/'right'/'top'/'bottom'/'middle'/'top left'/... or None when not clearly in one third."""
        cx, cy = self.centre
        s = self.image_size
        hz = "left" if cx < s / 3 else "right" if cx > 2 * s / 3 else None
        vt = "top" if cy < s / 3 else "bottom" if cy > 2 * s / 3 else None
        if hz and vt:
            return f"{vt} {hz}"
        if hz or vt:
            return hz or vt
        if abs(cx - s / 2) < s / 8 and abs(cy - s / 2) < s / 8:
            return "middle"
        return None


@dataclass
class ShapeSample:
    image: torch.Tensor  # (3, H, W) float32 in [0, 1]
    objects: list[ShapeObject]
    caption: str = ""
    mentioned: list[int] = field(default_factory=list)  # object indices in the caption's order of mention

    @property
    def boxes(self) -> torch.Tensor:
        return object_boxes(self)

    @property
    def masks(self) -> torch.Tensor:
        return object_masks(self)

    @property
    def label(self) -> int:
        """Class index (colour × shape) of the first object: meaningful for single-object samples."""
        return self.objects[0].label


def object_masks(sample: ShapeSample) -> torch.Tensor:
    """(K, H, W) bool tensor: the drawn pixels of each of the sample's K objects."""
    if not sample.objects:
        s = sample.image.shape[-1]
        return torch.zeros(0, s, s, dtype=torch.bool)
    return torch.from_numpy(np.stack([o.mask for o in sample.objects]))


def object_boxes(sample: ShapeSample) -> torch.Tensor:
    """(K, 4) long tensor of (left, top, width, height) boxes."""
    return torch.tensor([o.box for o in sample.objects], dtype=torch.long).reshape(-1, 4)


def parse_caption(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption mentions, in order."""
    return [(m.group(1), m.group(2)) for m in _PAIR_RE.finditer(text.lower())]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation of (…, 3, H, W) images in [0, 1] (uint8 is converted first)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return images * std + mean


def collate_samples(samples: Sequence[ShapeSample]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([s.image for s in samples]), [s.caption for s in samples]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_LOC_PHRASES = {
    "left": ["on the left", "on the left side"],
    "right": ["on the right", "on the right side"],
    "top": ["at the top", "near the top"],
    "bottom": ["at the bottom", "near the bottom"],
    "middle": ["in the middle", "in the center"],
}


def _loc_phrase(loc: str, rng: np.random.Generator) -> str:
    if loc in _LOC_PHRASES:
        opts = _LOC_PHRASES[loc]
        return opts[int(rng.integers(len(opts)))]
    return f"in the {loc} corner"


# ----------------------------------------------------------------------------------------------------------
# the world


class ShapesWorld:
    """Procedural generator of shapes images, their objects and captions.

    Args:
        image_size: side in pixels (sizes of objects scale with it; 64 is the reference).
        object_count_probs: probabilities of 1, 2, 3 objects per caption-stream image.
        p_size_word / p_location: chance a noun phrase names the object's size / (single object) location.
        p_relation: chance a two-object caption uses a spatial relation ("to the left of", "above") when
            the layout makes one unambiguous.
        position_snap: randomly placed objects have their box's top-left corner rounded to a multiple of this
            many pixels (8 = the toy CLIP's patch grid at 64 px). A ViT with 8-px patches learns shape from
            scratch on 2 CPU cores only when objects sit on its patch grid (a probe with free sub-patch
            placement was still at chance on shape after 200 supervised steps; snapped: ~50%). Set 1 for
            free placement.
    """

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        object_count_probs: Sequence[float] = (0.4, 0.45, 0.15),
        p_size_word: float = 0.25,
        p_location: float = 0.2,
        p_relation: float = 0.25,
        position_snap: int = 8,
    ):
        self.image_size = int(image_size)
        p = np.asarray(object_count_probs, dtype=np.float64)
        self.object_count_probs = p / p.sum()
        self.p_size_word = p_size_word
        self.p_location = p_location
        self.p_relation = p_relation
        self.position_snap = max(1, int(position_snap))
        self.colours = list(COLOURS)
        self.shapes = list(SHAPES)
        self.classnames = list(CLASSNAMES)
        self.templates = list(TEMPLATES)
        self._rgb = {k: np.asarray(v, dtype=np.float32) for k, v in COLOURS.items()}
        scale = self.image_size / 64.0
        self.size_ranges = {k: (max(4, round(a * scale)), max(5, round(b * scale))) for k, (a, b) in SIZE_RANGES.items()}
        n_ctrl = 5
        grid = np.linspace(0, n_ctrl - 1, self.image_size)
        interp = np.zeros((self.image_size, n_ctrl), dtype=np.float32)  # linear-interpolation matrix
        lo = np.clip(np.floor(grid).astype(int), 0, n_ctrl - 2)
        frac = grid - lo
        interp[np.arange(self.image_size), lo] = 1 - frac
        interp[np.arange(self.image_size), lo + 1] = frac
        self._interp = interp
        ramp = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size - 0.5
        self._ramp_x, self._ramp_y = np.meshgrid(ramp, ramp, indexing="xy")

    # --- pieces ---------------------------------------------------------------------------------------

    def background(self, rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) float32 low-contrast grey background: dark or light, gradient, blotches, noise."""
        s = self.image_size
        base = rng.uniform(0.05, 0.30) if rng.random() < 0.5 else rng.uniform(0.66, 0.92)
        theta = rng.uniform(0, 2 * np.pi)
        grad = rng.uniform(0.0, 0.12) * (np.cos(theta) * self._ramp_x + np.sin(theta) * self._ramp_y)
        blot = self._interp @ rng.normal(0.0, rng.uniform(0.0, 0.04), size=(5, 5)).astype(np.float32) @ self._interp.T
        lum = base + grad + blot
        tint = rng.uniform(-0.025, 0.025, size=3).astype(np.float32)
        img = lum[:, :, None] + tint[None, None, :]
        img = img + rng.uniform(0.005, 0.03) * rng.standard_normal(size=(s, s, 1), dtype=np.float32)
        return img.astype(np.float32)

    def random_spec(self, rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                    size: str | None = None) -> ObjectSpec:
        colour = colour or self.colours[int(rng.integers(len(self.colours)))]
        shape = shape or self.shapes[int(rng.integers(len(self.shapes)))]
        size = size or SIZES[int(rng.integers(len(SIZES)))]
        return ObjectSpec(colour=colour, shape=shape, size=size)

    def render(self, specs: Sequence[ObjectSpec], rng: np.random.Generator, max_tries: int = 60
               ) -> tuple[torch.Tensor, list[ShapeObject]]:
        """Draw the given objects (non-overlapping) on a random background.

        Objects that cannot be placed without overlap are first shrunk to "small", then dropped.
        Returns the (3, H, W) image in [0, 1] and the placed objects, in spec order.
        """
        s = self.image_size
        img = self.background(rng)
        placed: list[ShapeObject] = []
        taken: list[tuple[int, int, int, int]] = []
        for spec in specs:
            size = spec.size or SIZES[int(rng.integers(len(SIZES)))]
            for attempt_size in ([size, "small"] if size == "large" and spec.diameter is None else [size]):
                lo, hi = self.size_ranges[attempt_size]
                diameter = int(spec.diameter) if spec.diameter is not None else int(rng.integers(lo, hi + 1))
                angle = int(spec.angle) if spec.angle is not None else int(_ANGLES[int(rng.integers(len(_ANGLES)))])
                cov = _stencil(spec.shape, diameter, angle)
                h, w = cov.shape
                box = None
                for _ in range(max_tries if spec.position is None and spec.centre is None else 1):
                    if spec.position is not None:
                        l, t = int(spec.position[0]), int(spec.position[1])
                    elif spec.centre is not None:
                        l, t = int(round(spec.centre[0] - w / 2)), int(round(spec.centre[1] - h / 2))
                    else:
                        l = int(rng.integers(1, max(2, s - w)))
                        t = int(rng.integers(1, max(2, s - h)))
                        if self.position_snap > 1:
                            q = self.position_snap
                            l, t = (l + q // 2) // q * q, (t + q // 2) // q * q
                    l, t = min(max(l, 0), s - w), min(max(t, 0), s - h)
                    if all(l + w + 2 <= L or L + W + 2 <= l or t + h + 2 <= T or T + H + 2 <= t
                           for (L, T, W, H) in taken):
                        box = (l, t, w, h)
                        break
                if box is not None:
                    break
            if box is None:
                continue
            l, t, w, h = box
            rgb = np.clip(self._rgb[spec.colour] + rng.uniform(-0.04, 0.04, size=3).astype(np.float32), 0, 1)
            a = cov[:, :, None]
            img[t: t + h, l: l + w] = img[t: t + h, l: l + w] * (1 - a) + rgb * a
            taken.append(box)
            placed.append(ShapeObject(spec.colour, spec.shape, attempt_size, diameter, angle, box, s, cov > 0))
        img = np.clip(img, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), placed

    def noun_phrase(self, obj: ShapeObject, rng: np.random.Generator, allow_location: bool = False,
                    article: bool = True) -> str:
        words = ([obj.size] if rng.random() < self.p_size_word else []) + [obj.colour, obj.shape]
        phrase = " ".join(words)
        if article:
            phrase = f"{_article(words[0])} {phrase}"
        if allow_location and obj.location is not None and rng.random() < self.p_location:
            phrase = f"{phrase} {_loc_phrase(obj.location, rng)}"
        return phrase

    def caption(self, objects: Sequence[ShapeObject], rng: np.random.Generator) -> tuple[str, list[int]]:
        """A caption naming every object (random order, varied template). Returns (caption, mention order)."""
        n = len(objects)
        order = [int(i) for i in rng.permutation(n)]
        if n == 0:
            return "an empty picture", []
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        if n == 1:
            phrase = self.noun_phrase(objects[0], rng, allow_location=True,
                                      article=not (template == "{}" and rng.random() < 0.3))
            return template.format(phrase), order
        nps = [self.noun_phrase(objects[i], rng) for i in order]
        if n == 2:
            a, b = objects[order[0]], objects[order[1]]
            dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
            rel = None
            if abs(dx) > abs(dy) + 6:
                rel = "to the left of" if dx > 0 else "to the right of"
            elif abs(dy) > abs(dx) + 6:
                rel = "above" if dy > 0 else "below"
            if rel is not None and rng.random() < self.p_relation:
                body = f"{nps[0]} {rel} {nps[1]}"
            else:
                body = f"{nps[0]} and {nps[1]}"
        else:
            body = ", ".join(nps[:-1]) + f" and {nps[-1]}"
        return template.format(body), order

    def hard_negative(self, caption: str, rng: np.random.Generator) -> str:
        """A caption that no longer describes the image: one object's shape or colour is changed, or (with
        two or more objects) two objects swap their colours (a binding negative). The other words stay."""
        found = list(_PAIR_RE.finditer(caption))
        if not found:
            return caption
        edits: list[tuple[int, int, str]] = []
        if len(found) >= 2 and rng.random() < 0.4:
            i, j = (int(k) for k in rng.choice(len(found), size=2, replace=False))
            a, b = found[i], found[j]
            if a.group(1) != b.group(1) and a.group(2) != b.group(2):
                edits = [(a.start(1), a.end(1), b.group(1)), (b.start(1), b.end(1), a.group(1))]
        if not edits:
            m = found[int(rng.integers(len(found)))]
            if rng.random() < 0.65:
                new = [x for x in self.shapes if x != m.group(2)]
                edits = [(m.start(2), m.end(2), new[int(rng.integers(len(new)))])]
            else:
                new = [x for x in self.colours if x != m.group(1)]
                edits = [(m.start(1), m.end(1), new[int(rng.integers(len(new)))])]
        out = caption
        for start, end, text in sorted(edits, reverse=True):
            out = out[:start] + text + out[end:]
        return _ARTICLE_RE.sub(lambda m: f"{_article(m.group(2))} {m.group(2)}", out)  # keep "a"/"an" right

    # --- samples --------------------------------------------------------------------------------------

    def sample(self, rng: np.random.Generator, n_objects: int | None = None) -> ShapeSample:
        """One random scene with 1–3 objects and a caption naming all of them."""
        if n_objects is None:
            n_objects = 1 + int(rng.choice(len(self.object_count_probs), p=self.object_count_probs))
        specs = [self.random_spec(rng) for _ in range(n_objects)]
        image, objects = self.render(specs, rng)
        caption, mentioned = self.caption(objects, rng)
        return ShapeSample(image, objects, caption, mentioned)

    def sample_single(self, rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                      size: str | None = None) -> ShapeSample:
        """A single-object scene (for classification); its caption is "a <colour> <shape>"."""
        image, objects = self.render([self.random_spec(rng, colour, shape, size)], rng)
        o = objects[0]
        return ShapeSample(image, objects, f"{_article(o.colour)} {o.colour} {o.shape}", [0])

    def samples(self, n: int, seed: int, n_objects: int | None = None) -> list[ShapeSample]:
        rng = _rng(seed, _BATCH_KEY)
        return [self.sample(rng, n_objects) for _ in range(n)]

    def batch(self, n: int, seed: int, n_objects: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """(images (n, 3, H, W) in [0, 1], captions) – deterministic in (n, seed)."""
        return collate_samples(self.samples(n, seed, n_objects))


class ShapesCaptions(IterableDataset):
    """Endless (image, caption) stream. Each DataLoader worker gets its own seeded sub-stream."""

    def __init__(self, seed: int = 0, world: ShapesWorld | None = None, normalized: bool = False):
        self.seed = int(seed)
        self.world = world or ShapesWorld()
        self.normalized = normalized

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else info.id
        rng = _rng(self.seed, _STREAM_KEY, wid)
        while True:
            smp = self.world.sample(rng)
            yield (normalize(smp.image) if self.normalized else smp.image), smp.caption


class ShapesClassification(Dataset):
    """Single-object colour × shape classification with disjoint, seed-fixed splits.

    Item ``i`` of split ``split`` is drawn from the seed ``(seed, split id, i)``; its class is ``i % C``
    (balanced). ``__getitem__`` returns ``(image, label)``; :meth:`sample` the full record with box and mask.
    """

    DEFAULT_SIZES = {"train": 3600, "val": 720, "test": 1080}

    def __init__(self, split: str = "test", n: int | None = None, seed: int = 0,
                 world: ShapesWorld | None = None, normalized: bool = False, transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.split = split
        self.n = int(n if n is not None else self.DEFAULT_SIZES[split])
        self.seed = int(seed)
        self.world = world or ShapesWorld()
        self.normalized = normalized
        self.transform = transform
        self.classnames = list(CLASSNAMES)
        self.templates = list(TEMPLATES)
        self.class_to_idx = {c: i for i, c in enumerate(self.classnames)}

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> ShapeSample:
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = _rng(self.seed, SPLITS[self.split], index)
        colour, shape = self.classnames[index % len(self.classnames)].split(" ")
        return self.world.sample_single(rng, colour, shape)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        smp = self.sample(index)
        img = smp.image
        if self.normalized:
            img = normalize(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, index % len(self.classnames)

    def tensors(self, normalized: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (images (n, 3, H, W), labels (n,))."""
        imgs = torch.stack([self.sample(i).image for i in range(self.n)])
        if self.normalized if normalized is None else normalized:
            imgs = normalize(imgs)
        return imgs, torch.arange(self.n) % len(self.classnames)
