"""Renders for reports and loggers: heatmap overlays, token strips and plots.

Every renderer returns an (H, W, 3) uint8 array, the one format that PNG
files, W&B and TensorBoard all accept; `save_png` writes one to disk.
Matplotlib is driven through its object API on the Agg canvas, so nothing
needs a display and no global pyplot state is shared between calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

# Text in token strips uses matplotlib's bundled DejaVu Sans, so the render is
# identical on every machine; glyphs it lacks (e.g. CJK) are drawn as boxes.
_FONT_PATH = font_manager.findfont("DejaVu Sans")
_CHANNEL_COUNTS = (1, 3, 4)


def _numpy(x) -> np.ndarray:
    """Tensor or array-like -> ndarray, on CPU and detached; floats as float32."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        # numpy has no bfloat16; every float tensor goes through float32.
        x = x.float() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def normalise_map(x, eps: float = 1e-8):
    """Min-max scale each map to [0, 1]; a constant map becomes all zeros.

    x: (..., h, w) tensor or array; each trailing (h, w) map is scaled on
    its own. Inputs with fewer than 2 dims (e.g. per-token scores (n,)) are
    one map. Returns the same type (a float tensor keeps its device and
    gradient); never NaN for finite input.
    """
    dims = tuple(range(-min(x.ndim, 2), 0))
    if hasattr(x, "detach"):
        x = x if x.is_floating_point() else x.float()
        lo = x.amin(dim=dims, keepdim=True)
        span = x.amax(dim=dims, keepdim=True) - lo
        # clamp keeps the division finite; where() also blanks maps whose
        # spread is float noise (below eps) instead of stretching it to [0, 1].
        return ((x - lo) / span.clamp_min(eps)).where(span > eps, 0.0)
    x = np.asarray(x)
    x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
    lo = x.min(axis=dims, keepdims=True)
    span = x.max(axis=dims, keepdims=True) - lo
    return np.where(span > eps, (x - lo) / np.maximum(span, eps), 0.0).astype(x.dtype)


