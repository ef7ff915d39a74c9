"""A deterministic stand-in for the CURVES autoencoder data set.

The original CURVES set (``digs3pts_1.mat``, made by Ruslan Salakhutdinov for Hinton &
Salakhutdinov, Science 2006) holds 28x28 grey images of smooth curves through three random
points: 20,000 train and 10,000 test images. It is not redistributable here, so this module draws
images of the same kind: pick three points uniformly in the image (the 6 numbers the CURVES
autoencoder's 6-unit code layer is meant to recover), draw the quadratic curve through them
(parameter t = 0, 1/2, 1 at the three points), and ink every pixel by a Gaussian of its distance
to the curve (width about two pixels), so values lie in [0, 1] with a black background.

The generated set plays the same role (a low-dimensional manifold of images, hard for first-order
methods) but is not the original data: numbers measured on it are not comparable with published
CURVES numbers. Use :func:`mbf_bench.data.load_curves_mat` when the original file is available.
"""

from __future__ import annotations

import numpy as np
import torch

from .split import Split

SIDE = 28
#: Points are drawn at least this many pixels from the border.
MARGIN = 2.0
#: Standard deviation (pixels) of the ink profile across the stroke.
STROKE_SIGMA = 0.8
#: Samples along the curve (midpoint rule in t). The Gaussian sum is smooth while the spacing
#: (at most about 1.2 pixels, on the longest curves) stays near STROKE_SIGMA: ripple < 0.1%.
SAMPLES = 64
_CHUNK = 1024


def curve_points(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` triples of points, shape (n, 3, 2), in pixel coordinates (x=column, y=row).

    Each triple is ordered so that the two points farthest apart are the ends of the curve: the
    curve then bends through the third point instead of folding back on itself.
    """
    pts = rng.uniform(MARGIN, SIDE - 1 - MARGIN, size=(n, 3, 2))
    # The point opposite the longest side of the triangle goes in the middle.
    sides = np.stack(
        [np.linalg.norm(pts[:, (i + 1) % 3] - pts[:, (i + 2) % 3], axis=-1) for i in range(3)],
        axis=1,
    )
    middle = sides.argmax(axis=1)
    order = np.stack([(middle + 1) % 3, middle, (middle + 2) % 3], axis=1)
    return np.take_along_axis(pts, order[:, :, None], axis=1)


def _quadratic(points: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and speeds |c'(t)| of the quadratic through ``points`` (n, 3, 2) at ``t``.

    The middle point gets the chord-length parameter t1 = |p1 - p0| / (|p1 - p0| + |p2 - p1|),
    which keeps the curve from overshooting; the ends get t = 0 and t = 1.
    """
    a = np.linalg.norm(points[:, 1] - points[:, 0], axis=-1)
    b = np.linalg.norm(points[:, 2] - points[:, 1], axis=-1)
    t1 = np.clip(a / np.maximum(a + b, 1e-12), 0.05, 0.95)[:, None]  # (n, 1)
    tt = t[None, :]  # (1, M)
    # Lagrange basis with nodes 0, t1, 1 and its derivative, each (n, M).
    basis = [(tt - t1) * (tt - 1) / t1, tt * (tt - 1) / (t1 * (t1 - 1)), tt * (tt - t1) / (1 - t1)]
    slope = [(2 * tt - t1 - 1) / t1, (2 * tt - 1) / (t1 * (t1 - 1)), (2 * tt - t1) / (1 - t1)]
    pos = np.einsum("knm,nkd->nmd", np.stack(basis), points)
    vel = np.einsum("knm,nkd->nmd", np.stack(slope), points)
    return pos, np.linalg.norm(vel, axis=-1)


def render_curves(points: np.ndarray) -> torch.Tensor:
    """Images (n, 784) float32 in [0, 1] of the curves through ``points`` (n, 3, 2).

    The ink of a pixel is the line integral along the curve of a 2-D Gaussian (sigma
    ``STROKE_SIGMA``) centred on the pixel, divided by sqrt(2 pi) sigma: exactly
    exp(-d^2 / 2 sigma^2) at distance d from a straight stroke, 1 on the stroke. Because the
    Gaussian is separable, the integral over the M samples is one batched matrix product
    (n, 28, M) @ (n, M, 28), which makes 30,000 images take about a second.
    """
    t = (np.arange(SAMPLES) + 0.5) / SAMPLES
    pos, speed = _quadratic(points, t)
    weight = torch.from_numpy(speed / (SAMPLES * np.sqrt(2 * np.pi) * STROKE_SIGMA)).float()
    pos_t = torch.from_numpy(pos).float()
    grid = torch.arange(SIDE, dtype=torch.float32)
    out = torch.empty(len(points), SIDE * SIDE)
    for lo in range(0, len(points), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        gx = torch.exp((grid - pos_t[sl, :, 0, None]).square() * (-0.5 / STROKE_SIGMA**2))
        gy = torch.exp((grid - pos_t[sl, :, 1, None]).square() * (-0.5 / STROKE_SIGMA**2))
        image = torch.bmm((gy * weight[sl, :, None]).transpose(1, 2), gx)  # (b, rows, cols)
        out[sl] = image.reshape(len(image), -1).clamp_(0.0, 1.0)
    return out


def make_curves(n_train: int = 20000, n_test: int = 10000, seed: int = 0) -> Split:
    """Generated CURVES stand-in: x float32 (N, 784) in [0, 1], no labels.

    The train and test sets come from independent streams ``default_rng([seed, 0])`` and
    ``default_rng([seed, 1])``, so the test set does not change with ``n_train``, and the same
    arguments give the same images on every machine.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"make_curves: n_train={n_train} and n_test={n_test} must be >= 0")
    x_train = render_curves(curve_points(n_train, np.random.default_rng([seed, 0])))
    x_test = render_curves(curve_points(n_test, np.random.default_rng([seed, 1])))
    return Split(x_train=x_train, y_train=None, x_test=x_test, y_test=None, num_classes=None)
