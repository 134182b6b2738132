"""Fixtures for medsr.io tests: a real CT block and a multi-file CT series written from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from iodata import load_cranium_crop, write_ct_series


@pytest.fixture(scope="session")
def ct_crop() -> np.ndarray:
    """A real head-CT block in HU, ``(Z, rows, cols)`` int16."""
    return load_cranium_crop()


@pytest.fixture
def ct_series(tmp_path: Path, ct_crop: np.ndarray) -> tuple[Path, list[Path], np.ndarray, np.ndarray]:
    """(folder, paths in Z order, expected array (1, X, Y, Z) in HU, expected RAS affine)."""
    folder = tmp_path / "series"
    paths, affine = write_ct_series(folder, ct_crop)
    expected = np.transpose(ct_crop, (2, 1, 0))[None].astype(np.float32)
    return folder, paths, expected, affine