def to_uint8_hwc(x) -> np.ndarray:
    """Convert an image to an (H, W, C) uint8 array, C in {3, 4}.

    x: PIL image, or tensor/array shaped (H, W), (H, W, C), (C, H, W) or
    (1, C, H, W) with C in {1, 3, 4}. Floats are read as [0, 1] (clipped,
    NaN -> 0), integers as [0, 255]. As in torchvision, tensors are read as
    channel-first and arrays as channel-last, falling back to the other
    layout when that axis is not of size 1, 3 or 4. Gray (C=1 or 2-D) is
    repeated to RGB so every consumer gets a colour image.
    """
    if isinstance(x, Image.Image):
        x = x.convert("RGBA" if "A" in x.getbands() else "RGB")
    channel_first = hasattr(x, "detach")
    a = _numpy(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = a[..., None]
        channel_first = False
    if a.ndim != 3:
        raise ValueError(f"to_uint8_hwc: expected an image shaped (H, W[, C]) or (C, H, W), got {a.shape}")
    first_ok, last_ok = a.shape[0] in _CHANNEL_COUNTS, a.shape[-1] in _CHANNEL_COUNTS
    if not (first_ok or last_ok):
        raise ValueError(f"to_uint8_hwc: no channel axis of size 1, 3 or 4 in shape {a.shape}")
    if first_ok and (channel_first or not last_ok):
        a = np.moveaxis(a, 0, -1)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.rint(np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0) * 255.0)
    a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def save_png(image, path: str | Path) -> Path:
    """Write ``image`` (anything `to_uint8_hwc` accepts) as a PNG; creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_hwc(image)).save(path, format="PNG")
    return path


def heatmap_overlay(image, relevance, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped relevance map over an image.

    image: PIL image or (H, W, 3) uint8 (anything `to_uint8_hwc` accepts).
    relevance: (h, w) tensor/array, any scale; min-max normalised, then
    upsampled bilinearly to (H, W). Returns (H, W, 3) uint8:
    ``(1 - alpha) * image + alpha * cmap(relevance)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"heatmap_overlay: alpha must be in [0, 1], got {alpha}")
    rgb = to_uint8_hwc(image)[..., :3]
    rel = np.asarray(normalise_map(_numpy(relevance).astype(np.float32)))
    if rel.ndim != 2:
        raise ValueError(f"heatmap_overlay: relevance must be one (h, w) map, got shape {rel.shape}")
    height, width = rgb.shape[:2]
    # Mode "F" keeps full float precision through PIL's bilinear resize.
    rel = np.asarray(Image.fromarray(rel, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    heat = matplotlib.colormaps[cmap](np.clip(rel, 0.0, 1.0))[..., :3] * 255.0
    return np.rint((1.0 - alpha) * rgb + alpha * heat).astype(np.uint8)


def token_strip(
    words: Sequence[str],
    scores: Sequence[float],
    cmap: str = "Reds",
    font_size: int = 16,
) -> np.ndarray:
    """Render words side by side, each on a box coloured by its score.

    words: n strings; scores: n numbers (list, array or (n,) tensor),
    min-max normalised like `normalise_map`, so equal scores give all boxes
    the colormap's zero colour. Each box shows the word over its raw score.
    Returns (H, W, 3) uint8 with W growing with the words' widths.
    """
    raw = _numpy(scores).astype(np.float64).reshape(-1)
    if len(words) != raw.size:
        raise ValueError(f"token_strip: {len(words)} words but {raw.size} scores")
    if not words:
        raise ValueError("token_strip: no words to draw; pass at least one word")
    word_font = ImageFont.truetype(_FONT_PATH, font_size)
    score_font = ImageFont.truetype(_FONT_PATH, max(8, font_size * 3 // 4))
    colours = matplotlib.colormaps[cmap](normalise_map(raw))[:, :3]
    pad, gap = font_size // 2, 2
    line = font_size + pad
    labels = [f"{s:.2f}" for s in raw]
    widths = [
        max(word_font.getlength(w), score_font.getlength(s)) + 2 * pad
        for w, s in zip(words, labels)
    ]
    height = 2 * line + pad
    canvas = Image.new("RGB", (int(sum(widths)) + gap * (len(words) + 1), height), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for word, label, width, colour in zip(words, labels, widths, colours):
        fill = tuple(int(round(c * 255)) for c in colour)
        # Dark boxes get white text so the word stays readable.
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = "white" if luminance < 0.5 else "black"
        draw.rectangle([x, 0, x + width - 1, height - 1], fill=fill)
        draw.text((x + pad, pad // 2), word, font=word_font, fill=ink)
        draw.text((x + pad, line + pad // 2), label, font=score_font, fill=ink)
        x += int(width) + gap
    return np.asarray(canvas)


def labelled_grid(images: Sequence, labels: Sequence[str], columns: int = 8, font_size: int = 12) -> np.ndarray:
    """Tiles of equal-size images in rows of `columns`, each under its label (e.g. "step 50").

    images: n images `to_uint8_hwc` accepts, all (H, W); labels: n strings. Returns (H', W', 3) uint8 on white.
    """
    tiles = [to_uint8_hwc(image)[..., :3] for image in images]
    if len(tiles) != len(labels) or not tiles:
        raise ValueError(f"labelled_grid: {len(tiles)} images and {len(labels)} labels; give one label per image")
    height, width = tiles[0].shape[:2]
    if any(tile.shape[:2] != (height, width) for tile in tiles):
        raise ValueError("labelled_grid: the images differ in size; give images of one size")
    font, gap = ImageFont.truetype(_FONT_PATH, font_size), 2
    label_height = font_size + 4
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    canvas = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + label_height + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (tile, label) in enumerate(zip(tiles, labels)):
        x = gap + (index % columns) * (width + gap)
        y = gap + (index // columns) * (height + label_height + gap)
        draw.text((x + 2, y + 1), label, font=font, fill="black")
        canvas.paste(Image.fromarray(tile), (x, y + label_height))
    return np.asarray(canvas)


def _render(fig: Figure, path: str | Path | None) -> np.ndarray:
    """Rasterise a figure to (H, W, 3) uint8, and write it to ``path`` if given."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        save_png(rgb, path)
    return rgb


def scatter_plot(
    xs: Sequence[float],
    ys: Sequence[float],
    labels: Sequence[str] | None,
    xlabel: str,
    ylabel: str,
    title: str,
    path: str | Path | None = None,
) -> np.ndarray:
    """Scatter of n points, each annotated with its label (e.g. a prompt template).

    xs, ys: n numbers; labels: n strings or None. Returns (H, W, 3) uint8
    and also writes a PNG to ``path`` when given.
    """
    xs, ys = _numpy(xs).reshape(-1), _numpy(ys).reshape(-1)
    if xs.size != ys.size or (labels is not None and len(labels) != xs.size):
        n_labels = "no" if labels is None else len(labels)
        raise ValueError(f"scatter_plot: {xs.size} xs, {ys.size} ys and {n_labels} labels must match")
    fig = Figure(figsize=(6, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(xs, ys)
    for x, y, label in zip(xs, ys, labels or ()):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return _render(fig, path)


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: str | Path | None = None,
) -> np.ndarray:
    """One line per series, with error bars where ``yerr`` is given (e.g. accuracy vs lambda).

    series: name -> (xs, ys, yerr or None), each of length n_i. Returns
    (H, W, 3) uint8 and also writes a PNG to ``path`` when given.
    """
    if not series:
        raise ValueError("line_plot: no series to draw")
    fig = Figure(figsize=(6, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for name, (xs, ys, yerr) in series.items():
        yerr = None if yerr is None else _numpy(yerr).reshape(-1)
        ax.errorbar(_numpy(xs).reshape(-1), _numpy(ys).reshape(-1), yerr=yerr, marker="o", capsize=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _render(fig, path)
