"""The shared image loader: every PIL mode becomes sane 8-bit RGB, errors name the path."""

import re
import warnings

import numpy as np
import pytest
from PIL import Image

from explainguide.images import EXAMPLE_IMAGE, ImageLoadError, list_images, load_image

GREEN = (0, 255, 0)


def _save(img: Image.Image, tmp_path, name: str):
    path = tmp_path / name
    img.save(path)
    return path


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgb_round_trips_exactly(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = _pixels(load_image(_save(Image.fromarray(arr), tmp_path, "a.png")))
    np.testing.assert_array_equal(out, arr)


def test_rgba_composites_over_background_and_hides_colour_under_alpha_zero(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (*GREEN, 0)  # fully transparent green: must vanish
    arr[0, 1] = (200, 0, 0, 255)  # opaque red: kept as is
    arr[1, 0] = (0, 0, 200, 128)  # half-transparent blue: blended
    arr[1, 1] = (*GREEN, 0)
    path = _save(Image.fromarray(arr, "RGBA"), tmp_path, "a.png")
    out = _pixels(load_image(path, background=(10, 20, 30)))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (200, 0, 0)
    np.testing.assert_allclose(out[1, 0], [5, 10, 115], atol=1)
    assert not (out == GREEN).all(axis=-1).any()


def test_default_background_is_white(tmp_path):
    path = _save(Image.new("RGBA", (3, 3), (*GREEN, 0)), tmp_path, "a.png")
    assert (_pixels(load_image(path)) == 255).all()


def test_la_composites(tmp_path):
    img = Image.fromarray(np.array([[[90, 0], [90, 255]]], np.uint8), "LA")
    out = _pixels(load_image(_save(img, tmp_path, "a.png"), background=(0, 0, 255)))
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[0, 1]) == (90, 90, 90)


def test_palette_transparent_entry_does_not_leak(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([*GREEN, 255, 0, 0] + [0] * (3 * 254))
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # palette entry 0 (pure green) is transparent
    path = _save(img, tmp_path, "a.png")
    assert Image.open(path).mode == "P"
    out = _pixels(load_image(path, background=(50, 60, 70)))
    assert not (out == GREEN).all(axis=-1).any()
    assert tuple(out[0, 0]) == (50, 60, 70)
    assert tuple(out[1, 1]) == (255, 0, 0)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 2), 0)
    img.putpalette([12, 34, 56] + [0] * (3 * 255))
    assert tuple(_pixels(load_image(_save(img, tmp_path, "a.png")))[0, 0]) == (12, 34, 56)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_gray_is_scaled_by_full_range_not_saturated(tmp_path, mode):
    # 65280 -> 254 only when dividing by 257 (65535 / 255), not by 256.
    values = np.array([[0, 257, 32768, 65280, 65535]], np.uint16)
    if mode == "I;16":
        img = Image.fromarray(values)
    elif mode == "I;16B":
        img = Image.frombytes(mode, (5, 1), values.astype(">u2").tobytes())
    else:
        img = Image.fromarray(values.astype(np.int32))
    path = _save(img, tmp_path, "a.tif")
    assert Image.open(path).mode == mode
    out = _pixels(load_image(path))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 254, 255])
    assert (out == out[..., :1]).all()  # still gray


def test_sixteen_bit_png(tmp_path):
    path = _save(Image.fromarray(np.array([[32768, 65535]], np.uint16)), tmp_path, "a.png")
    np.testing.assert_array_equal(_pixels(load_image(path))[0, :, 0], [128, 255])


def test_gray_and_one_bit(tmp_path):
    gray = _save(Image.fromarray(np.array([[0, 77, 255]], np.uint8)), tmp_path, "g.png")
    np.testing.assert_array_equal(_pixels(load_image(gray))[0], [[0] * 3, [77] * 3, [255] * 3])
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    np.testing.assert_array_equal(_pixels(load_image(_save(bits, tmp_path, "b.png")))[0], [[0] * 3, [255] * 3])


def test_cmyk_becomes_sane_rgb(tmp_path):
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (0, 255, 255, 0))  # pure red ink
    img.putpixel((1, 0), (0, 0, 0, 0))  # no ink: white paper
    out = _pixels(load_image(_save(img, tmp_path, "a.tif")))
    assert out[0, 0, 0] > 200 and out[0, 0, 1:].max() < 50
    assert (out[0, 1] > 240).all()


def test_cmyk_jpeg(tmp_path):
    out = _pixels(load_image(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path, "a.jpg")))
    assert out.shape == (8, 8, 3) and (out > 240).all()


def test_one_by_one(tmp_path):
    out = load_image(_save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path, "a.png"))
    assert out.size == (1, 1) and tuple(_pixels(out)[0, 0]) == (1, 2, 3)


def test_large_image_is_downscaled_with_warning(tmp_path):
    path = _save(Image.new("RGB", (200, 100), (9, 9, 9)), tmp_path, "a.png")
    with pytest.warns(UserWarning, match="downscaled 200x100"):
        out = load_image(path, max_side=64)
    assert out.size == (64, 32)


def test_image_within_limit_is_untouched(tmp_path):
    path = _save(Image.new("RGB", (64, 10)), tmp_path, "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_side=64).size == (64, 10)


def test_decompression_bomb_is_refused_with_path(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 100)), tmp_path, "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="bomb.png.*too many pixels"):
        load_image(path)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    path = tmp_path / "a.jpg"
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_text("not an image"), "not a readable image"),
        (lambda p: p.write_bytes(b""), "not a readable image"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
    ids=["text", "empty", "missing", "folder"],
)
def test_unreadable_paths_raise_one_line_naming_the_path(tmp_path, make, reason):
    path = tmp_path / "broken.png"
    make(path)
    with pytest.raises(ValueError) as info:
        load_image(path)
    message = str(info.value)
    assert isinstance(info.value, ImageLoadError)
    assert str(path) in message and reason in message and "\n" not in message


def test_truncated_png_raises(tmp_path):
    good = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), tmp_path, "a.png")
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(bad)


def test_bundled_example_loads():
    img = load_image(EXAMPLE_IMAGE)
    assert img.size == (224, 224)
    arr = _pixels(img)
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) >= 3  # background + circle + square


def test_list_images_single_file_and_sorted_folder(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert list_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.PNG"]
    assert list_images(tmp_path / "c.txt") == [tmp_path / "c.txt"]


def test_list_images_errors_name_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageLoadError, match=re.escape(str(tmp_path)) + ".*no images"):
        list_images(tmp_path)
    with pytest.raises(ImageLoadError, match="nowhere.*no such file"):
        list_images(tmp_path / "nowhere")
