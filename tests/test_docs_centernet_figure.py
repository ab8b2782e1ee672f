"""docs/centernet_decode.py: the detections it draws are pydeform's (tests/test_docs_figures.py
draws the figure)."""

import numpy as np
import pytest

import pydeform
from tests.docs_figures import load_script


@pytest.fixture(scope="module")
def figure():
    return load_script("centernet_decode")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_drawn_detections_are_pydeforms(figure, dtype):
    heat, wh, reg = (a.astype(dtype) for a in figure.scene())
    drawn = figure.decode(heat, wh, reg)
    decoded = pydeform.centernet_decode(heat, wh, reg, figure.K, kernel=figure.WINDOW, threshold=figure.THRESHOLD)
    np.testing.assert_array_equal(decoded[..., 5], drawn[..., 5])  # classes, -1 below the threshold
    np.testing.assert_allclose(decoded[..., :5], drawn[..., :5], rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_the_objects_come_first_with_their_boxes(figure):
    """The scene's objects are the best peaks, decoded to their own boxes; the rest of the K
    detections are noise peaks below the threshold (the figure's dotted boxes)."""
    drawn = figure.decode(*figure.scene())[0]
    objects = sorted(figure.OBJECTS, key=lambda o: -o[5])
    for (cls, x, y, w, h, score), detection in zip(objects, drawn):
        np.testing.assert_allclose(detection, [x - w / 2, y - h / 2, x + w / 2, y + h / 2, score, cls], atol=1e-12)
    below = drawn[len(objects):]
    assert len(below) and np.all(below[:, 4] == 0) and np.all(below[:, 5] == -1)


def test_peaks_keep_window_maxima_only(figure):
    heat = np.array([[[[0.1, 0.5, 0.5], [0.2, 0.3, 0.9], [0.4, 0.1, 0.0]]]])
    expected = np.array([[[[0.0, 0.0, 0.0], [0.0, 0.0, 0.9], [0.4, 0.0, 0.0]]]])
    np.testing.assert_array_equal(figure.peaks(heat), expected)
