"""The embedded shapes world and the shipped toy CLIP trained on it."""

from __future__ import annotations

import collections
import re
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from explainguide.data.shapes import (
    CLASSNAMES,
    COLOURS,
    SHAPES,
    TEMPLATES,
    ObjectSpec,
    ShapesCaptions,
    ShapesClassification,
    ShapesWorld,
    normalize,
    object_boxes,
    object_masks,
    parse_caption,
)

TOY_DIR = Path(__file__).resolve().parents[1] / "explainguide" / "models" / "toy"


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


@pytest.fixture(scope="module")
def samples(world):
    return world.samples(300, seed=123)


def test_determinism_by_seed(world):
    a_img, a_cap = world.batch(16, seed=7)
    b_img, b_cap = world.batch(16, seed=7)
    c_img, c_cap = world.batch(16, seed=8)
    assert torch.equal(a_img, b_img) and a_cap == b_cap
    assert not torch.equal(a_img, c_img)
    ds1, ds2 = ShapesClassification("val", n=20, seed=1), ShapesClassification("val", n=20, seed=1)
    s1, s2 = ds1.sample(11), ds2.sample(11)
    assert torch.equal(s1.image, s2.image) and s1.objects[0].box == s2.objects[0].box
    assert not torch.equal(ShapesClassification("val", n=20, seed=2)[11][0], s1.image)
    it1, it2 = iter(ShapesCaptions(seed=4)), iter(ShapesCaptions(seed=4))
    for _ in range(3):
        (x1, t1), (x2, t2) = next(it1), next(it2)
        assert torch.equal(x1, x2) and t1 == t2


def test_images_format(samples):
    for s in samples[:20]:
        assert s.image.shape == (3, 64, 64) and s.image.dtype == torch.float32
        assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
        assert 1 <= len(s.objects) <= 3


def test_boxes_tight_to_drawn_pixels(samples):
    for s in samples:
        masks, boxes = object_masks(s), object_boxes(s)
        assert masks.shape == (len(s.objects), 64, 64) and boxes.shape == (len(s.objects), 4)
        assert int(masks.sum(0).max()) <= 1  # objects never overlap
        for m, (l, t, w, h), obj in zip(masks, boxes.tolist(), s.objects):
            assert w > 0 and h > 0 and l >= 0 and t >= 0 and l + w <= 64 and t + h <= 64
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert int(xs.min()) == l and int(xs.max()) == l + w - 1  # inside, touching left and right
            assert int(ys.min()) == t and int(ys.max()) == t + h - 1  # inside, touching top and bottom
            # fully covered pixels carry the object's colour
            rgb = torch.tensor(COLOURS[obj.colour])
            inner = torch.from_numpy(obj.local_mask)
            px = s.image[:, t: t + h, l: l + w].permute(1, 2, 0)[inner]
            assert float((px.median(0).values - rgb).abs().max()) < 0.15


def test_captions_parse_back_to_objects(world, samples):
    n_two = 0
    for s in samples:
        pairs = parse_caption(s.caption)
        assert pairs == [(s.objects[i].colour, s.objects[i].shape) for i in s.mentioned], s.caption
        assert sorted(s.mentioned) == list(range(len(s.objects)))
        n_two += len(pairs) == 2
    assert n_two / len(samples) >= 0.35  # two-object captions are common
    assert parse_caption("a photo of a small green triangle on the left") == [("green", "triangle")]
    assert parse_caption("a yellow star and a purple cross.") == [("yellow", "star"), ("purple", "cross")]
    assert len({s.caption for s in samples}) > 0.8 * len(samples)  # varied


def test_hard_negative_captions(world, samples):
    rng = np.random.default_rng(0)
    for s in samples[:100]:
        neg = world.hard_negative(s.caption, rng)
        pos_pairs, neg_pairs = parse_caption(s.caption), parse_caption(neg)
        assert len(neg_pairs) == len(pos_pairs) and sorted(neg_pairs) != sorted(pos_pairs), (s.caption, neg)
        for art, word in re.findall(r"\b(an?) ([a-z]+)", neg):
            assert (art == "an") == (word[0] in "aeiou"), neg


