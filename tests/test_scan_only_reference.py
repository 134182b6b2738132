"""pipelines.scan_only_reference: SMORE-style pairs from a thick scan's own in-plane images, and what they teach."""

from __future__ import annotations

import numpy as np
import torch

from medsr.degrade import parse_spec
from medsr.evaluate import degrade_scan
from medsr.io.refs import load_ref
from medsr.through_plane import cubic_along
from pipelines.scan_only_reference import fit_on_pairs, inplane_pairs, psnr, upsample_planes


def test_pairs_degrade_the_in_plane_images_like_the_thick_axis() -> None:
    deg = degrade_scan(load_ref("nibabel:anatomical.nii", "MR"), "block:1x1x4")  # real T1 made 4x thick along z
    pairs = inplane_pairs(deg.low_norm, 2, 4)
    assert len(pairs) == 8  # 2 transposes x 4 flips
    first_in, first_truth = pairs[0]
    np.testing.assert_array_equal(first_truth, np.moveaxis(deg.low_norm, 2, 0)[:, :32])  # 33 rows -> 32
    spec = parse_spec("block:4x1")  # medsr's own operator, along the planes' first axis
    coarse = spec.forward(torch.from_numpy(first_truth)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(first_in, cubic_along(coarse, 1, 4), atol=1e-6)
    transposed_truth = pairs[4][1]
    assert transposed_truth.shape == (6, 40, 33)  # the other in-plane axis degraded


def test_a_fit_on_the_scan_alone_learns_and_keeps_the_grid() -> None:
    deg = degrade_scan(load_ref("nibabel:anatomical.nii", "MR"), "block:1x1x4")
    pairs = inplane_pairs(deg.low_norm, 2, 4)
    net, losses = fit_on_pairs(pairs, iterations=60)
    cubic_loss = float(np.mean([np.mean((x - y) ** 2) for x, y in pairs]))
    assert losses[-1] < cubic_loss  # better than cubic on the scan's own pairs
    one, two = upsample_planes(net, deg.low_norm, 2, 4)
    assert one.shape == two.shape == deg.truth_norm.shape
    assert np.isfinite(psnr(0.5 * (one + two), deg.truth_norm))
