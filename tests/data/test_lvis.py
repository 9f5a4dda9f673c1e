"""LVIS / COCO annotation files: loading, checks, targets, masks, class statistics."""

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from eqlosses.data import repeat_factors
from eqlosses.data.lvis import (LVISDetection, collate_detection, load_annotations,
                                segmentation_to_mask)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _write(tmp_path: Path, images, annotations, categories, *, name="ann.json",
           write_images=True, extra=None):
    """Write an LVIS-style JSON file (and, unless told not to, a PNG per image whose pixel
    (x, y) has the colour (x, y, image id) so that loading can be checked)."""
    root = tmp_path / "images"
    if write_images:
        for img in images:
            rel = img.get("file_name")
            if rel is None:  # coco_url layout: <split>/<file>
                rel = "/".join(img["coco_url"].split("/")[-2:])
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            h, w = img["height"], img["width"]
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., 0] = np.arange(w)[None, :]
            arr[..., 1] = np.arange(h)[:, None]
            arr[..., 2] = img["id"] % 256
            Image.fromarray(arr).save(path)
    data = {"images": images, "annotations": annotations, "categories": categories}
    data.update(extra or {})
    ann_file = tmp_path / name
    ann_file.write_text(json.dumps(data))
    return ann_file, root


def _img(i, w=20, h=16, **kw):
    return {"id": i, "width": w, "height": h, "file_name": f"{i:06d}.png", **kw}


def _ann(i, image_id, category_id, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]), **kw}


CATS = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 12, "name": "twelve"}]


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def test_targets_boxes_labels_and_image(tmp_path):
    f, root = _write(tmp_path, [_img(1), _img(2, w=10, h=12)],
                     [_ann(10, 1, 7, [2, 3, 4, 5]), _ann(11, 1, 3, [0, 0, 20, 16]),
                      _ann(12, 2, 12, [1.5, 2.5, 3, 4], area=7.25)], CATS)
    ds = LVISDetection(f, root)
    assert len(ds) == 2
    assert ds.category_ids == [3, 7, 12]
    assert ds.class_names == ["three", "seven", "twelve"]
    assert ds.num_classes == 3
    image, target = ds[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 16, 20)
    # pixel (x, y) was written as (x, y, id) / 255
    assert image[0, 5, 7].item() == pytest.approx(7 / 255)
    assert image[1, 5, 7].item() == pytest.approx(5 / 255)
    assert image[2, 0, 0].item() == pytest.approx(1 / 255)
    assert target["image_id"] == 1
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 3, 6, 8], [0, 0, 20, 16]]
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [2, 1]  # id 7 -> index 1 -> label 2; id 3 -> 1
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [20, 320]
    assert "masks" not in target
    image, target = ds[1]
    assert tuple(image.shape) == (3, 12, 10)
    assert target["boxes"].tolist() == [[1.5, 2.5, 4.5, 6.5]]
    assert target["labels"].tolist() == [3]
    assert target["area"].tolist() == [7.25]


def test_area_defaults_to_box_area_and_crowd_left_out(tmp_path):
    a = _ann(10, 1, 7, [2, 3, 4, 5])
    del a["area"]
    crowd = _ann(11, 1, 3, [0, 0, 5, 5], iscrowd=1)
    f, root = _write(tmp_path, [_img(1)], [a, crowd], CATS)
    ds = LVISDetection(f, root)
    _, t = ds[0]
    assert t["area"].tolist() == [20.0]
    assert t["labels"].tolist() == [2]
    assert ds.image_labels() == [[1]]


def test_empty_images_kept_by_default_dropped_with_skip_empty(tmp_path):
    f, root = _write(tmp_path, [_img(1), _img(2), _img(3)], [_ann(10, 2, 7, [1, 1, 3, 3])],
                     CATS)
    ds = LVISDetection(f, root)
    assert [img["id"] for img in ds.images] == [1, 2, 3]
    _, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert t["area"].shape == (0,)
    ds = LVISDetection(f, root, skip_empty=True)
    assert [img["id"] for img in ds.images] == [2]
    ds = LVISDetection(f, root, with_masks=True)
    _, t = ds[0]
    assert t["masks"].shape == (0, 16, 20) and t["masks"].dtype == torch.uint8


