"""LVIS-style detection AP (faster-coco-eval), cross-checked against the official LVIS API."""

import copy
import json
import math
import os
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("faster_coco_eval")

from faster_coco_eval.core import mask as mask_api  # noqa: E402
from eqlosses.metrics.detection import LVISEvaluator  # noqa: E402
from tests.dist_utils import free_port, spawn_and_wait  # noqa: E402

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
CAT_IDS = [3, 5, 8, 11, 13, 20]              # contiguous index k -> original id
FREQ = ["r", "r", "c", "c", "f", "f"]


# --------------------------------------------------------------------------------------------
# A synthetic federated ground truth and noisy detections
# --------------------------------------------------------------------------------------------

def _box(rng, w, h, side):
    bw = float(np.clip(side * rng.uniform(0.6, 1.4), 3, w - 2))
    bh = float(np.clip(side * rng.uniform(0.6, 1.4), 3, h - 2))
    x = float(rng.uniform(0, w - bw))
    y = float(rng.uniform(0, h - bh))
    return [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]


def make_gt(seed=0, num_images=12):
    """Images 160-220 px with 0-5 objects of small / medium / large size; polygon masks
    (octagons inscribed in the box); per image random neg / not-exhaustive category ids."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, num_images + 1):
        w, h = int(rng.integers(160, 221)), int(rng.integers(160, 221))
        present = set()
        for _ in range(int(rng.integers(0, 6))):
            k = int(rng.choice(len(CAT_IDS), p=[0.05, 0.1, 0.15, 0.15, 0.25, 0.3]))
            side = float(rng.choice([14, 50, 130]))
            x, y, bw, bh = _box(rng, w, h, side)
            c = 0.25  # octagon: the box with its corners cut at a quarter of each side
            poly = [x + c * bw, y, x + (1 - c) * bw, y, x + bw, y + c * bh,
                    x + bw, y + (1 - c) * bh, x + (1 - c) * bw, y + bh, x + c * bw, y + bh,
                    x, y + (1 - c) * bh, x, y + c * bh]
            area = bw * bh * (1 - 2 * c * c)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CAT_IDS[k],
                         "bbox": [x, y, bw, bh], "area": area,
                         "segmentation": [[round(v, 2) for v in poly]]})
            present.add(CAT_IDS[k])
        absent = [c for c in CAT_IDS if c not in present]
        neg = sorted(int(c) for c in rng.choice(absent, size=len(absent) // 2, replace=False))
        nel = sorted(c for c in present if rng.random() < 0.3)
        images.append({"id": i, "width": w, "height": h, "neg_category_ids": neg,
                       "not_exhaustive_category_ids": nel})
    cats = [{"id": c, "name": f"cat{c}", "frequency": f} for c, f in zip(CAT_IDS, FREQ)]
    return {"images": images, "annotations": anns, "categories": cats}


def make_detections(gt, seed=1, masks=False):
    """Per image: jittered copies of most objects (sometimes with the wrong class, sometimes
    twice) and random false positives of any class; distinct random scores."""
    rng = np.random.default_rng(seed)
    index = {c: k for k, c in enumerate(CAT_IDS)}
    outputs, image_ids = [], []
    for img in gt["images"]:
        w, h = img["width"], img["height"]
        boxes, labels = [], []
        for a in (a for a in gt["annotations"] if a["image_id"] == img["id"]):
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
                x, y, bw, bh = a["bbox"]
                s = 0.12 * rng.standard_normal(4)
                x1, y1 = x + s[0] * bw, y + s[1] * bh
                x2, y2 = x + bw * (1 + s[2]), y + bh * (1 + s[3])
                boxes.append([x1, y1, x2, y2])
                k = index[a["category_id"]]
                labels.append(k if rng.random() < 0.85 else int(rng.integers(len(CAT_IDS))))
        for _ in range(int(rng.integers(1, 5))):
            x, y, bw, bh = _box(rng, w, h, float(rng.choice([14, 50, 130])))
            boxes.append([x, y, x + bw, y + bh])
            labels.append(int(rng.integers(len(CAT_IDS))))
        b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        out = {"boxes": b, "scores": torch.from_numpy(rng.uniform(0.05, 1.0, len(boxes))).float(),
               "labels": torch.tensor(labels, dtype=torch.int64) + 1}
        if masks:
            out["masks"] = _box_masks(b, h, w, rng)
        outputs.append(out)
        image_ids.append(img["id"])
    return outputs, image_ids


def _box_masks(boxes, h, w, rng=None):
    """Float "probability" masks [n, 1, h, w]: an ellipse-ish blob in each box."""
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    out = torch.zeros(len(boxes), 1, h, w)
    for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        rx, ry = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
        d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        out[j, 0] = (1.2 - d).clamp(0, 1)  # > 0.5 inside d < 0.7
    return out


def _official(gt, outputs, image_ids, iou_type, tmp_path):
    """Results of the official LVIS API (``lvis.LVISEval``) on the same detections."""
    np.float = float  # lvis 0.5.3 uses np.float, removed in numpy 1.24
    lvis = pytest.importorskip("lvis")
    mask_utils = pytest.importorskip("pycocotools.mask")
    path = tmp_path / "gt_official.json"
    path.write_text(json.dumps(gt))
    results = []
    for out, image_id in zip(outputs, image_ids):
        for j in range(len(out["scores"])):
            x1, y1, x2, y2 = out["boxes"][j].tolist()
            rec = {"image_id": image_id, "category_id": CAT_IDS[int(out["labels"][j]) - 1],
                   "score": float(out["scores"][j])}
            if iou_type == "bbox":
                rec["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                m = (out["masks"][j, 0] > 0.5).numpy().astype(np.uint8)
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                rec["segmentation"] = rle
            results.append(rec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # lvis calls logger.warn
        ev = lvis.LVISEval(lvis.LVIS(str(path)), results, iou_type=iou_type)
        ev.run()
    r = {k: (math.nan if ev.results[k] == -1 else float(ev.results[k])) for k in KEYS}
    prec = ev.eval["precision"][:, :, :, 0]  # [T, R, K] area "all"
    r["per_class_ap"] = [float(prec[:, :, k][prec[:, :, k] > -1].mean())
                         if (prec[:, :, k] > -1).any() else math.nan for k in range(len(CAT_IDS))]
    return r


def _assert_metrics_close(actual, expected, atol, keys=KEYS):
    for k in keys:
        a, e = actual[k], expected[k]
        assert (math.isnan(a) and math.isnan(e)) or abs(a - e) <= atol, f"{k}: {a} vs {e}"
    np.testing.assert_allclose(actual["per_class_ap"], expected["per_class_ap"], atol=atol,
                               rtol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Cross-check with the official LVIS API
# --------------------------------------------------------------------------------------------

def test_synthetic_data_covers_the_federated_cases():
    """The cross-check below only means something if the detections exercise every LVIS rule:
    classes neither positive nor negative (not evaluated), negatives (false positives),
    not-exhaustive classes, and objects of every size and frequency group."""
    gt = make_gt()
    outputs, image_ids = make_detections(gt)
    imgs = {img["id"]: img for img in gt["images"]}
    pos = {}
    for a in gt["annotations"]:
        pos.setdefault(a["image_id"], set()).add(a["category_id"])
    kinds = {"unknown": 0, "negative": 0, "not_exhaustive": 0}
    for out, image_id in zip(outputs, image_ids):
        for label in out["labels"].tolist():
            c = CAT_IDS[label - 1]
            if c in imgs[image_id]["not_exhaustive_category_ids"]:
                kinds["not_exhaustive"] += 1
            if c in imgs[image_id]["neg_category_ids"]:
                kinds["negative"] += 1
            elif c not in pos.get(image_id, set()):
                kinds["unknown"] += 1
    assert min(kinds.values()) >= 3, kinds
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32 ** 2).any() and ((areas > 32 ** 2) & (areas < 96 ** 2)).any()
    assert (areas > 96 ** 2).any()
    assert {CAT_IDS.index(a["category_id"]) for a in gt["annotations"]} == set(range(6))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_official_lvis_api(tmp_path, iou_type, seed):
    gt = make_gt(seed)
    outputs, image_ids = make_detections(gt, seed=seed + 10, masks=iou_type == "segm")
    ev = LVISEvaluator(gt, CAT_IDS, iou_types=(iou_type,))
    ev.update(outputs, image_ids)
    ours = ev.compute()[iou_type]
    official = _official(gt, outputs, image_ids, iou_type, tmp_path)
    _assert_metrics_close(ours, official, atol=1e-9)
    assert ours["num_detections"] == sum(len(o["scores"]) for o in outputs)
    assert ours["num_images"] == len(gt["images"])
    assert 0.05 < ours["AP"] < 0.95  # a non-trivial case


def test_zero_area_gt_left_out_as_in_official_api(tmp_path):
    gt = make_gt(0)
    gt["annotations"][0]["area"] = 0.0
    outputs, image_ids = make_detections(gt, seed=10)
    ev = LVISEvaluator(gt, CAT_IDS)
    ev.update(outputs, image_ids)
    _assert_metrics_close(ev.compute()["bbox"], _official(gt, outputs, image_ids, "bbox",
                                                          tmp_path), atol=1e-9)


def test_bbox_and_segm_together(tmp_path):
    gt = make_gt(0)
    outputs, image_ids = make_detections(gt, seed=10, masks=True)
    both = LVISEvaluator(gt, CAT_IDS, iou_types=("bbox", "segm"))
    both.update(outputs, image_ids)
    r = both.compute()
    assert set(r) == {"bbox", "segm"}
    for t in ("bbox", "segm"):
        one = LVISEvaluator(gt, CAT_IDS, iou_types=t)
        one.update(outputs, image_ids)
        _assert_metrics_close(r[t], one.compute()[t], atol=0)


# --------------------------------------------------------------------------------------------
# Exact cases
# --------------------------------------------------------------------------------------------

def _perfect(gt, masks=False):
    outputs, image_ids = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float64).reshape(-1, 4)
        out = {"boxes": boxes, "scores": torch.linspace(1.0, 0.5, len(anns)),
               "labels": torch.tensor([CAT_IDS.index(a["category_id"]) + 1 for a in anns],
                                      dtype=torch.int64)}
        if masks:  # the gt polygons rasterised by the evaluator's own mask API
            h, w = img["height"], img["width"]
            out["masks"] = torch.from_numpy(np.stack(
                [mask_api.decode(mask_api.frPyObjects(a["segmentation"], h, w))[:, :, 0]
                 for a in anns]) if anns else np.zeros((0, h, w))).bool()
        outputs.append(out)
        image_ids.append(img["id"])
    return outputs, image_ids


@pytest.mark.parametrize("iou_types", [("bbox",), ("bbox", "segm")])
def test_perfect_detections_give_ap_one(iou_types):
    gt = make_gt(3)
    outputs, image_ids = _perfect(gt, masks="segm" in iou_types)
    ev = LVISEvaluator(gt, CAT_IDS, iou_types=iou_types)
    ev.update(outputs, image_ids)
    r = ev.compute()
    present = {a["category_id"] for a in gt["annotations"]}
    assert {"r", "c", "f"} == {FREQ[CAT_IDS.index(c)] for c in present}
    for t in iou_types:
        assert all(r[t][k] == 1.0 for k in KEYS), r[t]
        expected = [1.0 if c in present else math.nan for c in CAT_IDS]
        np.testing.assert_equal(r[t]["per_class_ap"], expected)


def test_perfect_rectangle_masks_give_mask_ap_one():
    gt = {"images": [{"id": 1, "width": 40, "height": 30, "neg_category_ids": [],
                      "not_exhaustive_category_ids": []}],
          "categories": [{"id": 1, "name": "a", "frequency": "c"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 5, 10, 8],
                           "area": 80, "segmentation": [[4, 5, 14, 5, 14, 13, 4, 13]]}]}
    m = torch.zeros(1, 1, 30, 40)
    m[0, 0, 5:13, 4:14] = 0.9
    ev = LVISEvaluator(gt, [1], iou_types=("bbox", "segm"))
    ev.update([{"boxes": torch.tensor([[4., 5., 14., 13.]]), "scores": torch.tensor([0.7]),
                "labels": torch.tensor([1]), "masks": m}], [1])
    r = ev.compute()
    for t in ("bbox", "segm"):
        assert r[t]["AP"] == 1.0 and r[t]["APc"] == 1.0 and r[t]["APs"] == 1.0
        assert math.isnan(r[t]["APr"]) and math.isnan(r[t]["APf"]) and math.isnan(r[t]["APm"])


def _one_image_gt(neg, nel, extra_cats=()):
    img = {"id": 1, "width": 100, "height": 100}
    if neg is not None:
        img["neg_category_ids"] = neg
        img["not_exhaustive_category_ids"] = nel
    return {"images": [img],
            "categories": [{"id": c, "name": str(c), "frequency": "f"}
                           for c in (1, 2, 3, *extra_cats)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30],
                             "area": 900}]}


def _ap_with_extra(gt, label, box=(60.0, 60.0, 90.0, 90.0)):
    """AP of a perfect detection of class 1 plus a higher-scoring detection of ``label``."""
    ev = LVISEvaluator(gt, [1, 2, 3])
    ev.update([{"boxes": torch.tensor([[10., 10., 40., 40.], list(box)]),
                "scores": torch.tensor([0.5, 0.9]), "labels": torch.tensor([1, label])}], [1])
    return ev.compute()["bbox"]


def test_federated_rules_honoured():
    # class 2 is neither annotated nor negative on the image: its detection is not evaluated
    r = _ap_with_extra(_one_image_gt(neg=[3], nel=[]), label=2)
    assert r["AP"] == 1.0 and r["per_class_ap"][0] == 1.0
    assert math.isnan(r["per_class_ap"][1]) and math.isnan(r["per_class_ap"][2])
    # class 3 is a verified negative: a false positive of class 3 (no gt: AP undefined), and
    # class 1's AP is unaffected
    r = _ap_with_extra(_one_image_gt(neg=[3], nel=[]), label=3)
    assert r["AP"] == 1.0
    # an unmatched class-1 detection scoring above the match is a false positive ...
    assert _ap_with_extra(_one_image_gt(neg=[3], nel=[]), label=1)["AP"] < 0.6
    # ... unless class 1 is not exhaustively annotated on the image: then it is ignored
    assert _ap_with_extra(_one_image_gt(neg=[3], nel=[1]), label=1)["AP"] == 1.0
    # a matched detection of a not-exhaustive class still counts as a true positive
    assert _ap_with_extra(_one_image_gt(neg=[3], nel=[1]), label=1,
                          box=(10.0, 10.0, 40.0, 40.0))["AP"] == 1.0


def test_negative_false_positives_lower_ap():
    """A false positive on an image where its class is a verified negative costs AP; on an
    image where the class is unverified it does not."""
    gt = {"images": [{"id": i, "width": 100, "height": 100, "neg_category_ids": neg,
                      "not_exhaustive_category_ids": []} for i, neg in ((1, []), (2, [1]),
                                                                         (3, []))],
          "categories": [{"id": 1, "name": "a", "frequency": "r"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30],
                           "area": 900}]}

    def ap(fp_image):
        ev = LVISEvaluator(gt, [1])
        ev.update([{"boxes": torch.tensor([[10., 10., 40., 40.]]), "scores": torch.tensor([0.5]),
                    "labels": torch.tensor([1])},
                   {"boxes": torch.tensor([[5., 5., 50., 50.]]), "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([1])}], [1, fp_image])
        return ev.compute()["bbox"]["AP"]

    assert ap(3) == 1.0            # class 1 unverified on image 3: not evaluated
    assert ap(2) == pytest.approx(0.5, abs=0.01)  # verified negative: a false positive first


def test_coco_format_gt_is_exhaustive_and_frequency_filled():
    """Without neg_category_ids every absent class is a negative (COCO semantics); without
    frequency the groups come from image_count, else from the gt's own image counts."""
    gt = _one_image_gt(neg=None, nel=None)
    gt["images"].append({"id": 2, "width": 100, "height": 100})  # no object at all
    ev = LVISEvaluator(gt, [1, 2, 3])
    assert not ev.federated
    assert LVISEvaluator(_one_image_gt(neg=[], nel=[]), [1, 2, 3]).federated
    ev.update([{"boxes": torch.tensor([[10., 10., 40., 40.]]), "scores": torch.tensor([0.5]),
                "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5., 5., 50., 50.]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1])}], [1, 2])
    # image 2 is exhaustively annotated: the class-1 detection there is a false positive
    # (faster-coco-eval's lvis_style alone would drop it: no neg_category_ids -> unverified)
    assert ev.compute()["bbox"]["AP"] == pytest.approx(0.5, abs=0.01)
    gt["images"].pop()
    for c in gt["categories"]:
        del c["frequency"]
    ev = LVISEvaluator(gt, [1, 2, 3])
    assert ev.frequency_source == "annotations"
    assert [c["frequency"] for c in ev._gt["categories"]] == ["r", "r", "r"]
    for c, n in zip(gt["categories"], (5, 50, 500)):
        c["image_count"] = n
    ev = LVISEvaluator(gt, [1, 2, 3])
    assert ev.frequency_source == "image_count"
    assert [c["frequency"] for c in ev._gt["categories"]] == ["r", "c", "f"]
    assert "frequency" not in gt["categories"][0]  # the caller's dict is not modified


def test_crowd_gt_is_an_ignore_region():
    gt = _one_image_gt(neg=[], nel=[])
    gt["annotations"].append({"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1,
                              "bbox": [50, 50, 40, 40], "area": 1600})
    ev = LVISEvaluator(gt, [1, 2, 3])
    ev.update([{"boxes": torch.tensor([[10., 10., 40., 40.], [50., 50., 90., 90.]]),
                "scores": torch.tensor([0.5, 0.9]), "labels": torch.tensor([1, 1])}], [1])
    # the crowd region is neither missed nor a source of false positives
    assert ev.compute()["bbox"]["AP"] == 1.0


def test_max_dets_keeps_the_highest_scores():
    gt = _one_image_gt(neg=[], nel=[])
    boxes = torch.tensor([[60., 60., 90., 90.], [10., 10., 40., 40.], [0., 0., 5., 5.]])
    out = {"boxes": boxes, "scores": torch.tensor([0.2, 0.3, 0.1]),
           "labels": torch.tensor([1, 1, 1])}
    ev = LVISEvaluator(gt, [1, 2, 3], max_dets=1)
    ev.update([out], [1])
    r = ev.compute()["bbox"]
    assert r["num_detections"] == 1 and r["AP"] == 1.0  # only the 0.3 match is kept
    ev = LVISEvaluator(gt, [1, 2, 3], max_dets=300)
    ev.update([out], [1])
    assert ev.compute()["bbox"]["num_detections"] == 3


def test_empty_results_give_zero_ap():
    gt = make_gt(0)
    present = {a["category_id"] for a in gt["annotations"]}
    for iou_types in (("bbox",), ("bbox", "segm")):
        ev = LVISEvaluator(gt, CAT_IDS + [99], iou_types=iou_types)
        empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                  "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 1, img["height"], img["width"])}
                 for img in gt["images"]]
        ev.update(empty, [img["id"] for img in gt["images"]])
        r = ev.compute()
        for t in iou_types:
            assert all(r[t][k] == 0.0 for k in KEYS), r[t]
            assert r[t]["num_detections"] == 0
            expected = [0.0 if c in present else math.nan for c in CAT_IDS] + [math.nan]
            np.testing.assert_equal(r[t]["per_class_ap"], expected)
    # no update at all: every gt image, nothing detected
    r = LVISEvaluator(gt, CAT_IDS).compute()["bbox"]
    assert r["AP"] == 0.0 and r["num_images"] == len(gt["images"])


def test_evaluates_only_the_images_given():
    gt = make_gt(0)
    outputs, image_ids = _perfect(gt)
    ev = LVISEvaluator(gt, CAT_IDS)
    ev.update(outputs[:4], image_ids[:4])
    r = ev.compute()["bbox"]
    assert r["num_images"] == 4 and r["AP"] == 1.0


def test_repeated_image_counts_once_and_reset():
    gt = _one_image_gt(neg=[], nel=[])
    good = {"boxes": torch.tensor([[10., 10., 40., 40.]]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1])}
    bad = {"boxes": torch.tensor([[60., 60., 90., 90.]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1])}
    ev = LVISEvaluator(gt, [1, 2, 3])
    ev.update([good], [1])
    ev.update([bad], [torch.tensor(1)])
    r = ev.compute()["bbox"]
    assert r["AP"] == 1.0 and r["num_detections"] == 1
    with pytest.raises(RuntimeError, match="call reset"):
        ev.update([good], [1])
    ev.reset()
    ev.update([bad], [1])
    assert ev.compute()["bbox"]["AP"] == 0.0


def test_mask_formats_agree():
    gt = make_gt(0)
    outputs, image_ids = make_detections(gt, seed=10, masks=True)
    ev = LVISEvaluator(gt, CAT_IDS, iou_types="segm")
    ev.update(outputs, image_ids)
    probs = ev.compute()["segm"]
    as_bool = [{**o, "masks": o["masks"][:, 0] > 0.5} for o in outputs]
    ev = LVISEvaluator(gt, CAT_IDS, iou_types="segm")
    ev.update(as_bool, image_ids)
    _assert_metrics_close(ev.compute()["segm"], probs, atol=0)


def test_gt_from_file_and_dict_not_modified(tmp_path):
    gt = make_gt(0)
    snapshot = copy.deepcopy(gt)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    outputs, image_ids = make_detections(gt, masks=True)
    results = []
    for source in (gt, path, str(path)):
        ev = LVISEvaluator(source, CAT_IDS, iou_types=("bbox", "segm"))
        ev.update(outputs, image_ids)
        results.append(ev.compute())
    assert gt == snapshot
    for r in results[1:]:
        for t in ("bbox", "segm"):
            _assert_metrics_close(r[t], results[0][t], atol=0)


def test_errors(tmp_path):
    gt = _one_image_gt(neg=[], nel=[])
    one = {"boxes": torch.tensor([[10., 10., 40., 40.]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1])}
    ev = LVISEvaluator(gt, [1, 2, 3])
    with pytest.raises(ValueError, match=r"labels must be in \[1, 3\] .* found 4"):
        ev.update([{**one, "labels": torch.tensor([4])}], [1])
    with pytest.raises(ValueError, match=r"labels must be in \[1, 3\] .* found 0"):
        ev.update([{**one, "labels": torch.tensor([0])}], [1])
    with pytest.raises(ValueError, match="labels must be integers"):
        ev.update([{**one, "labels": torch.tensor([1.0])}], [1])
    with pytest.raises(ValueError, match="image id 7 is not in the ground truth"):
        ev.update([one], [7])
    with pytest.raises(ValueError, match=r"one image id per output \(1\), got 2"):
        ev.update([one], [1, 1])
    with pytest.raises(ValueError, match=r"expected boxes \[n, 4\]"):
        ev.update([{**one, "boxes": torch.zeros(2, 4)}], [1])
    with pytest.raises(ValueError, match="needs 'boxes', 'scores' and 'labels'"):
        ev.update([{"boxes": one["boxes"]}], [1])
    seg = LVISEvaluator(gt, [1, 2, 3], iou_types="segm")
    with pytest.raises(ValueError, match="needs 'masks'"):
        seg.update([one], [1])
    with pytest.raises(ValueError, match=r"masks must have shape \[1, 1, 100, 100\]"):
        seg.update([{**one, "masks": torch.zeros(1, 1, 50, 100)}], [1])
    with pytest.raises(ValueError, match="iou_types must be"):
        LVISEvaluator(gt, [1, 2, 3], iou_types=("keypoints",))
    with pytest.raises(ValueError, match="iou_types must be"):
        LVISEvaluator(gt, [1, 2, 3], iou_types=("bbox", "bbox"))
    with pytest.raises(ValueError, match="category_ids must be"):
        LVISEvaluator(gt, [1, 1])
    with pytest.raises(ValueError, match="max_dets must be a positive int, got 0"):
        LVISEvaluator(gt, [1, 2, 3], max_dets=0)
    bad = copy.deepcopy(gt)
    bad["annotations"][0]["category_id"] = 9
    with pytest.raises(ValueError, match=r"<gt dict>: annotation id 1 has category_id 9"):
        LVISEvaluator(bad, [1, 2, 3])
    (tmp_path / "x.json").write_text("nope")
    with pytest.raises(ValueError, match=r"x\.json: not a valid JSON file"):
        LVISEvaluator(tmp_path / "x.json", [1])
    bad = copy.deepcopy(gt)
    bad["categories"][0]["frequency"] = "q"
    with pytest.raises(ValueError, match="frequency must be 'r', 'c' or 'f'"):
        LVISEvaluator(bad, [1, 2, 3])


def test_missing_faster_coco_eval(monkeypatch):
    import sys
    for name in ("faster_coco_eval", "faster_coco_eval.core", "faster_coco_eval.core.mask"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'eqlosses\[eval\]'"):
        LVISEvaluator(_one_image_gt(neg=[], nel=[]), [1, 2, 3])


# --------------------------------------------------------------------------------------------
# Two processes (gloo)
# --------------------------------------------------------------------------------------------

WORLD = 2


def _wrong(output):
    """The same detections with every label shifted to the next class."""
    return {**output, "labels": output["labels"] % len(CAT_IDS) + 1}


def _dist_worker(r, port, out_dir, gt_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        gt = json.loads(Path(gt_path).read_text())
        outputs, image_ids = make_detections(gt, seed=10, masks=True)
        half = len(image_ids) // 2
        mine = slice(0, half) if r == 0 else slice(half, None)
        ev = LVISEvaluator(gt_path, CAT_IDS, iou_types=("bbox", "segm"))
        ev.update(outputs[mine], image_ids[mine])
        if r == 1:
            # the padding of a DistributedSampler: rank 1 also sees rank 0's first image,
            # here with different (wrong) detections; rank 0's must be the ones kept
            ev.update([_wrong(outputs[0])], [image_ids[0]])
        result = ev.compute()
        with open(os.path.join(out_dir, f"rank{r}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    gt = make_gt(0)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    spawn_and_wait(_dist_worker, (free_port(), str(tmp_path), str(gt_path)), WORLD, 90.0,
                   "LVISEvaluator.gather on 2 processes")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert res[1] == {}
    ev = LVISEvaluator(gt, CAT_IDS, iou_types=("bbox", "segm"))
    outputs, image_ids = make_detections(gt, seed=10, masks=True)
    ev.update(outputs, image_ids)
    single = ev.compute()
    for t in ("bbox", "segm"):
        _assert_metrics_close(res[0][t], single[t], atol=1e-12)
        assert res[0][t]["num_detections"] == single[t]["num_detections"]
        assert res[0][t]["num_images"] == single[t]["num_images"] == len(image_ids)
    # keeping rank 1's copy of the shared image would have shown
    ev = LVISEvaluator(gt, CAT_IDS)
    ev.update([_wrong(outputs[0])] + outputs[1:], image_ids)
    assert abs(ev.compute()["bbox"]["AP"] - single["bbox"]["AP"]) > 1e-3
