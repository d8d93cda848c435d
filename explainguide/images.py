"""The one image loader shared by every entry point.

`load_image` turns any file PIL can decode into an 8-bit RGB image:

* alpha (RGBA, LA, PA, palette or colour-key transparency) is composited
  over ``background``, so the colour stored under transparent pixels never
  leaks into the result;
* 16-bit grayscale (I;16, I;16B, I) is scaled by its true range, 65535 -> 255,
  because PIL's own conversion saturates every value above 255 to white;
* CMYK, L, 1-bit and the rest go through PIL's conversion;
* EXIF orientation is applied, so phone photos come out upright.

Size policy: images whose longer side exceeds ``MAX_SIDE`` (4096 px, far
above CLIP's 224-336 px input) are downscaled with a warning. Files beyond
PIL's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, ~179 MP
by default) are refused with an `ImageLoadError` before being decoded.

Every failure is an `ImageLoadError` (a `ValueError`) whose message is one
line naming the path and the fix.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_SIDE = 4096
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"
EXAMPLE_PROMPTS = ("a red circle", "a blue square", "a red circle and a blue square")  # what EXAMPLE_IMAGE shows

# 16-bit grayscale modes: numpy reads them as (big- or little-endian) uint16,
# or int32 for "I", which is how PIL opens 16-bit PNG/TIFF data.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageLoadError(ValueError):
    """An image path that cannot be turned into an RGB image."""


def load_image(
    path: str | Path,
    background: tuple[int, int, int] = (255, 255, 255),
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """Load ``path`` as an RGB image of shape (H, W, 3) once converted to an array.

    Transparent pixels are composited over ``background`` (RGB, 0-255).
    Images whose longer side exceeds ``max_side`` are downscaled, keeping the
    aspect ratio, with a `UserWarning`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"{path}: no such file; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a folder; pass one image file, or use list_images() to expand a folder")
    try:
        with Image.open(path) as img:
            stored_size = img.size
            # JPEG can decode at 1/2, 1/4 or 1/8 scale for free; a no-op elsewhere.
            img.draft("RGB", (max_side, max_side))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img, background)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            f"{path}: too many pixels to decode safely ({err}); downscale the file first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Corrupt files surface as any of these depending on the PIL plugin;
        # ValueError also covers modes PIL cannot convert to RGB.
        raise ImageLoadError(
            f"{path}: not a readable image ({type(err).__name__}: {err}); "
            f"pass a PNG, JPEG, TIFF, BMP, GIF or WebP file"
        ) from None
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        w, h = stored_size
        warnings.warn(f"{path}: downscaled {w}x{h} -> {rgb.size[0]}x{rgb.size[1]} (max_side={max_side})", stacklevel=2)
    return rgb


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode to RGB, flattening transparency onto ``background``."""
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    # alpha_composite yields exactly `background` where alpha is 0.
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Map 16-bit gray (0-65535) to 8-bit L (0-255) linearly; PIL would saturate."""
    values = np.asarray(img).astype(np.float64)
    # 65535 / 257 == 255 exactly; "I" may hold values outside 16 bits, hence clip.
    out = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if "transparency" in img.info:
        # A colour-key value is in 16-bit units too.
        out.info["transparency"] = int(round(img.info["transparency"] / 257.0))
    return out


def list_images(path: str | Path) -> list[Path]:
    """Expand ``path`` into image files: a file gives itself, a folder its images.

    A folder is scanned non-recursively; files with an extension in
    `IMAGE_EXTENSIONS` (any case) are kept, hidden files skipped, and the
    result is sorted by name. A missing path or a folder with no images
    raises `ImageLoadError`.
    """
    path = Path(path)
    if path.is_file():
        # An explicitly named file is trusted; load_image reports if it is not an image.
        return [path]
    if not path.is_dir():
        raise ImageLoadError(f"{path}: no such file or folder; check the path (relative paths start at {Path.cwd()})")
    found = sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not found:
        raise ImageLoadError(
            f"{path}: folder has no images; add files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return found
