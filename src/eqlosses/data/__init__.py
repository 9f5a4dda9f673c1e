"""Data helpers. ``eqlosses.data.frequency`` depends on torch alone."""

from .frequency import (FrequencyGroups, class_counts, class_frequency, image_counts,
                        lvis_groups, many_medium_few_groups)

__all__ = ["FrequencyGroups", "class_counts", "class_frequency", "image_counts", "lvis_groups",
           "many_medium_few_groups"]
