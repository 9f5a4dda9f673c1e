"""Segmentation folders (ADE20K and classes.json layouts), label mapping, every fault, paired
transforms (alignment, determinism per (seed, epoch, index)) and class pixel statistics."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from eqlosses.data.samplers import repeat_factors
from eqlosses.data.segmentation import (SegmentationFolder, SegTransforms, ade20k, image_counts,
                                        image_labels, item_seed, pixel_counts,
                                        segmentation_folder_from_meta)

Image = pytest.importorskip("PIL.Image")

# one distinct colour per class, for the alignment tests
PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20],
                    [20, 230, 230]], dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path)


def write_tree(root: Path, split: str, masks, images=None, ext: str = ".png",
               image_dir="images", ann_dir="annotations"):
    """Write ``masks`` (uint8 [H, W] each) as annotations and matching images (random RGB
    unless given) as ``root/images/split/img{i}{ext}``."""
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=np.uint8)
        img = (rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8) if images is None
               else images[i])
        _save(root / image_dir / split / f"img{i}{ext}", img)
        _save(root / ann_dir / split / f"img{i}.png", mask)
    return root


def write_meta(root: Path, classes, ignore_index=255, reduce_zero_label=False):
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(
        {"classes": classes, "ignore_index": ignore_index, "reduce_zero_label": reduce_zero_label}))


def block_masks(n, h=12, w=16, num_classes=4, block=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, num_classes, (h // block, w // block))
        out.append(np.kron(coarse, np.ones((block, block), dtype=np.int64)).astype(np.uint8))
    return out


# --------------------------------------------------------------------------------------------
# Layouts and label mapping
# --------------------------------------------------------------------------------------------

def test_ade20k_reduce_zero_label_maps_0_to_ignore_and_k_to_k_minus_1(tmp_path):
    raw = np.array([[0, 1, 2, 150], [255, 1, 75, 0]], dtype=np.uint8)
    ade = tmp_path / "ADEChallengeData2016"
    write_tree(ade, "training", [raw], ext=".jpg")
    write_tree(ade, "validation", [raw], ext=".jpg")
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.01\t10\t1\tname{i}, alias"
                                                for i in range(1, 151)]
    (ade / "objectInfo150.txt").write_text("\n".join(lines))
    for root in (ade, tmp_path):  # the folder itself or its parent
        ds = ade20k(root, "training")
        assert ds.num_classes == 150 and ds.reduce_zero_label and ds.ignore_index == 255
        assert len(ds) == 1 and ds.class_names[0] == "name1, alias"
        image, target = ds[0]
        assert image.dtype == torch.float32 and image.shape == (3, 2, 4)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert target.dtype == torch.int64
        assert target.tolist() == [[255, 0, 1, 149], [255, 0, 74, 255]]
    assert len(ade20k(tmp_path, "validation")) == 1
    with pytest.raises(ValueError, match="training' or 'validation"):
        ade20k(tmp_path, "train")


def test_meta_folder_reads_classes_json_and_keeps_class_0(tmp_path):
    raw = np.array([[0, 1, 2], [3, 255, 0]], dtype=np.uint8)
    write_tree(tmp_path, "train", [raw, raw[:, ::-1].copy()])
    write_meta(tmp_path, ["background", "cat", "dog", "bird"])
    ds = segmentation_folder_from_meta(tmp_path, "train")
    assert ds.class_names == ["background", "cat", "dog", "bird"]
    assert (ds.num_classes, ds.reduce_zero_label, ds.ignore_index) == (4, False, 255)
    assert ds[0][1].tolist() == raw.tolist()
    assert ds[-1][1].tolist() == raw[:, ::-1].tolist()
    same = SegmentationFolder.from_meta(tmp_path, "train")
    assert same.samples == ds.samples and same.class_names == ds.class_names


def test_palette_annotation_indices_are_the_labels_and_custom_dir_names(tmp_path):
    raw = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    ann = Image.fromarray(raw, mode="L").convert("P")  # identity palette on grey values
    ann.putpalette([v for i in range(256) for v in ((i * 7) % 256, i, 255 - i)])
    (tmp_path / "img" / "s").mkdir(parents=True)
    (tmp_path / "ann" / "s").mkdir(parents=True)
    ann.save(tmp_path / "ann" / "s" / "a.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "img" / "s" / "a.png")
    ds = SegmentationFolder(tmp_path, "s", 3, False, image_dir="img", ann_dir="ann")
    with Image.open(tmp_path / "ann" / "s" / "a.png") as check:
        assert check.mode == "P"
    assert ds[0][1].tolist() == [[0, 1], [2, 255]]


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

def test_images_without_annotation_are_listed_with_a_count(tmp_path):
    write_tree(tmp_path, "train", block_masks(8))
    for i in range(7):
        (tmp_path / "annotations" / "train" / f"img{i}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"7 of the 8 images in .*images.train have no "
                                                r"annotation .*: img0.png, img1.png, img2.png, "
                                                r"img3.png, img4.png and 2 more$"):
        SegmentationFolder(tmp_path, "train", 4, False)


def test_annotation_without_image_is_an_error(tmp_path):
    write_tree(tmp_path, "train", block_masks(2))
    (tmp_path / "images" / "train" / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 annotations in .*annotations.train "
                                                r"have no image .*: img1.png$"):
        SegmentationFolder(tmp_path, "train", 4, False)


def test_empty_split_and_missing_folders(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "annotations" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="split 'train' is empty"):
        SegmentationFolder(tmp_path, "train", 4, False)
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*images.val"):
        SegmentationFolder(tmp_path, "val", 4, False)
    with pytest.raises(FileNotFoundError, match="classes.json"):
        segmentation_folder_from_meta(tmp_path, "train")


def test_mask_of_another_size_fails_at_load_naming_both_files(tmp_path):
    write_tree(tmp_path, "train", block_masks(2))
    _save(tmp_path / "annotations" / "train" / "img1.png", np.zeros((5, 7), np.uint8))
    ds = SegmentationFolder(tmp_path, "train", 4, False)  # construction only lists files
    ds[0]
    with pytest.raises(ValueError, match=r"img1.png: mask size 7x5 \(WxH\) differs from image "
                                         r"img1.png size 16x12"):
        ds[1]


def test_labels_out_of_range_name_the_file_and_values(tmp_path):
    write_tree(tmp_path, "train", [np.array([[0, 3, 7], [9, 255, 1]], np.uint8)])
    ds = SegmentationFolder(tmp_path, "train", 4, False)
    with pytest.raises(ValueError, match=r"img0.png: label values 7, 9 are not classes; "
                                         r"expected 0-3 or the ignore label 255"):
        ds[0]
    with pytest.raises(ValueError, match="label values 7, 9"):
        pixel_counts(ds)
    # with reduce_zero_label the valid file values are 0..C (and 255)
    ok = SegmentationFolder(tmp_path, "train", 9, True)
    assert ok[0][1].tolist() == [[255, 2, 6], [8, 255, 0]]
    with pytest.raises(ValueError, match=r"label values 9 .*expected 0 \(ignored\), 1-8"):
        SegmentationFolder(tmp_path, "train", 8, True)[0]


def test_rgb_annotation_is_rejected_with_an_explanation(tmp_path):
    write_tree(tmp_path, "train", block_masks(1))
    _save(tmp_path / "annotations" / "train" / "img0.png", np.zeros((12, 16, 3), np.uint8))
    ds = SegmentationFolder(tmp_path, "train", 4, False)
    with pytest.raises(ValueError, match=r"img0.png: annotation mode RGB .* mode L .* P "
                                         r".*colour-coded mask"):
        ds[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=4, reduce_zero_label=False, ignore_index=2), "outside the classes"),
    (dict(num_classes=0, reduce_zero_label=False), "positive int"),
    (dict(num_classes=256, reduce_zero_label=True, ignore_index=-1), "do not fit"),
    (dict(num_classes=4, reduce_zero_label=True, ignore_index=4), "another ignore_index"),
    (dict(num_classes=4, reduce_zero_label=False, class_names=["a"]), "4 class names"),
    (dict(num_classes=4, reduce_zero_label=False,
          transforms=SegTransforms(True, 8, ignore_index=-100)), "pad masks with"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    write_tree(tmp_path, "train", block_masks(1))
    with pytest.raises(ValueError, match=match):
        SegmentationFolder(tmp_path, "train", **kwargs)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"classes": []}), "non-empty list"),
    (json.dumps({"classes": ["a", "b"], "reduce_zero_label": "no"}), "true or false"),
    (json.dumps({"classes": ["a", "b"], "ignore_index": "255"}), "must be an int"),
])
def test_bad_classes_json(tmp_path, content, match):
    write_tree(tmp_path, "train", block_masks(1))
    (tmp_path / "classes.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        segmentation_folder_from_meta(tmp_path, "train")


def test_two_images_with_one_stem_are_ambiguous(tmp_path):
    write_tree(tmp_path, "train", block_masks(1))
    _save(tmp_path / "images" / "train" / "img0.jpg", np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="share a name stem"):
        SegmentationFolder(tmp_path, "train", 4, False)


# --------------------------------------------------------------------------------------------
# Paired transforms
# --------------------------------------------------------------------------------------------

def _colour_tree(tmp_path, n=4, h=24, w=32, block=8, num_classes=5):
    masks = block_masks(n, h, w, num_classes, block, seed=1)
    images = [PALETTE[m] for m in masks]
    write_tree(tmp_path, "train", masks, images=images)
    return masks


def _decode(image):
    """Class of each pixel from its colour (nearest palette entry); -1 for black padding."""
    pal = torch.as_tensor(PALETTE, dtype=torch.float32).div(255)  # [K, 3]
    d = ((image.permute(1, 2, 0)[..., None, :] - pal) ** 2).sum(-1)  # [H, W, K]
    cls = d.argmin(-1)
    cls[image.abs().sum(0) < 1e-6] = -1
    return cls


def test_train_transform_keeps_image_and_mask_aligned(tmp_path):
    _colour_tree(tmp_path)
    tf = SegTransforms(train=True, crop_size=40, scale_range=(0.5, 2.0), mean=None, std=None)
    ds = SegmentationFolder(tmp_path, "train", 5, False, transforms=tf, seed=3)
    flipped = padded = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape == (3, 40, 40) and target.shape == (40, 40)
            labelled = target != 255
            cls = _decode(image)
            agree = (cls[labelled] == target[labelled]).float().mean().item()
            assert agree > 0.9, (epoch, i, agree)  # bilinear blends only along block edges
            # the padding (image 0, mask ignore) is where the image is black
            assert torch.equal(~labelled, cls == -1)
            padded += int((~labelled).any())
            wrong = target.flip(-1)
            lab = wrong != 255
            flipped += (cls[lab] == wrong[lab]).float().mean().item() < 0.8
    assert padded > 0 and flipped > 0  # both paths were exercised and the check has teeth


def test_train_transform_without_scaling_is_exact_crop_and_flip(tmp_path):
    masks = _colour_tree(tmp_path)
    tf = SegTransforms(train=True, crop_size=16, scale_range=(1.0, 1.0), mean=None, std=None)
    ds = SegmentationFolder(tmp_path, "train", 5, False, transforms=tf)
    flips = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert torch.equal(_decode(image), target)  # every pixel, no blending
        # the crop is a window of the original mask, possibly flipped
        full = torch.as_tensor(masks[i]).long()
        windows = [full[t:t + 16, l:l + 16] for t in range(9) for l in range(17)]
        direct = any(torch.equal(target, win) for win in windows)
        mirror = any(torch.equal(target.flip(-1), win) for win in windows)
        assert direct or mirror
        flips += mirror and not direct
    assert 0 < flips < len(ds)  # (deterministic: seed 0, epoch 0)


def test_eval_transform_only_normalises(tmp_path):
    write_tree(tmp_path, "train", block_masks(1))
    plain = SegmentationFolder(tmp_path, "train", 4, False)
    tf = SegTransforms(train=False, crop_size=8)
    ds = SegmentationFolder(tmp_path, "train", 4, False, transforms=tf)
    (x0, y0), (x1, y1) = plain[0], ds[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.equal(y0, y1)
    assert torch.allclose(x1, (x0 - mean) / std)


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index(tmp_path):
    write_tree(tmp_path, "train", block_masks(4, 20, 20, block=2) * 2)  # items i and i+4 equal
    def make(seed):
        return SegmentationFolder(tmp_path, "train", 4, False, seed=seed,
                                  transforms=SegTransforms(True, 16, scale_range=(0.5, 1.5)))
    a, b = make(7), make(7)
    for ds in (a, b):
        ds.set_epoch(2)
    for i in range(len(a)):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # another epoch, another index with the same content, another seed: other draws
    x2, y2 = a[1]
    a.set_epoch(3)
    assert not torch.equal(a[1][0], x2)
    a.set_epoch(2)
    assert torch.equal(a[1][0], x2)  # going back to epoch 2 repeats it exactly
    assert not torch.equal(a[5][0], x2)
    assert not torch.equal(make(8).__getitem__(1)[0], make(7).__getitem__(1)[0])
    # the global RNG plays no part
    torch.manual_seed(123)
    assert torch.equal(a[1][0], x2)
    assert item_seed(7, 2, 1) == item_seed(7, 2, 1) != item_seed(7, 2, 5)


def test_loader_workers_see_the_same_items(tmp_path):
    write_tree(tmp_path, "train", block_masks(4, 20, 20, block=2))
    ds = SegmentationFolder(tmp_path, "train", 4, False, seed=1,
                            transforms=SegTransforms(True, 16))
    ds.set_epoch(4)
    inline = [ds[i][1] for i in range(4)]
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    workers = [t for _, y in loader for t in y]
    assert all(torch.equal(u, v) for u, v in zip(inline, workers))


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    target = torch.zeros(32, 32, dtype=torch.long)
    target[:, 24:] = 1  # only crops reaching the right edge are mixed enough
    image = torch.rand(3, 32, 32)
    tf = SegTransforms(True, 16, scale_range=(1.0, 1.0), flip=False, mean=None, std=None,
                       cat_max_ratio=0.75)
    shares = []
    for s in range(20):
        _, y = tf(image, target, torch.Generator().manual_seed(s))
        shares.append(float((y == 0).float().mean()))
    assert sum(share < 0.75 for share in shares) >= 15


def test_transform_arguments_are_checked():
    with pytest.raises(ValueError, match="crop_size"):
        SegTransforms(True, 0)
    with pytest.raises(ValueError, match="scale_range"):
        SegTransforms(True, 8, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="same size"):
        SegTransforms(True, 8)(torch.rand(3, 4, 4), torch.zeros(5, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Class statistics
# --------------------------------------------------------------------------------------------

def test_pixel_and_image_counts_read_only_the_annotations(tmp_path, monkeypatch):
    raw = [np.array([[0, 0, 1], [255, 1, 1]], np.uint8), np.array([[2, 255, 2]], np.uint8),
           np.array([[1, 0, 2], [1, 1, 1]], np.uint8)]
    rng = np.random.default_rng(0)
    write_tree(tmp_path, "train", raw,
               images=[rng.integers(0, 255, (*m.shape, 3), dtype=np.uint8) for m in raw])
    write_meta(tmp_path, ["background", "a", "b", "c"])
    ds = segmentation_folder_from_meta(tmp_path, "train",
                                       transforms=SegTransforms(True, 8))  # ignored here
    monkeypatch.setattr(SegmentationFolder, "load_image",
                        lambda self, i: pytest.fail("an image was decoded"))
    assert pixel_counts(ds).tolist() == [3, 7, 3, 0]
    assert image_counts(ds).tolist() == [2, 2, 2, 0]
    assert image_labels(ds) == [[0, 1], [2], [0, 1, 2]]
    assert ds.class_pixels().tolist() == [[2, 3, 0, 0], [0, 0, 2, 0], [1, 4, 1, 0]]
    # a Subset (of a Subset) uses its images only
    sub = Subset(Subset(ds, [2, 0]), [0])
    assert pixel_counts(sub).tolist() == [1, 4, 1, 0] and image_labels(sub) == [[0, 1, 2]]
    # the same from plain masks, and the labels feed repeat-factor sampling
    targets = [torch.as_tensor(m).long() for m in raw]
    assert pixel_counts(targets, 4, 255).tolist() == [3, 7, 3, 0]
    assert image_counts([(None, t) for t in targets], 4).tolist() == [2, 2, 2, 0]
    assert repeat_factors(image_labels(ds), 4, threshold=1.0).shape == (3,)
    with pytest.raises(ValueError, match="num_classes=5 differs"):
        pixel_counts(ds, num_classes=5)
    with pytest.raises(ValueError, match="num_classes is needed"):
        pixel_counts(targets)
    with pytest.raises(ValueError, match=r"labels \[7\] are outside"):
        pixel_counts([torch.tensor([[7]])], 4)


def test_reduce_zero_label_counts_use_the_mapped_labels(tmp_path):
    write_tree(tmp_path, "training", [np.array([[0, 1, 150, 150]], np.uint8)])
    ds = ade20k(tmp_path, "training")
    counts = pixel_counts(ds)
    assert counts.shape == (150,) and counts.sum() == 3
    assert counts[0] == 1 and counts[149] == 2
    assert image_labels(ds) == [[0, 149]]
