"""The figure scripts of docs/: each draws a small PNG, and the committed one is small too; and
docs/roi_sampling.py's positions are where pydeform samples (the other scripts have their own
test files)."""

import subprocess
import sys

import numpy as np
import pytest

import pydeform
from tests.docs_figures import DOCS, SCRIPTS, load_script

PNG_LIMIT_BYTES = 300_000


def test_the_figure_scripts_are_found():
    assert {"roi_sampling", "deform_conv_sampling", "centernet_decode"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_draws_a_small_png(tmp_path, name):
    pytest.importorskip("matplotlib")
    path = tmp_path / f"{name}.png"
    result = subprocess.run([sys.executable, str(DOCS / f"{name}.py"), str(path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < PNG_LIMIT_BYTES


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_png_is_small(name):
    assert (DOCS / f"{name}.png").stat().st_size < PNG_LIMIT_BYTES


@pytest.fixture(scope="module")
def figure():
    return load_script("roi_sampling")


def coordinate_images(figure):
    """[1, 4, H, W]: x, y, -x, -y at each pixel. On these images (bilinear sampling is exact on
    affine images inside the map) an average gives the mean sample position of a bin and a max
    its last (channels x, y) or, negated, first (channels -x, -y) sample position."""
    rows, columns = np.mgrid[: figure.MAP_HEIGHT, : figure.MAP_WIDTH].astype(np.float64)
    return np.stack([columns, rows, -columns, -rows])[None]


def one_roi(figure):
    return np.array([[0.0, *figure.BOX]])


def positions_inside(figure, y, x):
    return y.min() >= 0 and x.min() >= 0 and y.max() <= figure.MAP_HEIGHT - 1 and x.max() <= figure.MAP_WIDTH - 1


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_roi_align_samples_are_pydeforms(figure, sampling_ratio):
    y, x = figure.roi_align_samples(sampling_ratio)  # [PH, gh], [PW, gw]
    assert positions_inside(figure, y, x)
    options = dict(output_size=figure.POOLED, spatial_scale=figure.SPATIAL_SCALE, sampling_ratio=sampling_ratio,
                   aligned=True)
    average = pydeform.roi_align(coordinate_images(figure), one_roi(figure), **options)[0]
    largest = pydeform.roi_align(coordinate_images(figure), one_roi(figure), mode="max", **options)[0]
    grid = np.ones((figure.POOLED, figure.POOLED))
    np.testing.assert_allclose(average[0], grid * x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(average[1], grid * y.mean(axis=1)[:, None], rtol=1e-12)
    np.testing.assert_allclose(largest[:2], [grid * x[:, -1], grid * y[:, -1, None]], rtol=1e-12)
    np.testing.assert_allclose(largest[2:], [grid * -x[:, 0], grid * -y[:, 0, None]], rtol=1e-12)


def test_deform_roi_pool_samples_are_pydeforms(figure):
    y, x = figure.deform_roi_pool_samples(2)  # [PH, PW, gh, gw]
    assert positions_inside(figure, y, x)
    average = pydeform.deform_roi_pool(
        coordinate_images(figure), one_roi(figure), figure.OFFSET[None], output_size=figure.POOLED,
        spatial_scale=figure.SPATIAL_SCALE, sampling_ratio=2, gamma=figure.GAMMA,
    )[0]
    np.testing.assert_allclose(average[:2], [x.mean(axis=(2, 3)), y.mean(axis=(2, 3))], rtol=1e-12)


def test_roi_pool_bins_are_pydeforms(figure):
    """On the ramp W*y + x a bin's max is its last pixel; on its negation, its first."""
    (rows, columns), _ = figure.roi_pool_bins()
    ramp = figure.MAP_WIDTH * np.arange(figure.MAP_HEIGHT)[:, None] + np.arange(figure.MAP_WIDTH)
    images = np.stack([ramp, -ramp]).astype(np.float64)[None]
    pooled = pydeform.roi_pool(images, one_roi(figure), figure.POOLED, figure.SPATIAL_SCALE)[0]
    first = [[figure.MAP_WIDTH * h0 + w0 for w0, _ in columns] for h0, _ in rows]
    last = [[figure.MAP_WIDTH * (h1 - 1) + w1 - 1 for _, w1 in columns] for _, h1 in rows]
    np.testing.assert_array_equal(pooled[0], last)
    np.testing.assert_array_equal(pooled[1], -np.array(first))
