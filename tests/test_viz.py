"""Renderers: normalisation semantics, overlay geometry, token strips, plots, PNG output."""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from explainguide.viz import (
    heatmap_overlay,
    labelled_grid,
    line_plot,
    normalise_map,
    save_png,
    scatter_plot,
    to_uint8_hwc,
    token_strip,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# normalise_map


@pytest.mark.parametrize("make", [torch.full, np.full], ids=["tensor", "ndarray"])
def test_constant_map_is_blank_not_nan(make):
    out = normalise_map(make((3, 4), 7.0))
    assert type(out) is type(make((1,), 0.0))
    assert not np.isnan(np.asarray(out)).any()
    assert (np.asarray(out) == 0).all()


@pytest.mark.parametrize("to", [torch.tensor, np.array], ids=["tensor", "ndarray"])
def test_float_noise_below_eps_is_blank_not_stretched(to):
    out = normalise_map(to([[1.0, 1.0 + 1e-10], [1.0, 1.0]], dtype=torch.float64 if to is torch.tensor else None))
    assert (np.asarray(out) == 0).all()


def test_min_max_to_unit_range():
    out = normalise_map(np.array([[2.0, 4.0], [6.0, 10.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])


def test_each_map_in_a_batch_is_scaled_on_its_own():
    maps = torch.stack([torch.tensor([[0.0, 1.0]]), torch.tensor([[100.0, 300.0]]), torch.full((1, 2), 5.0)])
    out = normalise_map(maps)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]], [[0.0, 0.0]]]))


def test_one_dimensional_scores_and_integers():
    np.testing.assert_allclose(normalise_map(np.array([1, 3, 2])), [0.0, 1.0, 0.5])


def test_gradient_flows_through_tensor_maps():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    normalise_map(x)[0, 1].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# to_uint8_hwc / save_png


def test_chw_float_tensor_to_hwc_uint8():
    chw = torch.zeros(3, 2, 5)
    chw[0] = 1.0  # red channel full
    chw[2, 0, 0] = 0.5
    out = to_uint8_hwc(chw)
    assert out.shape == (2, 5, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 255).all() and out[0, 0, 2] == 128 and out[1, 1, 2] == 0


def test_hwc_uint8_passes_through_and_floats_are_clipped():
    arr = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8_hwc(arr), arr)
    clipped = to_uint8_hwc(np.array([[[-0.5, 1.5, np.nan]]], np.float32))
    np.testing.assert_array_equal(clipped, [[[0, 255, 0]]])


def test_gray_batched_and_pil_inputs():
    assert to_uint8_hwc(np.zeros((4, 5))).shape == (4, 5, 3)
    assert to_uint8_hwc(torch.zeros(1, 1, 4, 5)).shape == (4, 5, 3)
    np.testing.assert_array_equal(to_uint8_hwc(Image.new("L", (2, 1), 9)), np.full((1, 2, 3), 9))


def test_bfloat16_tensor():
    assert (to_uint8_hwc(torch.ones(3, 2, 2, dtype=torch.bfloat16)) == 255).all()


def test_ambiguous_tiny_shapes_follow_the_torchvision_convention():
    # (3, 3, 4): a 3x4 RGB tensor (CHW) but a 3x3 RGBA array (HWC).
    assert to_uint8_hwc(torch.zeros(3, 3, 4)).shape == (3, 4, 3)
    assert to_uint8_hwc(np.zeros((3, 3, 4))).shape == (3, 3, 4)
    assert to_uint8_hwc(torch.zeros(5, 6, 3)).shape == (5, 6, 3)  # tensor stored HWC


def test_shape_without_channel_axis_is_rejected():
    with pytest.raises(ValueError, match=r"\(5, 6, 7\)"):
        to_uint8_hwc(np.zeros((5, 6, 7)))


