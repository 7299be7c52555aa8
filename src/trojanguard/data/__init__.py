"""Datasets: the embedded offline default (scikit-learn digits), an out-of-distribution unlabeled
sources (crops of scikit-learn's sample photos, procedural images), and user data (image folders, ``.npz`` arrays).

Every dataset is an :class:`ImageDataset`: images ``(N, C, H, W)`` float32 in [0, 1] plus optional
integer labels ``(N,)``.
"""

from trojanguard.data.core import ImageDataset, check_images
from trojanguard.data.digits import load_digits
from trojanguard.data.ood import OOD_SOURCES, load_ood_crops, load_ood_source, load_procedural
from trojanguard.data.user import load_image_folder, load_image_path, load_npz

__all__ = [
           "OOD_SOURCES",
           "ImageDataset",
           "check_images",
           "load_digits",
           "load_image_folder",
           "load_image_path",
           "load_npz",
           "load_ood_crops",
           "load_ood_source",
           "load_procedural",
]
