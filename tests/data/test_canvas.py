"""The generated canvas benchmark: determinism, LVIS groups, masks/boxes and the two writers."""

import json

import numpy as np
import pytest

from eqlosses.data.canvas import (CanvasSpec, canvas_classes, make_detection, make_segmentation,
                                  render_scenes, rle_decode, rle_encode)

SMALL = dict(n_max=15, imbalance=15, val_per_class=1, size=64, max_scale=1.5,
             check_groups=False)


def _read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def small_det(tmp_path_factory):
    out = tmp_path_factory.mktemp("det")
    make_detection(out, **SMALL)
    return out


@pytest.mark.slow
def test_default_populates_every_lvis_group(tmp_path):
    # The documented default: rare 1-10, common 11-100, frequent > 100 training images.
    spec = CanvasSpec()
    image_count = np.zeros(len(canvas_classes()), dtype=int)
    for _, masks, classes in render_scenes(spec, "train"):
        image_count[sorted(set(classes))] += 1
    assert image_count.min() >= 1
    assert ((image_count >= 1) & (image_count <= 10)).sum() >= 10
    assert ((image_count >= 11) & (image_count <= 100)).sum() >= 10
    assert (image_count > 100).sum() >= 3


def test_counts_in_the_file_are_the_written_truth(small_det):
    gt = _read(small_det / "annotations" / "lvis_v1_train.json")
    k = len(gt["categories"])
    assert k == 60 and [c["id"] for c in gt["categories"]] == list(range(1, 61))
    images = {c: set() for c in range(1, k + 1)}
    instances = np.zeros(k + 1, dtype=int)
    for a in gt["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    for c in gt["categories"]:
        n = len(images[c["id"]])
        assert c["image_count"] == n and c["instance_count"] == instances[c["id"]]
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")


def test_boxes_areas_and_masks_agree(small_det):
    from PIL import Image

    gt = _read(small_det / "annotations" / "lvis_v1_val.json")
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in gt["images"][:5]:
        assert Image.open(small_det / "images" / img["file_name"]).size == (64, 64)
        union = np.zeros((64, 64), dtype=int)
        for a in by_image.get(img["id"], []):
            mask = rle_decode(a["segmentation"])
            ys, xs = np.nonzero(mask)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(),
                                 ys.max() + 1 - ys.min()]
            assert a["area"] == mask.sum() >= 40
            union += mask
        assert union.max() <= 1  # visible masks do not overlap
        present = {a["category_id"] for a in by_image.get(img["id"], [])}
        assert set(img["neg_category_ids"]) == set(range(1, 61)) - present


def test_generation_is_deterministic_and_seeded(tmp_path, small_det):
    make_detection(tmp_path / "again", **SMALL)
    for name in ("lvis_v1_train.json", "lvis_v1_val.json"):
        assert (tmp_path / "again" / "annotations" / name).read_bytes() == \
            (small_det / "annotations" / name).read_bytes()
    make_detection(tmp_path / "other", seed=1, **SMALL)
    assert (tmp_path / "other" / "annotations" / "lvis_v1_train.json").read_bytes() != \
        (small_det / "annotations" / "lvis_v1_train.json").read_bytes()


def test_segmentation_maps_are_the_detection_canvases(tmp_path, small_det):
    from PIL import Image

    make_segmentation(tmp_path / "seg", **{k: v for k, v in SMALL.items()
                                           if k != "check_groups"})
    meta = _read(tmp_path / "seg" / "classes.json")
    assert meta["classes"][0] == "background" and len(meta["classes"]) == 61
    assert meta["reduce_zero_label"] is False and meta["ignore_index"] == 255
    gt = _read(small_det / "annotations" / "lvis_v1_train.json")
    first = gt["images"][0]
    det_image = np.asarray(Image.open(small_det / "images" / first["file_name"]))
    seg_image = np.asarray(Image.open(tmp_path / "seg" / "images" / "training" / "000001.png"))
    np.testing.assert_array_equal(det_image, seg_image)
    label = np.asarray(Image.open(tmp_path / "seg" / "annotations" / "training" / "000001.png"))
    expected = np.zeros_like(label)
    for a in gt["annotations"]:
        if a["image_id"] == first["id"]:
            expected[rle_decode(a["segmentation"])] = a["category_id"]
    np.testing.assert_array_equal(label, expected)
    counts = np.zeros(61, dtype=int)
    for path in sorted((tmp_path / "seg" / "annotations" / "training").glob("*.png")):
        counts += np.bincount(np.asarray(Image.open(path)).ravel(), minlength=61)
    assert counts.tolist() == meta["train_pixel_counts"]


