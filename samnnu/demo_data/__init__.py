"""Small real datasets shipped with samnnu for demos and tests (see each folder's README.md)."""
from __future__ import annotations

from pathlib import Path


def demo_dataset_path() -> Path:
    """Folder of the hippocampus demo data (``images/`` + ``labels/``, 24 cases, CC-BY-SA 4.0)."""
    return Path(__file__).resolve().parent / "hippocampus"


def demo_photos_path() -> Path:
    """Folder of the synthetic 2D RGB sample (``images/`` + ``masks/``, 20 JPEG photos and JPEG masks)."""
    return Path(__file__).resolve().parent / "photos"
