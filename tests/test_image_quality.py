"""Noise in uniform regions and edge width at bone edges (medsr.image_quality) on a made phantom whose answers
are known: white noise of a stated std is measured as that std, only in uniform places, and a blurred bone edge
is measured wider while zero-mean noise leaves the width alone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsr.image_quality import edge_points, edge_width, noise_std, uniform_patches


def phantom(n: int = 128) -> np.ndarray:
    """Soft-tissue disk (40 HU) in air with a bone ring (1000 HU) and a fat insert (-100 HU), slightly blurred."""
    yy, xx = np.meshgrid(np.arange(n) - n / 2 + 0.5, np.arange(n) - n / 2 + 0.5, indexing="ij")
    r = np.hypot(yy, xx)
    img = np.where(r < 55, 40.0, -1000.0)
    img[(r > 40) & (r < 47)] = 1000.0
    img[np.hypot(yy - 10, xx + 12) < 9] = -100.0
    return ndimage.gaussian_filter(img, 0.5)


def test_noise_std_reads_the_added_noise_in_uniform_patches() -> None:
    truth = phantom()
    body = truth > -500
    patches = uniform_patches(truth, body, patch=8, fraction=0.1)
    assert len(patches) >= 4
    grad = np.hypot(*np.gradient(truth))
    for p in patches:  # uniform: far from the ring, the insert and the skin
        assert grad[p].max() < 1.0
    rng = np.random.default_rng(0)
    noisy = truth + rng.normal(0, 30.0, truth.shape)
    assert noise_std(noisy, patches) == pytest.approx(30.0, rel=0.1)
    assert noise_std(truth, patches) < 1.0
    smoothed = ndimage.gaussian_filter(noisy, 1.5)
    assert noise_std(smoothed, patches) < 0.3 * noise_std(noisy, patches)


def test_a_blurred_bone_edge_is_wider_and_noise_does_not_widen_it() -> None:
    truth = phantom()
    points, normals = edge_points(truth, bone=300.0)
    assert len(points) > 20
    # normals point into the bone (up the gradient)
    ahead = ndimage.map_coordinates(truth, (points + 2 * normals).T, order=1)
    behind = ndimage.map_coordinates(truth, (points - 2 * normals).T, order=1)
    assert (ahead > behind).all()
    w_truth = edge_width(truth, points, normals, pixel_mm=0.5)
    w_blur = edge_width(ndimage.gaussian_filter(truth, 1.5), points, normals, pixel_mm=0.5)
    noisy = truth + np.random.default_rng(1).normal(0, 60.0, truth.shape)
    w_noisy = edge_width(noisy, points, normals, pixel_mm=0.5)
    assert 0.2 < w_truth < 1.0  # a 0.5-pixel Gaussian edge: 10-90% about 1.3 pixel = 0.64 mm
    assert w_blur > 1.8 * w_truth
    assert w_noisy == pytest.approx(w_truth, rel=0.2)
    # no bone, no edge measure
    p0, n0 = edge_points(np.zeros((32, 32)), bone=300.0)
    assert len(p0) == 0 and np.isnan(edge_width(np.zeros((32, 32)), p0, n0))