def test_save_png_round_trip(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    path = save_png(torch.from_numpy(arr).permute(2, 0, 1), tmp_path / "deep" / "x.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), arr)


# heatmap_overlay


def test_overlay_matches_image_shape_and_dtype():
    image = Image.new("RGB", (60, 40), (100, 100, 100))
    out = heatmap_overlay(image, torch.rand(7, 7))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8


def test_overlay_alpha_extremes():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    relevance = np.random.default_rng(1).random((4, 4))
    np.testing.assert_array_equal(heatmap_overlay(image, relevance, alpha=0.0), image)
    full = heatmap_overlay(image, relevance, alpha=1.0)
    assert not (full == image).all()
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(image, relevance, alpha=1.5)


def test_overlay_hotspot_lands_in_the_right_corner():
    relevance = torch.zeros(4, 4)
    relevance[0, 0] = 1.0  # top-left token is the relevant one
    out = heatmap_overlay(np.zeros((64, 64, 3), np.uint8), relevance, alpha=1.0, cmap="jet").astype(int)
    top_left, bottom_right = out[2, 2], out[-3, -3]
    assert top_left[0] > 100 and top_left[1:].max() < 50  # jet's hot end is (dark) red
    assert bottom_right[2] > 100 and bottom_right[:2].max() < 50  # its cold end is blue


def test_overlay_of_constant_map_is_uniform():
    out = heatmap_overlay(np.zeros((8, 8, 3), np.uint8), np.full((2, 2), 3.0), alpha=1.0, cmap="viridis")
    expected = np.rint(np.array(matplotlib.colormaps["viridis"](0.0)[:3]) * 255)
    assert (out == expected).all()


# token_strip


def _box_colours(strip: np.ndarray, n: int) -> list[tuple]:
    """Background colour of each box: the pixel at its top-left corner."""
    row = strip[0]
    starts = [x for x in range(1, row.shape[0]) if (row[x] != 255).any() and (row[x - 1] == 255).all()]
    assert len(starts) == n
    return [tuple(row[x]) for x in starts]


def test_token_strip_renders_non_ascii_words():
    words = ["a", "café", "猫", "naïve"]
    out = token_strip(words, [0.1, 0.9, 0.5, 0.3])
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
    colours = _box_colours(out, len(words))
    assert colours[1] != colours[0]  # score is encoded in the box colour
    assert np.mean(colours[1]) < np.mean(colours[0])  # "Reds": higher score is darker


def test_token_strip_constant_scores_are_blank():
    out = token_strip(["x", "y", "z"], torch.tensor([0.4, 0.4, 0.4]))
    blank = tuple(np.rint(np.array(matplotlib.colormaps["Reds"](0.0)[:3]) * 255).astype(np.uint8))
    assert _box_colours(out, 3) == [blank] * 3


def test_token_strip_grows_with_words_and_draws_text():
    short, long = token_strip(["cat"], [1.0]), token_strip(["cat", "sitting"], [1.0, 0.0])
    assert long.shape[1] > short.shape[1]
    assert len(np.unique(short.reshape(-1, 3), axis=0)) > 2  # more than box + border: text


def test_token_strip_length_mismatch():
    with pytest.raises(ValueError, match="2 words but 3 scores"):
        token_strip(["a", "b"], [1, 2, 3])


# plots


def _assert_real_png(path, array):
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 1000
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.std() > 0  # something was drawn
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), array)


def test_scatter_plot_png(tmp_path):
    path = tmp_path / "scatter.png"
    out = scatter_plot([0.1, 0.4, 0.3], [55.0, 61.2, 58.9], ["a photo of a {}.", "a {}.", "itap of a {}."],
                       "explainability score", "accuracy", "per template", path=path)
    _assert_real_png(path, out)


def test_scatter_plot_without_labels_and_mismatch():
    assert scatter_plot(np.arange(3), torch.arange(3), None, "x", "y", "t").std() > 0
    with pytest.raises(ValueError, match="must match"):
        scatter_plot([1, 2], [1], None, "x", "y", "t")


def test_line_plot_png_with_and_without_error_bars(tmp_path):
    path = tmp_path / "lines.png"
    series = {
        "CoOp": ([0.0, 0.5, 1.0], [60.0, 62.0, 61.0], [0.5, 0.4, 0.6]),
        "CoOp + expl.": (np.array([0.0, 0.5, 1.0]), torch.tensor([60.0, 63.0, 64.0]), None),
    }
    out = line_plot(series, "lambda", "accuracy", "accuracy vs lambda", path=path)
    _assert_real_png(path, out)
    with pytest.raises(ValueError, match="no series"):
        line_plot({}, "x", "y", "t")


def test_labelled_grid_places_each_image_under_its_label():
    red, blue = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    red[0], blue[2] = 1.0, 1.0
    grid = labelled_grid([red, blue, red], ["step 0", "step 5", "step 10"], columns=2, font_size=10)
    label_height, gap = 14, 2
    assert grid.shape == (2 * (8 + label_height + gap) + gap, 2 * (8 + gap) + gap, 3)
    top = gap + label_height
    assert (grid[top : top + 8, gap : gap + 8] == [255, 0, 0]).all()  # first tile, first row
    assert (grid[top : top + 8, 2 * gap + 8 : 2 * gap + 16] == [0, 0, 255]).all()  # second tile
    assert (grid[gap:top, gap : gap + 8] < 128).any()  # its label drew dark ink above it
    with pytest.raises(ValueError, match="one label per image"):
        labelled_grid([red], ["a", "b"])