def test_transforms_and_collate(tmp_path):
    f, root = _write(tmp_path, [_img(1), _img(2)],
                     [_ann(10, 1, 7, [2, 3, 4, 5]), _ann(11, 2, 3, [1, 1, 3, 3])], CATS)

    def flip(image, target):
        w = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": boxes}

    ds = LVISDetection(f, root, transforms=flip)
    _, t = ds[0]
    assert t["boxes"].tolist() == [[14, 3, 18, 8]]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2 and images[0].shape == (3, 16, 20)
    assert [t["image_id"] for t in targets] == [1, 2]
    assert collate_detection([]) == ([], [])


def test_coco_url_path_mapping(tmp_path):
    img = {"id": 391895, "width": 8, "height": 6,
           "coco_url": "http://images.cocodataset.org/train2017/000000391895.jpg"}
    f, root = _write(tmp_path, [img], [], CATS)
    ds = LVISDetection(f, root)
    assert ds.image_path(0) == root / "train2017" / "000000391895.jpg"
    image, target = ds[0]
    assert tuple(image.shape) == (3, 6, 8) and target["image_id"] == 391895


def test_image_without_file_name_or_url(tmp_path):
    f, root = _write(tmp_path, [{"id": 1, "width": 8, "height": 6}], [], CATS,
                     write_images=False)
    with pytest.raises(ValueError, match=r"image id 1 has neither 'file_name' nor 'coco_url'"):
        LVISDetection(f, root)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

def _rect_rle_counts(h, w, x0, y0, x1, y1):
    """Uncompressed column-major RLE of the rectangle of pixels [x0, x1) x [y0, y1)."""
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    flat = m.T.reshape(-1)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts, m


def test_masks_polygon_rle_and_compressed_rle_agree(tmp_path):
    mask_api = pytest.importorskip("faster_coco_eval.core.mask")
    h, w = 16, 20
    counts, expected = _rect_rle_counts(h, w, 3, 4, 9, 11)
    compressed = mask_api.encode(np.asfortranarray(expected))
    compressed = {"size": [h, w], "counts": compressed["counts"].decode("ascii")}
    anns = [_ann(10, 1, 7, [3, 4, 6, 7], segmentation=[[3, 4, 9, 4, 9, 11, 3, 11]]),
            _ann(11, 1, 7, [3, 4, 6, 7], segmentation={"size": [h, w], "counts": counts}),
            _ann(12, 1, 7, [3, 4, 6, 7], segmentation=compressed)]
    f, root = _write(tmp_path, [_img(1)], anns, CATS)
    ds = LVISDetection(f, root, with_masks=True)
    _, t = ds[0]
    masks = t["masks"]
    assert masks.dtype == torch.uint8 and tuple(masks.shape) == (3, h, w)
    for k in range(3):
        np.testing.assert_array_equal(masks[k].numpy(), expected, err_msg=f"mask {k}")
    # the COCO mask API decodes the polygon to the same pixels (its area = the box area)
    ref = mask_api.decode(mask_api.frPyObjects([[3, 4, 9, 4, 9, 11, 3, 11]], h, w))[:, :, 0]
    np.testing.assert_array_equal(ref, expected)


def test_polygon_union_of_parts():
    m = segmentation_to_mask([[0, 0, 2, 0, 2, 2, 0, 2], [3, 1, 5, 1, 5, 3, 3, 3]], 4, 6)
    expected = np.zeros((4, 6), np.uint8)
    expected[0:2, 0:2] = 1
    expected[1:3, 3:5] = 1
    np.testing.assert_array_equal(m, expected)


def test_polygon_rasterisation_close_to_coco_mask_api():
    """Exact on axis-aligned rectangles (integer and half-integer corners); on random convex
    polygons only boundary pixels may differ from the COCO API's rasteriser."""
    mask_api = pytest.importorskip("faster_coco_eval.core.mask")
    rng = np.random.default_rng(0)
    h, w = 30, 40
    for t in range(60):
        x0, x1 = sorted(rng.integers(0, w, 2) + (0.5 if t % 2 else 0.0))
        y0, y1 = sorted(rng.integers(0, h, 2) + (0.5 if t % 2 else 0.0))
        poly = [float(v) for v in (x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1)]
        ref = mask_api.decode(mask_api.frPyObjects([poly], h, w))[:, :, 0]
        np.testing.assert_array_equal(segmentation_to_mask([poly], h, w), ref)
    differing = []
    for _ in range(60):
        n = 12
        ang = np.sort(rng.random(n)) * 2 * np.pi
        cx, cy = rng.random(2) * [w, h]
        rad = rng.random() * 12 + 2
        poly = [float(v) for a in ang for v in (cx + rad * np.cos(a), cy + rad * np.sin(a))]
        ref = mask_api.decode(mask_api.frPyObjects([poly], h, w))[:, :, 0].astype(bool)
        ours = segmentation_to_mask([poly], h, w).astype(bool)
        diff = ref ^ ours
        # a differing pixel always touches the other mask's boundary
        grown = ref.copy()
        grown[1:] |= ref[:-1]
        grown[:-1] |= ref[1:]
        grown[:, 1:] |= ref[:, :-1]
        grown[:, :-1] |= ref[:, 1:]
        assert not (diff & ~grown).any()
        differing.append(diff.sum() / max(ref.sum(), 1))
    assert np.mean(differing) < 0.03


