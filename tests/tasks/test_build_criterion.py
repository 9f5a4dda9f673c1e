"""Each task builds its loss through the contract, with its own training statistics (no data
needed: these are the quick checks of what the pipeline tests exercise end to end)."""

import pytest
import torch

from eqlosses.config import LossConfig
from eqlosses.tasks import classification, segmentation

counts = torch.tensor([500, 60, 8, 2])


def test_classification_fills_counts_and_image_frequencies():
    bal = classification.build_criterion(LossConfig("balanced_softmax"), 4, counts)
    torch.testing.assert_close(bal.adjustment.exp(), (counts / counts.sum()).float())
    eql = classification.build_criterion(LossConfig("eql", {"lambda_": 0.01}), 4, counts)
    torch.testing.assert_close(eql.class_frequency, (counts / 570).float())  # one label/image
    assert classification.build_criterion(LossConfig("sigmoid_eql"), 4, counts).num_channels == 4
    g = torch.Generator()
    assert classification.build_criterion(LossConfig("federated"), 4, counts, g).generator is g


def test_detection_fills_image_counts_over_the_number_of_images():
    detection = pytest.importorskip("eqlosses.tasks.detection")
    eql = detection.build_criterion(LossConfig("eql"), "faster_rcnn", 4, counts, 1000)
    torch.testing.assert_close(eql.class_frequency, (counts / 1000).float())
    fed = detection.build_criterion(LossConfig("federated", {"power": 1.0}), "mask_rcnn", 4,
                                    counts, 1000)
    torch.testing.assert_close(fed.sampling_weight, counts.float())
    assert detection.build_criterion(LossConfig("ce"), "faster_rcnn", 4, counts, 9).background
    assert detection.build_criterion(LossConfig("bce"), "fcos", 4, counts, 9).reduction == "sum"


def test_segmentation_fills_pixel_counts_and_the_ignore_label():
    bal = segmentation.build_criterion(LossConfig("balanced_softmax"), 4, counts * 100, 255)
    torch.testing.assert_close(bal.adjustment.exp(), (counts / counts.sum()).float())
    assert bal.ignore_index == 255
    same = LossConfig("softmax_eql", {"ignore_index": 255})
    assert segmentation.build_criterion(same, 4, counts, 255).ignore_index == 255
    with pytest.raises(ValueError, match="loss.ignore_index=0 differs from the data's ignore "
                                         "label data.ignore_index=255"):
        segmentation.build_criterion(LossConfig("ce", {"ignore_index": 0}), 4, counts, 255)
