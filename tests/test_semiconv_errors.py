"""Bad arguments to the semi-convolutional ops raise a clear error naming the argument."""

import numpy as np
import pytest

import pydeform

PSI = np.zeros((2, 3, 4, 5), np.float32)
LABELS = np.ones((2, 4, 5), np.int64)
FOREGROUND = np.ones((2, 4, 5), bool)
CENTERS = np.zeros((2, 2, 3), np.float32)


@pytest.mark.parametrize("call, error, message", [
    (lambda: pydeform.instance_mean_loss(PSI, LABELS * 3, 2), ValueError, r"labels: expected values in \[0, 2\]"),
    (lambda: pydeform.instance_mean_loss(PSI, -LABELS, 2), ValueError, r"labels: .*got values in \[-1, -1\]"),
    (lambda: pydeform.instance_means(PSI, -LABELS.astype(np.int8), 2), ValueError, r"got values in \[-1, -1\]"),
    (lambda: pydeform.instance_means(PSI, (LABELS * 3).astype(np.uint16), 2), ValueError, r"got values in \[3, 3\]"),
    (lambda: pydeform.instance_means(PSI, LABELS.astype(np.float32), 2), TypeError,
     "labels: expected an integer dtype"),
    (lambda: pydeform.instance_mean_loss(PSI, LABELS[:, :3], 2), ValueError, r"labels: expected shape \(2, 4, 5\)"),
    (lambda: pydeform.instance_mean_loss(PSI, LABELS, 0), ValueError, "num_instances: expected an int >= 1"),
    (lambda: pydeform.instance_mean_loss(PSI, LABELS, 2, "avg"), ValueError, "reduction: expected one of"),
    (lambda: pydeform.instance_mean_loss(PSI[:, :1], LABELS, 2, coordinates=True), ValueError,
     "psi: coordinates=True needs D >= 2"),
    (lambda: pydeform.semiconv_embed(PSI[:, :1]), ValueError, "phi: coordinates=True needs D >= 2"),
    (lambda: pydeform.instance_mean_loss(PSI, LABELS, 2, spacing=(1.0, np.inf)), ValueError,
     "spacing: expected a finite number"),
    (lambda: pydeform.instance_mean_loss_backward(np.ones(3, np.float32), PSI, LABELS, 2), ValueError,
     r"grad_output: expected shape \(\)"),
    (lambda: pydeform.instance_mean_loss_backward(1.0, PSI, LABELS, 2, statistics=(None,) * 3), TypeError,
     "statistics: expected the InstanceLossStatistics"),
    (lambda: pydeform.instance_mean_loss_backward(1.0, PSI, LABELS, 3, statistics=pydeform.instance_mean_loss(
        PSI, LABELS, 2, return_statistics=True)[1]), ValueError, r"statistics.means: expected shape \(2, 3, 3\)"),
    (lambda: pydeform.affinity(PSI, CENTERS, 0.0), ValueError, "sigma: expected a number > 0"),
    (lambda: pydeform.affinity(PSI, CENTERS, -np.ones((2, 2), np.float32)), ValueError, "sigma: expected values > 0"),
    (lambda: pydeform.affinity(PSI, CENTERS, np.ones((2, 3), np.float32)), ValueError, r"sigma: expected shape"),
    (lambda: pydeform.affinity(PSI, CENTERS, np.ones((2, 2))), TypeError, "sigma: expected dtype float32"),
    (lambda: pydeform.affinity(PSI, CENTERS[:, :, :2], 1.0), ValueError, r"centers: expected shape \[2, K, 3\]"),
    (lambda: pydeform.affinity(PSI, CENTERS, 1.0, "cauchy"), ValueError, "kernel: expected one of"),
    (lambda: pydeform.seeded_mask_logits(np.zeros((2, 4, 4), np.float32), PSI, 1.0), ValueError,
     r"scores: expected shape \(2, 4, 5\)"),
    (lambda: pydeform.seeded_mask_logits(np.zeros((2, 4, 5), np.float32), PSI, 1.0, "max"), ValueError,
     "mode: expected one of"),
    (lambda: pydeform.seeded_mask_logits(np.zeros((2, 4, 5), np.float32), PSI, np.ones(2, np.float32) * np.nan),
     ValueError, "sigma: expected values > 0"),
    (lambda: pydeform.hough_votes(PSI, FOREGROUND.astype(np.uint8)), TypeError, "foreground: expected dtype bool"),
    (lambda: pydeform.hough_votes(PSI[:, :1], FOREGROUND), ValueError, "psi: expected D >= 2"),
    (lambda: pydeform.hough_votes(PSI, FOREGROUND, (0, 3)), ValueError, "shape: expected positive values"),
    (lambda: pydeform.hough_peaks(np.zeros((2, 4, 5), np.int64), 3), TypeError, "votes: expected dtype int32"),
    (lambda: pydeform.hough_peaks(np.zeros((2, 4, 5), np.int32), 3, min_votes=0), ValueError,
     "min_votes: expected an int >= 1"),
    (lambda: pydeform.assign_to_centers(PSI, FOREGROUND, CENTERS, -1.0), ValueError, "max_distance: expected"),
    (lambda: pydeform.assign_to_centers(PSI, FOREGROUND[:1], CENTERS), ValueError, r"foreground: expected shape"),
    (lambda: pydeform.instance_mean_loss(PSI, LABELS, 2, backend="cupy"), ValueError, "backend: 'cupy' runs on CuPy"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_unchecked_values_skip_the_label_check_and_ignore_out_of_range_labels():
    labels = LABELS.copy()
    labels[0, 0, 0] = 7
    psi = np.random.default_rng(0).normal(size=PSI.shape).astype(np.float32)
    with pydeform._arrays.unchecked_values():
        loss = pydeform.instance_mean_loss(psi, labels, 2, "none")
    labels[0, 0, 0] = 0
    np.testing.assert_array_equal(loss, pydeform.instance_mean_loss(psi, labels, 2, "none"))
