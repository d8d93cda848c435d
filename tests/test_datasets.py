"""Dataset front door: hf (save_to_disk, class-name file, offline), wds shards, image_folder, class names and
templates as data, k-shot sampling, option checking, and every conf/dataset/*.yaml against the registry."""

from __future__ import annotations

import inspect
import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainguide.data import build_dataset
from explainguide.data.base import DatasetError
from explainguide.data.benchmarks import BENCHMARKS, CLASSNAME_LISTS, CLEANERS, TEMPLATE_SETS, imagenet80
from explainguide.data.few_shot import load_indices, sample_k_shot, save_indices
from explainguide.data.registry import _COMMON, DATASETS
from explainguide.data.templates import COMPARISON_TEMPLATES, SIMPLE_TEMPLATES

CONF_DIR = Path(__file__).resolve().parents[1] / "explainguide" / "conf" / "dataset"


def as_array(image: Image.Image) -> np.ndarray:
    """The test preprocess: keep pixels as they are, so tests can compare them."""
    return np.asarray(image)


def colour(i: int) -> tuple[int, int, int]:
    return (40 * i % 256, 255 - 30 * i % 256, 17 * i % 256)


def tiny_image(i: int, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (6, 4), colour(i) if mode == "RGB" else (*colour(i), 255))


def png_bytes(image: Image.Image, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "webp" else {}))
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test may touch the network: the hub endpoint refuses at once unless a test says otherwise."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


# -- hf -------------------------------------------------------------------------------------------------------


def save_hf(folder: Path, labels: list[int], names: list[str] | None, image_column="image", label_column="label",
            split: str | None = "test") -> Path:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    label_feature = ClassLabel(names=names) if names is not None else Value("int64")
    table = Dataset.from_dict(
        {image_column: [tiny_image(i, "RGBA" if i == 0 else "RGB") for i in range(len(labels))],
         label_column: labels, "extra": ["x"] * len(labels)},
        features=Features({image_column: ImageFeature(), label_column: label_feature, "extra": Value("string")}))
    (DatasetDict({split: table}) if split else table).save_to_disk(str(folder))
    return folder


def test_hf_save_to_disk_gives_images_labels_and_classlabel_names(tmp_path):
    folder = save_hf(tmp_path / "saved", [0, 1, 1, 0], ["golden_retriever", "tabby cat"])
    dataset = build_dataset("hf", "test", as_array, hf_id=str(folder))
    assert len(dataset) == 4 and dataset.labels == [0, 1, 1, 0]
    assert dataset.classnames == ["golden retriever", "tabby cat"]
    assert dataset.templates == SIMPLE_TEMPLATES
    image, label = dataset[2]
    assert label == 1 and image.shape == (4, 6, 3)
    assert tuple(image[0, 0]) == colour(2)
    assert tuple(dataset[0][0][0, 0]) == colour(0)  # an RGBA row comes out RGB


def test_hf_custom_columns_plain_labels_and_classnames_file(tmp_path):
    folder = save_hf(tmp_path / "saved", [2, 0, 1], None, image_column="img", label_column="y", split=None)
    names = tmp_path / "names.txt"
    names.write_text("red_fox\narctic fox\nfennec\n")
    dataset = build_dataset("hf", "train", as_array, hf_id=str(folder), image_column="img", label_column="y",
                            classnames_file=str(names))
    assert dataset.classnames == ["red fox", "arctic fox", "fennec"] and dataset.labels == [2, 0, 1]
    with pytest.raises(DatasetError, match="classnames_file"):
        build_dataset("hf", "train", as_array, hf_id=str(folder), image_column="img", label_column="y")
    names.write_text("red fox\narctic fox\n")
    with pytest.raises(DatasetError, match="2 class names but the dataset has 3 classes"):
        build_dataset("hf", "train", as_array, hf_id=str(folder), image_column="img", label_column="y",
                      classnames_file=str(names))


def test_labels_beyond_the_class_list_and_extra_names(tmp_path, caplog):
    folder = save_hf(tmp_path / "saved", [3, 0, 1], None, image_column="img", label_column="y", split=None)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    with caplog.at_level("WARNING"):
        build_dataset("hf", "train", as_array, hf_id=str(folder), image_column="img", label_column="y",
                      classnames_file=str(names))
    assert "gives 5 class names, the labels reach 3: the last 1 classes have no images" in caplog.text
    wds = make_wds(tmp_path / "wds")
    (wds / "classnames.txt").write_text("shark\n")
    with pytest.raises(DatasetError, match=r"has label 1 but its class list names only 1 classes \(labels 0..0\)"):
        build_dataset("wds", "test", as_array, hf_id=str(wds))


