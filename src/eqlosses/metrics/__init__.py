"""Evaluation metrics for long-tailed recognition (torch only; LVIS AP imports
faster-coco-eval when it is used)."""

from .classification import ClassificationMetrics
from .confusion import ConfusionMatrixState
from .detection import LVISEvaluator
from .segmentation import SegmentationMetrics

__all__ = ["ClassificationMetrics", "ConfusionMatrixState", "LVISEvaluator",
           "SegmentationMetrics"]
