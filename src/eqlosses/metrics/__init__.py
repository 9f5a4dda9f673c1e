"""Evaluation metrics for long-tailed recognition (torch only)."""

from .classification import ClassificationMetrics

__all__ = ["ClassificationMetrics"]