def test_render_specs(world):
    rng = np.random.default_rng(0)
    img, objs = world.render([ObjectSpec("red", "circle", "large", centre=(16, 32)),
                              ObjectSpec("blue", "square", "small", centre=(48, 32))], rng)
    assert [o.name for o in objs] == ["red circle", "blue square"]
    assert objs[0].centre[0] < 32 < objs[1].centre[0]
    assert objs[0].location == "left" and objs[1].location == "right"
    assert objs[0].box[2] > objs[1].box[2]


def test_classification_view_and_disjoint_splits():
    assert CLASSNAMES == [f"{c} {s}" for c in COLOURS for s in SHAPES]
    assert len(COLOURS) >= 6 and len(SHAPES) >= 5
    assert len(TEMPLATES) >= 6 and all(t.count("{}") == 1 for t in TEMPLATES)
    hashes = {}
    for split in ("train", "val", "test"):
        ds = ShapesClassification(split, n=144, seed=0)
        assert ds.classnames == CLASSNAMES and ds.templates == TEMPLATES and len(ds) == 144
        labels = []
        for i in range(len(ds)):
            img, y = ds[i]
            smp = ds.sample(i)
            assert len(smp.objects) == 1 and smp.objects[0].name == CLASSNAMES[y] == CLASSNAMES[smp.label]
            labels.append(y)
            hashes.setdefault(split, set()).add(hashlib.sha1(img.numpy().tobytes()).hexdigest())
        assert collections.Counter(labels) == collections.Counter({k: 4 for k in range(len(CLASSNAMES))})
        assert len(hashes[split]) == len(ds)
    assert not (hashes["train"] & hashes["val"]) and not (hashes["train"] & hashes["test"])
    assert not (hashes["val"] & hashes["test"])


def test_normalize_uses_clip_stats():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.rand(2, 3, 8, 8)
    y = normalize(x)
    mean, std = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1), torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
    assert torch.allclose(y, (x - mean) / std)
    assert torch.allclose(normalize((x * 255).round().to(torch.uint8)), normalize((x * 255).round() / 255), atol=1e-6)


def test_generation_is_fast(world):
    world.batch(64, seed=0)  # warm the stencil cache
    t0 = time.perf_counter()
    world.batch(256, seed=1)
    assert time.perf_counter() - t0 < 3.0  # ~0.2 s on one core; generous for loaded CI machines


def test_shipped_toy_clip_zero_shot():
    """The shipped checkpoint loads offline through open_clip + the json and classifies held-out images."""
    import open_clip
    import torch.nn.functional as F

    weights, config = TOY_DIR / "toy_clip.safetensors", TOY_DIR / "toy_clip.json"
    assert config.is_file(), config
    assert weights.is_file(), f"missing shipped checkpoint {weights}"
    assert weights.stat().st_size <= 25 * 2**20
    open_clip.add_model_config(config)
    model = open_clip.create_model("toy_clip", pretrained=str(weights)).eval()
    tok = open_clip.get_tokenizer("toy_clip")
    assert tok.context_length == 32
    ds = ShapesClassification("test", n=200, seed=0)
    with torch.no_grad():
        prompts = [tpl.format(c) for c in ds.classnames for tpl in ds.templates]
        t = F.normalize(model.encode_text(tok(prompts)), dim=-1).view(len(ds.classnames), len(ds.templates), -1)
        W = F.normalize(t.mean(1), dim=-1)  # template ensemble per class
        x, y = ds.tensors(normalized=True)
        pred = (F.normalize(model.encode_image(x), dim=-1) @ W.t()).argmax(1)
    acc = (pred == y).float().mean().item()
    assert acc >= 0.85, acc
