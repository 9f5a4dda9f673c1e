"""Training tasks built on the core: classification, detection and segmentation (one shared
training loop in ``engine``)."""