def test_rle_matches_the_coco_convention():
    mask_utils = pytest.importorskip("faster_coco_eval.core.mask")
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((7, 9)) > 0.5
        rle = rle_encode(mask)
        coco = mask_utils.frPyObjects(rle, 7, 9)
        np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), mask)
        np.testing.assert_array_equal(rle_decode(rle), mask)
    assert rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]


def test_bad_specifications_and_outputs_are_refused(tmp_path, small_det):
    with pytest.raises(ValueError, match="min_objects"):
        make_detection(tmp_path / "a", min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="smaller than the largest item"):
        make_detection(tmp_path / "b", size=32)
    with pytest.raises(ValueError, match="frequent"):
        make_detection(tmp_path / "c", n_max=15, imbalance=15, size=64, max_scale=1.5)
    with pytest.raises(FileExistsError, match="not empty"):
        make_detection(small_det, **SMALL)
    with pytest.raises(ValueError, match="split"):
        next(render_scenes(CanvasSpec(), "test"))


# -- the development split ------------------------------------------------------------------

def _item_keys(pools):
    return [{item.tobytes() for item in pool} for pool in pools]


def test_dev_pool_is_carved_from_the_training_items_and_disjoint_from_the_others():
    from eqlosses.data.canvas import _item_pools
    from eqlosses.data.embedded import load_embedded

    plain, carved = _item_pools(dev=False), _item_pools(dev=True)
    train_x, train_y = load_embedded("train")
    test_x, test_y = load_embedded("test")
    for t in range(10):  # without a dev split: the training items and the test items but the
        # last 100 per type (independently rebuilt here), so the default benchmark is unchanged
        expected = np.concatenate([train_x[train_y == t], test_x[test_y == t][:-100]])
        assert np.array_equal(plain["train"][t], expected)
        assert np.array_equal(plain["val"][t], carved["val"][t])
        assert plain["dev"] == []
    for t, (train, val, dev) in enumerate(zip(*(_item_keys(carved[s])
                                                 for s in ("train", "val", "dev")))):
        assert len(carved["dev"][t]) == 100
        assert not (dev & train) and not (dev & val) and not (train & val)
        assert dev | _item_keys([carved["train"][t]])[0] == _item_keys([plain["train"][t]])[0]


def test_dev_canvases_hold_dev_per_class_of_every_class_and_leave_val_unchanged(tmp_path):
    spec = CanvasSpec(n_max=6, imbalance=6, val_per_class=1, dev_per_class=2, size=64,
                      max_scale=1.5)
    counts = np.zeros(60, dtype=int)
    for image, masks, classes in render_scenes(spec, "dev"):
        assert image.shape == (64, 64, 3) and len(masks) == len(classes)
        np.add.at(counts, classes, 1)
    assert counts.max() <= 2 and counts.sum() >= 0.9 * 120  # a few occluded items dropped

    def val_scenes(s):
        return [(img.tobytes(), cls) for img, _, cls in render_scenes(s, "val")]

    no_dev = CanvasSpec(n_max=6, imbalance=6, val_per_class=1, size=64, max_scale=1.5)
    assert val_scenes(spec) == val_scenes(no_dev)  # the test canvases do not move
    with pytest.raises(ValueError, match="dev_per_class > 0"):
        next(render_scenes(no_dev, "dev"))
    with pytest.raises(ValueError, match="dev_per_class must be >= 0"):
        CanvasSpec(dev_per_class=-1).check()
    with pytest.raises(ValueError, match="no development split"):
        make_segmentation(tmp_path / "seg", dev_per_class=2)


def test_make_detection_writes_the_dev_split_with_the_training_categories(tmp_path):
    out = tmp_path / "det"
    summary = make_detection(out, **{**SMALL, "dev_per_class": 1})
    dev = _read(out / "annotations" / "lvis_v1_dev.json")
    train = _read(out / "annotations" / "lvis_v1_train.json")
    assert summary["dev_images"] == len(dev["images"]) > 0
    assert dev["categories"] == train["categories"]  # frequencies from the training split
    assert all((out / "images" / im["file_name"]).is_file() for im in dev["images"])
    assert {im["file_name"].split("/")[0] for im in dev["images"]} == {"dev"}