def test_mask_errors(tmp_path):
    with pytest.raises(ValueError, match=r"RLE size must be \[height, width\] = \[4, 6\]"):
        segmentation_to_mask({"size": [5, 6], "counts": [30]}, 4, 6)
    with pytest.raises(ValueError, match="must sum to height \\* width = 24, got 23"):
        segmentation_to_mask({"size": [4, 6], "counts": [20, 3]}, 4, 6)
    with pytest.raises(ValueError, match="at least 3"):
        segmentation_to_mask([[1, 1, 2, 2]], 4, 6)
    with pytest.raises(ValueError, match="list of polygons or an RLE dict"):
        segmentation_to_mask("nope", 4, 6)
    f, root = _write(tmp_path, [_img(1)], [_ann(10, 1, 7, [1, 1, 2, 2])], CATS)
    ds = LVISDetection(f, root, with_masks=True)
    with pytest.raises(ValueError, match="annotation id 10 has no 'segmentation'"):
        ds[0]


def test_compressed_rle_without_faster_coco_eval(monkeypatch):
    for name in ("faster_coco_eval", "faster_coco_eval.core", "faster_coco_eval.core.mask"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'eqlosses\[eval\]'"):
        segmentation_to_mask({"size": [4, 6], "counts": "0<0"}, 4, 6)
    # polygons and uncompressed RLE still decode
    assert segmentation_to_mask({"size": [4, 6], "counts": [24]}, 4, 6).sum() == 0


# --------------------------------------------------------------------------------------------
# Checks and errors
# --------------------------------------------------------------------------------------------

def test_not_json(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not a valid JSON file"):
        load_annotations(f)


@pytest.mark.parametrize("drop, missing", [("categories", "['categories']"),
                                           ("annotations", "['annotations']")])
def test_missing_top_level_keys(tmp_path, drop, missing):
    data = {"images": [], "annotations": [], "categories": []}
    del data[drop]
    f = tmp_path / "partial.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"partial.json: missing top-level key(s) "
                                                   f"{missing}")):
        load_annotations(f)
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_annotations(f)


def test_unknown_category_and_image(tmp_path):
    f, _ = _write(tmp_path, [_img(1)], [_ann(55, 1, 99, [1, 1, 2, 2])], CATS, name="c.json",
                  write_images=False)
    with pytest.raises(ValueError, match=r"c\.json: annotation id 55 has category_id 99"):
        load_annotations(f)
    f, _ = _write(tmp_path, [_img(1)], [_ann(56, 4, 7, [1, 1, 2, 2])], CATS, name="i.json",
                  write_images=False)
    with pytest.raises(ValueError, match=r"i\.json: annotation id 56 has image_id 4"):
        load_annotations(f)


@pytest.mark.parametrize("what", ["images", "annotations", "categories"])
def test_duplicate_ids(tmp_path, what):
    images = [_img(1), _img(2)]
    anns = [_ann(5, 1, 7, [1, 1, 2, 2]), _ann(6, 2, 3, [1, 1, 2, 2])]
    cats = [dict(c) for c in CATS]
    {"images": images, "annotations": anns, "categories": cats}[what][1]["id"] = \
        {"images": 1, "annotations": 5, "categories": 7}[what]
    f, _ = _write(tmp_path, images, anns, cats, name="dup.json", write_images=False)
    dup = {"images": 1, "annotations": 5, "categories": 7}[what]
    with pytest.raises(ValueError, match=rf"dup\.json: duplicate {what} id\(s\) {dup} "):
        load_annotations(f)


