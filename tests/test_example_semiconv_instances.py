"""docs/examples/semiconv_instances.py: a few training steps lower the semi-convolutional loss,
its voting recovers the squares exactly from an ideal embedding (and merges them from a constant
one), and its adjusted Rand index scores known cases."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "semiconv_instances.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("semiconv_instances", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_few_steps_lower_the_semiconvolutional_loss(example):
    _, losses = example.train(True, steps=30, batch=4)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_voting_recovers_the_squares_from_an_ideal_embedding(example):
    images, labels = example.make_images(np.random.default_rng(3), 2)
    ys, xs = torch.meshgrid(torch.arange(example.SIZE), torch.arange(example.SIZE), indexing="ij")
    ideal = torch.zeros(2, 2, example.SIZE, example.SIZE)
    for i in range(2):
        for k in range(1, example.COPIES + 1):
            inside = labels[i] == k
            ideal[i, 0][inside] = ys[inside].float().mean().round()
            ideal[i, 1][inside] = xs[inside].float().mean().round()
    foreground = labels > 0
    for i, predicted in enumerate(example.recover(ideal, foreground)):
        assert example.adjusted_rand_index(labels[i][foreground[i]].numpy(), predicted[foreground[i]].numpy()) == 1.0
    merged = example.recover(torch.full_like(ideal, 7.0), foreground)
    assert set(np.unique(merged[foreground].numpy())) == {1}


def test_adjusted_rand_index(example):
    truth = np.array([1, 1, 2, 2, 3, 3])
    assert example.adjusted_rand_index(truth, np.array([5, 5, 7, 7, 9, 9])) == 1.0
    assert example.adjusted_rand_index(truth, np.ones(6)) == 0.0
    # sklearn.metrics.adjusted_rand_score([1, 1, 2, 2, 3, 3], [1, 1, 1, 2, 2, 2]) = 0.24242424...
    assert abs(example.adjusted_rand_index(truth, np.array([1, 1, 1, 2, 2, 2])) - 8 / 33) < 1e-12
