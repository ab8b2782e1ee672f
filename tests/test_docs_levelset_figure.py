"""docs/levelset_snakes.py: the contours it draws are pydeform's level sets at the iterations it
names, and the snakes end where the figure says (tests/test_docs_figures.py draws the figure)."""

import numpy as np
import pytest
from scipy import ndimage

from tests.docs_figures import load_script


@pytest.fixture(scope="module")
def figure():
    return load_script("levelset_snakes")


def test_the_snapshots_are_the_runs_at_the_drawn_iterations(figure):
    pytest.importorskip("skimage")
    image, final, snapshots = figure.camera_acwe()
    assert sorted(snapshots) == list(figure.ACWE_DRAWN) and figure.ACWE_DRAWN[-1] == figure.ACWE_ITERATIONS
    np.testing.assert_array_equal(snapshots[0], figure.pydeform.checkerboard_level_set(image.shape, 6))
    np.testing.assert_array_equal(snapshots[figure.ACWE_ITERATIONS], final)
    # MorphACWE splits camera into a dark and a bright region.
    assert abs(image[final == 1].mean() - image[final == 0].mean()) > 50


def test_the_coins_snake_shrinks_onto_the_coins(figure):
    pytest.importorskip("skimage")
    image, final, snapshots = figure.coins_gac()
    assert sorted(snapshots) == list(figure.GAC_DRAWN)
    np.testing.assert_array_equal(snapshots[figure.GAC_ITERATIONS], final)
    areas = [int(snapshots[i].sum()) for i in figure.GAC_DRAWN]
    assert areas == sorted(areas, reverse=True) and areas[-1] < areas[0] / 2
    # What is left is brighter than what the balloon pushed out: the coins.
    assert image[final == 1].mean() > image[(snapshots[0] == 1) & (final == 0)].mean() + 30


def test_the_volume_snake_finds_both_balls(figure):
    volume, truth = figure.two_balls()
    final, snapshots = figure.volume_acwe(volume)
    assert sorted(snapshots) == list(figure.VOLUME_DRAWN)
    np.testing.assert_array_equal(snapshots[figure.VOLUME_ITERATIONS], final)
    labels, count = ndimage.label(final)
    assert count == len(figure.BALLS)
    for centre, _ in figure.BALLS:
        found = labels == labels[centre]
        ball = ndimage.label(truth)[0] == ndimage.label(truth)[0][centre]
        assert (found & ball).sum() / (found | ball).sum() > 0.9