def test_a_label_column_that_holds_no_integers_is_named(tmp_path):
    folder = save_hf(tmp_path / "saved", [0, 1], ["a", "b"])
    with pytest.raises(DatasetError, match=r"dataset.label_column='extra' .* holds Value\(.*string.*pick a ClassLabel or integer"):
        build_dataset("hf", "test", as_array, hf_id=str(folder), label_column="extra")


def test_hf_wrong_column_and_split_name_the_fix(tmp_path):
    folder = save_hf(tmp_path / "saved", [0, 1], ["a", "b"])
    with pytest.raises(DatasetError, match=r"dataset.image_column='picture'.*columns: \['image', 'label', 'extra'\]"):
        build_dataset("hf", "test", as_array, hf_id=str(folder), image_column="picture")
    with pytest.raises(DatasetError, match=r"has no split 'validation'; its splits: \['test'\]; add it, or map it, "
                                           r"e.g. 'dataset.split_map=\{validation: test\}'"):
        build_dataset("hf", "validation", as_array, hf_id=str(folder))
    with pytest.raises(DatasetError, match=r"no split 'val', which dataset.split_map maps 'test' to; its splits: "
                                           r"\['test'\]; map 'test' to one of them"):
        build_dataset("hf", "test", as_array, hf_id=str(folder), split_map={"test": "val"})
    assert len(build_dataset("hf", "validation", as_array, hf_id=str(folder), split_map={"validation": "test"})) == 2


def test_hf_benchmark_renames_raw_names_and_picks_the_coop_template(tmp_path):
    folder = save_hf(tmp_path / "saved", [0, 1, 2], ["AnnualCrop", "Forest", "SeaLake"])
    dataset = build_dataset("hf", "test", as_array, hf_id=str(folder), benchmark="eurosat", template_set="coop")
    assert dataset.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    assert dataset.templates == ["a centered satellite photo of {}."]
    explicit = build_dataset("hf", "test", as_array, hf_id=str(folder), benchmark="eurosat", template_set="coop",
                             templates=["satellite view of {}."])
    assert explicit.templates == ["satellite view of {}."]


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_missing_hub_dataset_offline_fails_fast_naming_id_and_cache(tmp_path, monkeypatch, flag):
    import datasets  # noqa: F401  (imported before the clock starts: only the failure is timed)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(flag, "1")
    cache = tmp_path / "hf_cache"
    start = time.monotonic()
    with pytest.raises(DatasetError) as error:
        build_dataset("hf", "test", as_array, hf_id="nobody/no_such_dataset", root=str(cache))
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message
    assert "'nobody/no_such_dataset'" in message and str(cache) in message and flag in message


def test_a_missing_local_folder_is_not_reported_as_a_hub_miss(tmp_path):
    with pytest.raises(DatasetError, match=r"is not a folder; give the folder written by save_to_disk"):
        build_dataset("hf", "test", as_array, hf_id=str(tmp_path / "no_such_folder"))


