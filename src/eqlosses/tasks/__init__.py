"""Training tasks built on the core: classification (detection and segmentation to come)."""