def test_bad_bbox_and_image_size_fields(tmp_path):
    ann = _ann(5, 1, 7, [1, 1, 2, 2])
    ann["bbox"] = [1, 1, 2]
    f, _ = _write(tmp_path, [_img(1)], [ann], CATS, name="b.json", write_images=False)
    with pytest.raises(ValueError, match=r"b\.json: annotation id 5 must have a 'bbox'"):
        load_annotations(f)
    f, _ = _write(tmp_path, [{"id": 1, "width": 0, "height": 3, "file_name": "x"}], [], CATS,
                  name="s.json", write_images=False)
    with pytest.raises(ValueError, match=r"s\.json: image id 1 must have a positive 'width'"):
        load_annotations(f)


def test_degenerate_boxes_dropped_with_one_warning_and_partial_boxes_clipped(tmp_path):
    images = [_img(1, w=20, h=16)]
    anns = [_ann(1, 1, 7, [2, 2, 4, 4]),           # fine
            _ann(2, 1, 7, [5, 5, 0, 3]),           # zero width
            _ann(3, 1, 3, [5, 5, 3, -1]),          # negative height
            _ann(4, 1, 3, [25, 2, 4, 4]),          # entirely right of the image
            _ann(5, 1, 12, [-3, 10, 8, 10]),       # partly outside: clipped
            _ann(6, 1, 12, [1, 1, 2, 2])]
    anns[5]["bbox"] = [1, float("nan"), 2, 2]      # non-finite (json writes NaN)
    f, root = _write(tmp_path, images, anns, CATS)
    with pytest.warns(UserWarning) as record:
        data = load_annotations(f)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "ann.json" in msg and "dropped 4 annotation(s)" in msg
    assert "annotation id(s) 2, 3, 4, 6" in msg
    assert [a["id"] for a in data["annotations"]] == [1, 5]
    assert data["annotations"][1]["bbox"] == [0.0, 10.0, 5.0, 6.0]
    with pytest.warns(UserWarning, match="dropped 4"):
        ds = LVISDetection(f, root)
    _, t = ds[0]
    assert t["boxes"].tolist() == [[2, 2, 6, 6], [0, 10, 5, 16]]


def test_no_warning_without_degenerate_boxes(tmp_path):
    f, _ = _write(tmp_path, [_img(1)], [_ann(1, 1, 7, [0, 0, 20, 16])], CATS,
                  write_images=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_annotations(f)


def test_many_degenerate_ids_abbreviated(tmp_path):
    anns = [_ann(i, 1, 7, [1, 1, 0, 1]) for i in range(1, 9)]
    f, _ = _write(tmp_path, [_img(1)], anns, CATS, write_images=False)
    with pytest.warns(UserWarning, match=r"dropped 8 .* 1, 2, 3, 4, 5, \.\.\."):
        load_annotations(f)


def test_missing_image_files_reported_together(tmp_path):
    images = [_img(i) for i in range(1, 9)]
    f, root = _write(tmp_path, images, [], CATS)
    for i in (2, 3, 4, 5, 6, 7, 8):
        (root / f"{i:06d}.png").unlink()
    with pytest.raises(FileNotFoundError) as info:
        LVISDetection(f, root)
    msg = str(info.value)
    assert "7 of 8 image file(s) not found" in msg
    assert str(root / "000002.png") in msg and str(root / "000006.png") in msg
    assert "000008.png" not in msg and "..." in msg


def test_image_size_mismatch(tmp_path):
    f, root = _write(tmp_path, [_img(1, w=20, h=16)], [], CATS)
    Image.new("RGB", (21, 16)).save(root / "000001.png")
    ds = LVISDetection(f, root)
    with pytest.raises(ValueError, match=r"000001\.png: the image is 21x16 .* says 20x16"):
        ds[0]


def test_grey_image_converted_to_rgb(tmp_path):
    f, root = _write(tmp_path, [_img(1, w=5, h=4)], [], CATS)
    Image.new("L", (5, 4), color=51).save(root / "000001.png")
    image, _ = LVISDetection(f, root)[0]
    assert tuple(image.shape) == (3, 4, 5)
    assert torch.allclose(image, torch.full_like(image, 0.2))


# --------------------------------------------------------------------------------------------
# Class statistics
# --------------------------------------------------------------------------------------------

def _counting_dataset(tmp_path, categories):
    # class id 3: images 1, 2 (twice in image 1); id 7: image 2; id 12: none
    anns = [_ann(1, 1, 3, [1, 1, 2, 2]), _ann(2, 1, 3, [2, 2, 2, 2]),
            _ann(3, 2, 3, [1, 1, 2, 2]), _ann(4, 2, 7, [1, 1, 2, 2])]
    f, root = _write(tmp_path, [_img(1), _img(2), _img(3)], anns, categories)
    return LVISDetection(f, root)


def test_image_labels_counts_and_repeat_factors(tmp_path):
    ds = _counting_dataset(tmp_path, CATS)
    assert ds.image_labels() == [[0], [0, 1], []]
    counts = ds.class_image_counts()
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 1, 0]
    r = repeat_factors(ds.image_labels(), ds.num_classes, threshold=1.0)
    # f = [2/3, 1/3]: r_c = [sqrt(1.5), sqrt(3)]
    np.testing.assert_allclose(r.numpy(), [1.5 ** 0.5, 3 ** 0.5, 1.0])


