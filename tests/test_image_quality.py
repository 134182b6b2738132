"""Noise in uniform regions and edge width at bone edges (medsr.image_quality) on a made phantom whose answers
are known: white noise of a stated std is measured as that std, only in uniform places, and a blurred bone edge
is measured wider while zero-mean noise leaves the width alone; a real CT slice and the same slice made
piecewise constant are told apart by their grey levels; a blurred edge's error lies on the edge region."""

from __future__ import annotations

import numpy as np
import pytest
from enhance_fixtures import ct_small
from scipy import ndimage

from medsr.image_quality import (
    edge_error_share,
    edge_points,
    edge_region,
    edge_width,
    grey_levels,
    noise_std,
    uniform_patches,
)


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


def test_grey_levels_tell_an_acquisition_from_a_piecewise_constant_image() -> None:
    hu = ct_small().array[0, :, :, 0].astype(np.float64)  # a real CT slice: its own noise
    levels, equal = grey_levels(hu)
    assert levels > 500 and equal < 0.2
    flat = np.round(ndimage.median_filter(hu, 7) / 100.0) * 100.0  # the same anatomy, piecewise constant
    levels, equal = grey_levels(flat)
    assert levels < 40 and equal > 0.8
    mask = np.zeros(hu.shape, bool)
    mask[:, :10] = True
    assert grey_levels(hu, mask)[0] == np.unique(hu[:, :10]).size  # only inside the mask


def test_edge_error_share_puts_a_blurred_edge_on_the_edge_region() -> None:
    truth = np.zeros((64, 64))
    truth[:, 32:] = 1.0
    region = edge_region(truth)
    assert region[:, 30:34].all() and not region[:, :28].any() and not region[:, 37:].any()
    blurred = ndimage.gaussian_filter(truth, 1.5)
    assert edge_error_share(blurred, truth, region) > 0.99
    rng = np.random.default_rng(0)
    noisy = truth + rng.normal(0, 0.1, truth.shape)
    assert abs(edge_error_share(noisy, truth, region) - region.mean()) < 0.03  # white noise: the region's share
