"""pipelines.error_bands: splitting an error into what an x4 input's band carries and what lies above it."""

from __future__ import annotations

import numpy as np
import torch
from enhance_fixtures import ct_small

from medsr.degrade import parse_spec, upsample
from medsr.io.refs import load_ref
from medsr.through_plane import cubic_along
from pipelines.error_bands import axis_band_errors, band_errors


def test_the_two_bands_add_up_and_separate_in_band_from_above_band_errors() -> None:
    scan = ct_small()
    truth = scan.array[0, :64, :96, :1].astype(np.float64) / 1000.0  # real CT, non-square
    yy, xx = np.indices(truth.shape[:2])
    fine = 0.05 * np.cos(2 * np.pi * 30 / 96 * xx)[..., None]  # 0.31 cycles/voxel: above an x4 input's 0.125
    coarse = 0.05 * np.cos(2 * np.pi * 4 / 64 * yy)[..., None]  # 0.06 cycles/voxel: inside it (whole periods)
    inside, above = band_errors(truth, truth + fine)
    assert above > 0 and inside < 1e-3 * above
    inside, above = band_errors(truth, truth + coarse)
    assert inside > 0 and above < 1e-3 * inside
    spec = parse_spec("block:4x4")
    bicubic = upsample(spec.forward(torch.from_numpy(truth).float().movedim(-1, 0)[:, None]), spec.factors)
    pred = bicubic[:, 0].movedim(0, -1).double().numpy()
    inside, above = band_errors(truth, pred)
    np.testing.assert_allclose(inside + above, ((pred - truth) ** 2).sum(), rtol=1e-9)  # Parseval
    assert above > inside  # bicubic's error on a real CT slice is mostly detail the input cannot carry


def test_through_plane_bands_split_along_the_thick_axis_only() -> None:
    truth = load_ref("nibabel:anatomical.nii", "MR").array[0, :, :, :24].astype(np.float64) / 100.0  # real T1
    z = np.arange(truth.shape[2])[None, None, :]
    x = np.arange(truth.shape[0])[:, None, None]
    fine_z = 0.05 * np.cos(2 * np.pi * 8 / 24 * z)  # 0.33 cycles per slice: above a 4x thick input's 0.125
    coarse_z = 0.05 * np.cos(2 * np.pi * 2 / 24 * z)  # 0.08: inside it
    fine_x = 0.05 * np.cos(2 * np.pi * 13 / 33 * x)  # fine in-plane detail (whole periods), constant along z
    inside, above = axis_band_errors(truth, truth + fine_z, axis=2)
    assert above > 0 and inside < 1e-3 * above
    inside, above = axis_band_errors(truth, truth + coarse_z + fine_x, axis=2)
    assert inside > 0 and above < 1e-3 * inside
    inside, above = axis_band_errors(truth, truth + fine_x, axis=0)  # the same detail along the thick axis
    assert above > 0 and inside < 1e-3 * above
    cubic = cubic_along(truth.reshape(*truth.shape[:2], 6, 4).mean(-1), 2, 4)  # made 4x thick, cubic back
    inside, above = axis_band_errors(truth, cubic, axis=2)
    np.testing.assert_allclose(inside + above, ((cubic - truth) ** 2).sum(), rtol=1e-9)  # Parseval
    assert above > inside
