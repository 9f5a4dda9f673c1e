"""eqlosses.data.yolo: LVIS JSON -> Ultralytics dataset, and predictions back to LVIS AP."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eqlosses.data.yolo import (evaluate_yolo, lvis_to_yolo, read_yolo_meta,
                                yolo_label_counts, yolo_results_to_outputs)


def _write_png(path: Path, h: int, w: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _dataset(root: Path, split: str = "val") -> Path:
    """Two images (100x50 and 40x40), categories with ids 7 and 3 (sorted: 3 -> 0, 7 -> 1)."""
    _write_png(root / "images" / split / "a.png", 50, 100)
    _write_png(root / "images" / split / "b.png", 40, 40)
    data = {
        "images": [{"id": 11, "file_name": f"{split}/a.png", "height": 50, "width": 100,
                    "neg_category_ids": [], "not_exhaustive_category_ids": []},
                   {"id": 12, "file_name": f"{split}/b.png", "height": 40, "width": 40,
                    "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 7, "name": "seven", "frequency": "f"},
                       {"id": 3, "name": "three", "frequency": "r"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [10, 5, 20, 10], "area": 200},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [90, 40, 20, 20], "area": 400},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [0, 0, 40, 20], "area": 800},
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [5, 5, 10, 10], "area": 100,
             "iscrowd": 1}],
    }
    path = root / f"{split}.json"
    path.write_text(json.dumps(data))
    return path


def test_labels_yaml_and_meta(tmp_path):
    ann = _dataset(tmp_path / "src")
    data_yaml = lvis_to_yolo({"val": ann}, tmp_path / "src" / "images", tmp_path / "out")
    a = (tmp_path / "out/labels/val/a.txt").read_text().split("\n")
    # category 7 -> class 1; box [10, 5, 20, 10] in 100x50: centre (20, 10) -> (0.2, 0.2)
    assert a[0].split() == ["1", "0.200000", "0.200000", "0.200000", "0.200000"]
    # category 3 -> class 0; [90, 40, 20, 20] clipped to x 90..100, y 40..50
    assert a[1].split() == ["0", "0.950000", "0.900000", "0.100000", "0.200000"]
    b = (tmp_path / "out/labels/val/b.txt").read_text().strip().split("\n")
    assert b == ["0 0.500000 0.250000 1.000000 0.500000"]  # the crowd box is left out
    assert (tmp_path / "out/images/val/a.png").is_file()
    text = data_yaml.read_text()
    assert "val: images/val" in text and '0: "three"' in text and '1: "seven"' in text
    meta = read_yolo_meta(data_yaml)
    assert meta["category_ids"] == [3, 7] and meta["image_ids"]["val"] == {"a": 11, "b": 12}
    images, instances = yolo_label_counts(data_yaml, "val")
    assert images.tolist() == [2, 1] and instances.tolist() == [2, 1]


def test_ultralytics_reads_the_dataset(tmp_path):
    import os
    import sys
    import tempfile

    if "ultralytics" not in sys.modules:  # keep its settings out of the user's home
        os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo_cfg_"))
        os.environ.setdefault("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics")
    from ultralytics.data.utils import check_det_dataset

    ann = _dataset(tmp_path / "src", "train")
    data_yaml = lvis_to_yolo({"train": ann, "val": ann}, tmp_path / "src" / "images",
                             tmp_path / "out")
    info = check_det_dataset(str(data_yaml), autodownload=False)
    assert info["nc"] == 2 and info["names"] == {0: "three", 1: "seven"}


def test_refusals(tmp_path):
    ann = _dataset(tmp_path / "src")
    out = tmp_path / "out"
    lvis_to_yolo({"val": ann}, tmp_path / "src" / "images", out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lvis_to_yolo({"val": ann}, tmp_path / "src" / "images", out)
    data = json.loads(ann.read_text())
    data["images"][1]["file_name"] = "val/sub/a.png"
    _write_png(tmp_path / "src/images/val/sub/a.png", 40, 40)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="stem 'a'"):
        lvis_to_yolo({"val": dup}, tmp_path / "src" / "images", tmp_path / "o2")
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [200, 5, 20, 10]  # outside the image: degenerate
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.warns(UserWarning):
        lvis_to_yolo({"val": bad}, tmp_path / "src" / "images", tmp_path / "o3")
    assert len((tmp_path / "o3/labels/val/a.txt").read_text().strip().split("\n")) == 1


class _FakeYOLO:
    """Stands for ultralytics.YOLO: predicts given boxes (xyxy pixels) for each image."""

    def __init__(self, boxes):
        self.boxes, self.calls = boxes, []

    def predict(self, files, **kwargs):
        self.calls.append(kwargs)
        out = []
        for f in files:
            rows = torch.tensor(self.boxes[Path(f).stem], dtype=torch.float32).reshape(-1, 6)
            out.append(SimpleNamespace(boxes=SimpleNamespace(xyxy=rows[:, :4], conf=rows[:, 4],
                                                             cls=rows[:, 5])))
        return out


def test_evaluate_yolo_scores_perfect_and_wrong_class_predictions(tmp_path):
    pytest.importorskip("faster_coco_eval")
    ann = _dataset(tmp_path / "src")
    data = json.loads(ann.read_text())
    data["annotations"] = [a for a in data["annotations"] if not a.get("iscrowd")]
    data["annotations"][1]["bbox"] = [80, 30, 20, 20]  # inside the image
    ann.write_text(json.dumps(data))
    data_yaml = lvis_to_yolo({"val": ann}, tmp_path / "src" / "images", tmp_path / "out")
    perfect = {"a": [[10, 5, 30, 15, 0.9, 1], [80, 30, 100, 50, 0.8, 0]],
               "b": [[0, 0, 40, 20, 0.7, 0]]}
    model = _FakeYOLO(perfect)
    metrics = evaluate_yolo(model, data_yaml, imgsz=64)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["APr"] == pytest.approx(1.0)
    assert model.calls[0]["conf"] == 0.001 and model.calls[0]["max_det"] == 300
    wrong = {"a": [[10, 5, 30, 15, 0.9, 0]], "b": []}  # class 1's box called class 0
    metrics = evaluate_yolo(_FakeYOLO(wrong), data_yaml)
    assert metrics["APf"] == pytest.approx(0.0)


def test_results_to_outputs_shifts_labels():
    r = SimpleNamespace(boxes=SimpleNamespace(xyxy=torch.zeros(2, 4), conf=torch.ones(2),
                                              cls=torch.tensor([0.0, 4.0])))
    (out,) = yolo_results_to_outputs([r])
    assert out["labels"].tolist() == [1, 5] and out["boxes"].shape == (2, 4)


def test_cli_make_detection_format_yolo(tmp_path, capsys):
    from eqlosses.cli import main

    out = tmp_path / "canvas"
    assert main(["data", "make-detection", "--out", str(out), "--format", "yolo", "--n-max", "4",
                 "--imbalance", "2", "--val-per-class", "1", "--allow-empty-groups"]) == 0
    assert "YOLO dataset" in capsys.readouterr().out
    gt = json.loads((out / "annotations/lvis_v1_train.json").read_text())
    labels = sorted((out / "yolo/labels/train").glob("*.txt"))
    assert len(labels) == len(gt["images"])
    lines = sum(len(p.read_text().split("\n")) - 1 for p in labels)
    assert lines == len(gt["annotations"])  # one label line per box
    assert (out / "yolo/data.yaml").is_file() and (out / "images").is_dir()
