"""docs/semiconv_embedding.py: the instances it draws are recovered exactly by pydeform's voting
ops from the ideal displacement field (tests/test_docs_figures.py draws the figure)."""

import numpy as np

from tests.docs_figures import load_script


def test_voting_recovers_the_drawn_squares():
    figure = load_script("semiconv_embedding")
    truth, phi = figure.scene()
    votes, peaks, labels = figure.recover(phi, truth)
    assert sorted(votes[votes > 0].tolist()) == [figure.SIDE**2] * len(figure.SQUARES)
    mapping = {int(t): int(p) for t, p in zip(truth.ravel(), labels.ravel())}
    assert mapping[0] == 0 and sorted(mapping.values()) == list(range(len(figure.SQUARES) + 1))
    np.testing.assert_array_equal(labels, np.vectorize(mapping.get)(truth))