def test_missing_hub_dataset_with_dead_hub_fails_fast(monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(DatasetError, match="unreachable") as error:
        build_dataset("hf", "test", as_array, hf_id="nobody/no_such_dataset")
    assert time.monotonic() - start < 5
    assert str(datasets.config.HF_DATASETS_CACHE) in str(error.value)


def test_cached_hub_dataset_loads_offline(tmp_path, monkeypatch):
    from datasets.packaged_modules.parquet.parquet import Parquet

    # A hub dataset cached by an earlier online run: <cache>/<owner>___<name>/<config>/<version>/<commit>/.
    parquet = tmp_path / "test.parquet"
    save_hf(tmp_path / "saved", [1, 0], ["cat_face", "dog"], split=None)
    from datasets import load_from_disk

    load_from_disk(str(tmp_path / "saved")).to_parquet(str(parquet))
    cache = tmp_path / "cache"
    Parquet(cache_dir=str(tmp_path / "build"), dataset_name="tiny", hash="0123abc",
            data_files={"test": str(parquet)}).download_and_prepare()
    (cache / "someone___tiny").mkdir(parents=True)
    shutil.move(str(next((tmp_path / "build" / "tiny").iterdir())), str(cache / "someone___tiny" / "default"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dataset = build_dataset("hf", "test", as_array, hf_id="someone/tiny", root=str(cache))
    assert dataset.classnames == ["cat face", "dog"] and dataset.labels == [1, 0]


# -- wds ------------------------------------------------------------------------------------------------------


def write_shard(path: Path, samples: list[tuple[str, str, bytes, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, ext, image, label in samples:
            for name, data in ((f"{key}.{ext}", image), (f"{key}.cls", label)):
                if data is not None:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def make_wds(folder: Path) -> Path:
    (folder / "test").mkdir(parents=True)
    (folder / "classnames.txt").write_text("great_white shark\ngoldfish\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n\nart of the {c}.\n")
    # "10.tar" must follow "2.tar": shards keep their numeric order.
    write_shard(folder / "test" / "2.tar", [("s0000000", "png", png_bytes(tiny_image(0)), b"1"),
                                            ("s0000001", "webp", png_bytes(tiny_image(1), "webp"), b"0")])
    write_shard(folder / "test" / "10.tar", [("s0000002", "png", png_bytes(tiny_image(2, "RGBA")), b"1\n"),
                                             ("s0000003", "jpg", png_bytes(tiny_image(3), "jpeg"), b"0")])
    return folder


def test_wds_folder_reads_shards_in_order_with_names_and_templates(tmp_path):
    dataset = build_dataset("wds", "test", as_array, hf_id=str(make_wds(tmp_path / "wds")))
    assert len(dataset) == 4 and dataset.labels == [1, 0, 1, 0]
    assert dataset.classnames == ["great white shark", "goldfish"]
    assert dataset.templates == ["a photo of a {}.", "art of the {}."]
    for index in (0, 1, 2):  # png, lossless webp, RGBA png
        image, label = dataset[index]
        assert label == dataset.labels[index] and tuple(image[0, 0]) == colour(index)
    assert dataset[3][0].shape == (4, 6, 3)  # jpeg: lossy, so only its shape is exact
    assert len(build_dataset("wds", "test", as_array, hf_id=str(tmp_path / "wds"), template_set="imagenet80")
               .templates) == 80


def test_wds_folder_without_templates_says_which_it_uses(tmp_path, caplog):
    folder = make_wds(tmp_path / "wds")
    (folder / "zeroshot_classification_templates.txt").unlink()
    with caplog.at_level("WARNING"):
        dataset = build_dataset("wds", "test", as_array, hf_id=str(folder))
    assert dataset.templates == ["a photo of a {}."]
    assert "has no zeroshot_classification_templates.txt: its own templates are ['a photo of a {}.']" in caplog.text


def test_wds_broken_layouts_name_the_fix(tmp_path):
    folder = make_wds(tmp_path / "wds")
    with pytest.raises(DatasetError, match=r"has no split 'train'; its splits: \['test'\]"):
        build_dataset("wds", "train", as_array, hf_id=str(folder))
    (folder / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no \*\.tar shards"):
        build_dataset("wds", "train", as_array, hf_id=str(folder), split_map={"train": "empty"})
    write_shard(folder / "test" / "11.tar", [("s0000004", "png", png_bytes(tiny_image(4)), None)])
    with pytest.raises(DatasetError, match=r"11\.tar: sample 's0000004' has only \['png'\].*\.cls label"):
        build_dataset("wds", "test", as_array, hf_id=str(folder))


def test_wds_missing_hub_repo_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DatasetError, match=r"'clip-benchmark/wds_nothing' is not in the local cache") as error:
        build_dataset("wds", "test", as_array, hf_id="clip-benchmark/wds_nothing", root=str(tmp_path / "hub"))
    assert time.monotonic() - start < 5 and str(tmp_path / "hub") in str(error.value)


# -- image_folder, limit, options -------------------------------------------------------------------------------


def test_image_folder_split_subfolder_names_and_limit(tmp_path):
    for cls, count in (("sea_lion", 3), ("walrus", 2)):
        (tmp_path / "test" / cls).mkdir(parents=True)
        for i in range(count):
            tiny_image(i).save(tmp_path / "test" / cls / f"{i}.png")
    dataset = build_dataset("image_folder", "test", as_array, root=str(tmp_path))
    assert dataset.classnames == ["sea lion", "walrus"] and dataset.labels == [0, 0, 0, 1, 1]
    assert dataset.templates == COMPARISON_TEMPLATES
    assert tuple(dataset[4][0][0, 0]) == colour(1)
    limited = build_dataset("image_folder", "test", as_array, root=str(tmp_path), limit=2)
    assert len(limited) == 2 and limited.labels == [0, 1] and limited.classnames == ["sea lion", "walrus"]


def test_image_folder_labels_mean_the_same_class_in_every_split(tmp_path, caplog):
    for split, classes in (("train", ("blue", "red")), ("test", ("green", "red"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            tiny_image(0).save(tmp_path / split / cls / "0.png")
    with caplog.at_level("WARNING"):
        test = build_dataset("image_folder", "test", as_array, root=str(tmp_path))
        train = build_dataset("image_folder", "train", as_array, root=str(tmp_path))
    assert test.classnames == train.classnames == ["blue", "green", "red"]
    assert test.labels == [1, 2] and train.labels == [0, 2]
    warnings = [record.getMessage() for record in caplog.records]  # each split states its own gap, once
    assert len(warnings) == 2 and "test/ lacks ['blue']" in warnings[0] and "train/ lacks ['green']" in warnings[1]


def test_image_folder_without_the_split_maps_it_or_warns(tmp_path, caplog):
    for split in ("train", "val"):
        (tmp_path / "split" / split / "walrus").mkdir(parents=True)
        tiny_image(0).save(tmp_path / "split" / split / "walrus" / "0.png")
    with pytest.raises(DatasetError, match=r"has no split 'test'; its splits: \['train', 'val'\]; .*split_map=\{test: val\}"):
        build_dataset("image_folder", "test", as_array, root=str(tmp_path / "split"))
    with pytest.raises(DatasetError, match=r"no split 'valid', which dataset.split_map maps 'test' to"):
        build_dataset("image_folder", "test", as_array, root=str(tmp_path / "split"), split_map={"test": "valid"})
    mapped = build_dataset("image_folder", "test", as_array, root=str(tmp_path / "split"), split_map={"test": "val"})
    assert mapped.classnames == ["walrus"] and len(mapped) == 1
    (tmp_path / "flat" / "walrus").mkdir(parents=True)
    tiny_image(0).save(tmp_path / "flat" / "walrus" / "0.png")
    with caplog.at_level("WARNING"):
        flat = build_dataset("image_folder", "train", as_array, root=str(tmp_path / "flat"))
    assert len(flat) == 1 and "has no split folders" in caplog.text


def test_unknown_options_names_and_sets_are_one_clear_line(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset=hf has no option\(s\) \['dataset.colour'\]; its options: "
                                           r"\['hf_config', 'hf_id', 'image_column', 'label_column'\]"):
        build_dataset("hf", "test", as_array, hf_id="x/y", colour="red")
    with pytest.raises(DatasetError, match="its options: none"):
        build_dataset("shapes", "test", as_array, hf_id="x/y")
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar'; available: \["):
        build_dataset("cifar", "test", as_array)
    with pytest.raises(DatasetError, match=r"unknown dataset.template_set='clip'; available: \['coop'"):
        build_dataset("shapes", "test", as_array, size=4, template_set="clip")
    with pytest.raises(DatasetError, match=r"template_set=coop needs dataset.benchmark="):
        build_dataset("shapes", "test", as_array, size=4, template_set="coop")
    with pytest.raises(DatasetError, match=r"unknown dataset.benchmark='pets'"):
        build_dataset("shapes", "test", as_array, size=4, benchmark="pets")
    with pytest.raises(DatasetError, match=r"need exactly one '\{\}'"):
        build_dataset("shapes", "test", as_array, size=4, templates=["a photo"])


# -- benchmark data ---------------------------------------------------------------------------------------------


def test_benchmark_data_is_consistent():
    coop_datasets = {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                     "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"}
    assert coop_datasets | {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"} == set(BENCHMARKS)
    for entry in BENCHMARKS.values():
        assert entry["coop"] and all(template.count("{}") == 1 for template in entry["coop"])
        assert set(entry.get("clean", [])) <= set(CLEANERS)
        assert entry.get("classnames", "imagenet1k") in CLASSNAME_LISTS
    assert BENCHMARKS["oxford_pets"]["coop"] == ["a photo of a {}, a type of pet."]
    assert BENCHMARKS["dtd"]["coop"] == ["{} texture."]
    templates = imagenet80()
    assert len(set(templates)) == 80 and "a photo of a {}." in templates
    names = CLASSNAME_LISTS["imagenet1k"]()
    assert len(names) == 1000 and names[0] == "tench"


@pytest.mark.parametrize(("benchmark", "raw", "clean"), [
    ("sun397", "/a/apartment_building/outdoor", "outdoor apartment building"),
    ("sun397", "abbey", "abbey"),
    ("ucf101", "ApplyEyeMakeup", "Apply Eye Makeup"),
    ("ucf101", "Apply_Eye_Makeup", "Apply Eye Makeup"),
    ("oxford_pets", "American_Bulldog", "american bulldog"),
    ("caltech101", "Faces", "face"),
])
def test_benchmark_cleaning_of_raw_names(tmp_path, benchmark, raw, clean):
    folder = save_hf(tmp_path / "saved", [0], [raw])
    assert build_dataset("hf", "test", as_array, hf_id=str(folder), benchmark=benchmark).classnames == [clean]


def test_imagenet_benchmark_replaces_source_names_and_checks_the_count(tmp_path):
    folder = save_hf(tmp_path / "saved", [0, 1], ["tench, Tinca tinca", "goldfish, Carassius auratus"])
    with pytest.raises(DatasetError, match="benchmark='imagenet'.* gives 1000 class names but the dataset has 2"):
        build_dataset("hf", "test", as_array, hf_id=str(folder), benchmark="imagenet")


# -- k-shot -----------------------------------------------------------------------------------------------------


def test_k_shot_is_deterministic_per_seed_and_k_and_per_class():
    labels = [i % 5 for i in range(100)]
    shots = sample_k_shot(labels, k=4, seed=3)
    assert shots == sample_k_shot(labels, k=4, seed=3) == sorted(shots)
    assert [labels[i] for i in shots].count(2) == 4 and len(shots) == 20
    assert shots != sample_k_shot(labels, k=4, seed=4)
    # A class's shots depend only on (seed, k, its own images): dropping class 4 leaves the others alone.
    without_4 = [label if label != 4 else 99 for label in labels]
    kept = [i for i in sample_k_shot(without_4, k=4, seed=3) if without_4[i] != 99]
    assert kept == [i for i in shots if labels[i] != 4]


def test_k_shot_errors_name_the_short_class():
    with pytest.raises(DatasetError, match=r"class 1 \('cat'\) has 1 images, fewer than k=2"):
        sample_k_shot([0, 0, 1, 2, 2], k=2, seed=0, classnames=["dog", "cat", "cow"])
    with pytest.raises(DatasetError, match=r"class 2 \('cow'\) has 0 images"):
        sample_k_shot([0, 1], k=1, seed=0, classnames=["dog", "cat", "cow"])
    with pytest.raises(DatasetError, match="k=0"):
        sample_k_shot([0, 1], k=0, seed=0)


def test_k_shot_indices_round_trip_and_select_the_subset(tmp_path):
    dataset = build_dataset("shapes", "train", as_array, size=72)
    shots = sample_k_shot(dataset.labels, k=2, seed=7, classnames=dataset.classnames)
    path = save_indices(tmp_path / "run" / "shots.json", shots, {"dataset": "shapes", "k": 2, "seed": 7})
    loaded = load_indices(path)
    assert loaded.indices == shots and loaded.meta == {"dataset": "shapes", "k": 2, "seed": 7}
    subset = dataset.subset(loaded.indices)
    assert sorted(subset.labels) == sorted(list(range(len(dataset.classnames))) * 2)
    assert subset[0][1] == dataset.labels[shots[0]]
    assert load_indices(tmp_path / "run") == loaded  # a run dir stands for its shots.json
    with pytest.raises(DatasetError, match="no such k-shot file"):
        load_indices(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty/shots.json: no such k-shot file"):
        load_indices(tmp_path / "empty")


# -- configs ----------------------------------------------------------------------------------------------------

FRONT_DOOR = set(inspect.signature(build_dataset).parameters) - {"split", "preprocess", "options"}


@pytest.mark.parametrize("name", sorted(path.stem for path in CONF_DIR.glob("*.yaml")))
def test_every_dataset_config_composes_and_fits_its_builder(name):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(version_base="1.3", config_module="explainguide.conf"):
        cfg = compose(config_name="config", overrides=[f"dataset={name}"])
    dataset = cfg.dataset
    assert OmegaConf.missing_keys(dataset) <= {"dataset.root", "dataset.hf_id"}  # where the user keeps data
    assert dataset.name in DATASETS
    builder_options = set(inspect.signature(DATASETS[dataset.name]).parameters) - _COMMON
    assert set(dataset) - FRONT_DOOR <= builder_options
    assert dataset.get("template_set", "own") in TEMPLATE_SETS
    assert dataset.get("benchmark") in {None, *BENCHMARKS}
    if name in BENCHMARKS:
        assert dataset.benchmark == name and dataset.template_set == "coop"
