"""Look at rendered pages the way a reader would: their text, and whether they show anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from matplotlib.image import imread
from pypdf import PdfReader

__all__ = ["page_texts", "pixel_std", "rasterise"]


def page_texts(pdf: Path) -> list[str]:
    """The extracted text of every page, whitespace collapsed."""
    return [" ".join((page.extract_text() or "").split()) for page in PdfReader(pdf).pages]


def rasterise(pdf: Path, out_dir: Path, dpi: int = 30) -> list[Path]:
    """Turn every page into a PNG with pdftoppm (as a person's viewer would)."""
    if shutil.which("pdftoppm") is None:  # pragma: no cover - make test installs it
        msg = "pdftoppm is not installed: run `make test`, which installs poppler-utils"
        raise RuntimeError(msg)
    subprocess.run(
        ["pdftoppm", "-png", "-r", str(dpi), str(pdf), str(out_dir / "page")],
        check=True,
        capture_output=True,
    )
    return sorted(out_dir.glob("page-*.png"))


def pixel_std(png: Path) -> float:
    """Standard deviation of the greyscale pixel values in [0, 1]; ~0 for a blank page."""
    image = imread(png)
    grey = image[..., :3].mean(axis=-1) if image.ndim == 3 else image
    return float(np.std(grey))
