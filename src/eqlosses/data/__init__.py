"""Data helpers for long-tailed recognition; torch and numpy only at import time.

- ``frequency``: class counts, frequencies and frequency groups (LVIS, many/medium/few);
- ``longtail``: CIFAR-LT exponential class profiles and long-tailed subsets;
- ``idx``: IDX files and the Fashion-MNIST files on disk;
- ``embedded``: the long-tailed Fashion-MNIST subset shipped with the package;
- ``datasets``: array, list-file (ImageNet-LT style) and folder image datasets (PIL and
  torchvision are imported only when an image is loaded or a folder is opened);
- ``samplers``: instance / class-balanced / square-root / repeat-factor sampling;
- ``canvas``: the generated detection / segmentation benchmark (Fashion-MNIST items);
- ``lvis``: LVIS / COCO annotation files and a detection dataset;
- ``segmentation``: ADE20K-layout segmentation folders and paired transforms.
"""

from .datasets import ArrayImageDataset, ImageListDataset, image_folder, pil_to_tensor
from .embedded import embedded_info, load_embedded
from .frequency import (FrequencyGroups, class_counts, class_frequency, image_counts,
                        lvis_groups, many_medium_few_groups)
from .idx import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist, read_idx
from .longtail import longtail_counts, longtail_indices
from .samplers import SAMPLING_MODES, LongTailSampler, repeat_factors
from .canvas import make_detection, make_segmentation
from .lvis import LVISDetection, collate_detection, load_annotations
from .segmentation import (SegmentationFolder, SegTransforms, ade20k, item_seed, pixel_counts,
                           segmentation_folder_from_meta)

__all__ = ["ArrayImageDataset", "FASHION_MNIST_CLASSES", "FrequencyGroups", "ImageListDataset",
           "LongTailSampler", "SAMPLING_MODES", "class_counts", "class_frequency",
           "embedded_info", "find_fashion_mnist", "image_counts", "image_folder",
           "load_embedded", "load_fashion_mnist", "longtail_counts", "longtail_indices",
           "lvis_groups", "many_medium_few_groups", "pil_to_tensor", "read_idx",
           "repeat_factors", "make_detection", "make_segmentation", "LVISDetection",
           "collate_detection", "load_annotations", "SegmentationFolder", "SegTransforms",
           "ade20k", "item_seed", "pixel_counts", "segmentation_folder_from_meta"]