def test_frequency_groups_from_frequency_field(tmp_path):
    cats = [{"id": 7, "name": "a", "frequency": "f", "image_count": 1},
            {"id": 3, "name": "b", "frequency": "r", "image_count": 500},
            {"id": 12, "name": "c", "frequency": "c", "image_count": 50}]
    ds = _counting_dataset(tmp_path, cats)
    g = ds.frequency_groups()
    assert g.names == ("rare", "common", "frequent")
    assert g.group_of() == ["rare", "frequent", "common"]  # sorted ids 3, 7, 12
    assert g.bounds["rare"][1] == 10 and g.bounds["common"][1] == 100
    assert ds.frequency_groups("image_count").group_of() == ["frequent", "rare", "common"]
    assert ds.frequency_groups("annotations").group_of() == ["rare", "rare", "rare"]


def test_frequency_groups_from_image_count(tmp_path):
    cats = [{"id": 7, "name": "a", "image_count": 101},
            {"id": 3, "name": "b", "image_count": 10, "frequency": "f"},
            {"id": 12, "name": "c", "image_count": 11}]
    ds = _counting_dataset(tmp_path, cats)  # not every category has a frequency
    assert ds.frequency_groups().group_of() == ["rare", "frequent", "common"]
    with pytest.raises(ValueError, match="not every category has a 'frequency'"):
        ds.frequency_groups("frequency")


def test_frequency_groups_from_annotations(tmp_path):
    ds = _counting_dataset(tmp_path, CATS)
    g = ds.frequency_groups()
    assert g.group_of() == ["rare", "rare", "rare"]
    assert torch.equal(g.masks["rare"], torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="not every category has an 'image_count'"):
        ds.frequency_groups("image_count")
    with pytest.raises(ValueError, match="source must be one of"):
        ds.frequency_groups("nope")


def test_frequency_groups_many_images(tmp_path):
    """The thresholds: 1-10 rare, 11-100 common, > 100 frequent, counted from annotations."""
    n = 101
    images = [_img(i, w=4, h=4) for i in range(1, n + 1)]
    anns = []
    for i in range(1, n + 1):  # id 7 in all 101 images, id 3 in 11, id 12 in 10
        anns.append(_ann(len(anns) + 1, i, 7, [0, 0, 2, 2]))
        if i <= 11:
            anns.append(_ann(len(anns) + 1, i, 3, [0, 0, 2, 2]))
        if i <= 10:
            anns.append(_ann(len(anns) + 1, i, 12, [0, 0, 2, 2]))
    f, root = _write(tmp_path, images, anns, CATS)
    ds = LVISDetection(f, root)
    assert ds.class_image_counts().tolist() == [11, 101, 10]
    assert ds.frequency_groups().group_of() == ["common", "frequent", "rare"]


def test_invalid_frequency_value(tmp_path):
    cats = [{"id": 7, "name": "a", "frequency": "x"}, {"id": 3, "name": "b", "frequency": "r"},
            {"id": 12, "name": "c", "frequency": "c"}]
    ds = _counting_dataset(tmp_path, cats)
    with pytest.raises(ValueError, match=r"must be 'r', 'c' or 'f', got \(id, frequency\) "
                                         r"\(7, 'x'\)"):
        ds.frequency_groups()
