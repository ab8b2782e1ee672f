"""pydeform.torch's semi-convolutional ops on CPU tensors: ``torch.library.opcheck`` of every
op, ``gradcheck`` in float64 of the differentiable ones (random embeddings: away from the
norm's kink), results bit-identical to the array API's, the modules, torch.fx leaves and
``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import numpy as np
import pytest

import pydeform

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pydeform.torch")

ops = torch.ops.pydeform


def _problem(seed=0, n=2, dims=3, height=4, width=5, K=3):
    """psi float64 [N, D, H, W] (requires grad), labels int64 [N, H, W] in [0, K], centers
    [N, K, D], scores [N, H, W] and a per-center sigma [N, K]."""
    rng = np.random.default_rng(seed)
    psi = torch.from_numpy(rng.normal(size=(n, dims, height, width))).requires_grad_()
    labels = torch.from_numpy(rng.integers(0, K + 1, size=(n, height, width)))
    centers = torch.from_numpy(rng.normal(size=(n, K, dims))).requires_grad_()
    scores = torch.from_numpy(rng.normal(size=(n, height, width))).requires_grad_()
    sigma = torch.from_numpy(rng.uniform(0.5, 2.0, size=(n, K))).requires_grad_()
    return psi, labels, centers, scores, sigma


PSI, LABELS, CENTERS, SCORES, SIGMA = _problem()
REGION_SIGMA = SIGMA[:, 0].detach().clone().requires_grad_()

# (op name, its positional arguments, the output the gradient flows from)
DIFFERENTIABLE = [
    ("semiconv_embed", (PSI, [0.5, 2.0]), None),
    ("instance_mean_loss", (PSI, LABELS, 3, "mean", False, [1.0, 1.0]), 0),
    ("instance_mean_loss", (PSI, LABELS, 3, "none", True, [0.5, 2.0]), 0),
    ("affinity", (PSI, CENTERS, None, 0.8, "laplacian", False, [1.0, 1.0]), None),
    ("affinity", (PSI, CENTERS, SIGMA, 1.0, "gaussian", True, [0.5, 0.5]), None),
    ("seeded_mask_logits", (SCORES, PSI, REGION_SIGMA, 1.0, "argmax", False, [1.0, 1.0]), None),
    ("seeded_mask_logits", (SCORES, PSI, None, 0.7, "softmax", True, [1.0, 2.0]), None),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(DIFFERENTIABLE)]


def _output(name, args, index):
    out = getattr(ops, name)(*args)
    return out if index is None else out[index]


@pytest.mark.parametrize("name, args, index", DIFFERENTIABLE, ids=IDS)
def test_opcheck_forward_and_backward(name, args, index):
    forward = getattr(ops, name).default
    torch.library.opcheck(forward, args)
    out = _output(name, args, index)
    grad_output = torch.from_numpy(np.random.default_rng(5).normal(size=tuple(out.shape)))
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if name == "instance_mean_loss":
        # The backward takes the statistics the forward returned.
        statistics = forward(*detached)[1:]
        backward_args = (grad_output, *detached[:2], *statistics, *detached[2:])
    else:
        backward_args = (grad_output, *detached)
    torch.library.opcheck(getattr(ops, name + "_backward").default, backward_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_ops_without_gradient():
    psi, labels = PSI.detach(), LABELS
    foreground = labels > 0
    torch.library.opcheck(ops.instance_means.default, (psi, labels, 3, True, [1.0, 1.0]))
    torch.library.opcheck(ops.hough_votes.default, (psi, foreground, [6, 7], True, [1.0, 1.0]))
    torch.library.opcheck(ops.hough_votes.default, (psi, foreground, None, False, [1.0, 1.0]))
    # Every slot found (opcheck compares outputs with ==, which a NaN center fails).
    votes = ops.hough_votes(psi, foreground, None, True, [1.0, 1.0])
    assert int((votes > 0).sum()) >= 2
    torch.library.opcheck(ops.hough_peaks.default, (votes, 2, 1, 1))
    torch.library.opcheck(ops.assign_to_centers.default, (psi, foreground, CENTERS.detach(), 2.5, False,
                                                          [1.0, 1.0]))


@pytest.mark.parametrize("name, args, index", DIFFERENTIABLE, ids=IDS)
def test_gradcheck_float64(name, args, index):
    op = getattr(ops, name)
    for seed in range(2):
        torch.manual_seed(seed)
        assert torch.autograd.gradcheck(lambda *a: _output(name, a, index), args, eps=1e-6, atol=1e-6, rtol=1e-5,
                                        fast_mode=True)


def _arrays(*tensors):
    return [t.detach().numpy() for t in tensors]


def test_functions_equal_the_array_api_bit_for_bit():
    psi, labels, centers, scores, sigma = _problem(seed=1)
    options = dict(coordinates=True, spacing=(0.5, 2.0))
    psi_a, labels_a, centers_a, scores_a, sigma_a = _arrays(psi, labels, centers, scores, sigma)

    loss = pt.instance_mean_loss(psi, labels, 3, "sum", **options)
    assert loss.detach().numpy().tobytes() == pydeform.instance_mean_loss(psi_a, labels_a, 3, "sum",
                                                                           **options).tobytes()
    loss.backward()
    expected = pydeform.instance_mean_loss_backward(1.0, psi_a, labels_a, 3, "sum", **options)
    assert psi.grad.numpy().tobytes() == expected.tobytes()

    psi.grad = None
    out = pt.affinity(psi, centers, sigma, "gaussian", **options)
    np.testing.assert_array_equal(out.detach().numpy(), pydeform.affinity(psi_a, centers_a, sigma_a, "gaussian",
                                                                            **options))
    out.sum().backward()
    grads = pydeform.affinity_backward(np.ones(out.shape), psi_a, centers_a, sigma_a, "gaussian", **options)
    for tensor, want in zip((psi, centers, sigma), grads):
        np.testing.assert_array_equal(tensor.grad.numpy(), want)

    psi.grad = None
    out = pt.seeded_mask_logits(scores, psi, 0.7, "softmax", **options)
    np.testing.assert_array_equal(out.detach().numpy(), pydeform.seeded_mask_logits(scores_a, psi_a, 0.7, "softmax",
                                                                                    **options))
    out.sum().backward()
    grads = pydeform.seeded_mask_logits_backward(np.ones(out.shape), scores_a, psi_a, 0.7, "softmax", **options)
    np.testing.assert_array_equal(scores.grad.numpy(), grads.grad_scores)
    np.testing.assert_array_equal(psi.grad.numpy(), grads.grad_psi)

    embedded = pt.semiconv_embed(psi, (0.5, 2.0))
    np.testing.assert_array_equal(embedded.detach().numpy(), pydeform.semiconv_embed(psi_a, (0.5, 2.0)))

    means = pt.instance_means(psi.detach(), labels, 3, **options)
    assert type(means) is pydeform.InstanceMeans
    for got, want in zip(means, pydeform.instance_means(psi_a, labels_a, 3, **options)):
        np.testing.assert_array_equal(got.numpy(), want)

    foreground = labels > 0
    votes = pt.hough_votes(psi.detach(), foreground, (6, 7), **options)
    assert votes.dtype == torch.int32
    np.testing.assert_array_equal(votes.numpy(), pydeform.hough_votes(psi_a, foreground.numpy(), (6, 7), **options))
    peaks = pt.hough_peaks(votes, 2)
    assert type(peaks) is pydeform.HoughPeaks
    for got, want in zip(peaks, pydeform.hough_peaks(votes.numpy(), 2)):
        np.testing.assert_array_equal(got.numpy(), want)
    assigned = pt.assign_to_centers(psi.detach(), foreground, centers.detach(), 3.0, **options)
    np.testing.assert_array_equal(assigned.numpy(), pydeform.assign_to_centers(psi_a, foreground.numpy(), centers_a,
                                                                               3.0, **options))


def test_errors_come_from_the_argument_checks():
    psi, labels = PSI.detach(), LABELS
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 2\]"):
        pt.instance_mean_loss(psi, labels, 2)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        pt.instance_mean_loss(psi, labels, 3, "avg")
    with pytest.raises(ValueError, match="sigma: expected a number > 0"):
        pt.affinity(psi, CENTERS.detach(), 0.0)
    with pytest.raises(TypeError, match="spacing: expected a number or a pair"):
        pt.semiconv_embed(psi, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="kernel_size: expected 1 or 3"):
        pt.SemiConvEmbedding(4, 3, kernel_size=5)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        pt.InstanceMeanLoss(3, "avg")


class _Model(torch.nn.Module):
    """A semi-convolutional embedding head trained with the instance mean loss."""

    def __init__(self, kernel_size):
        super().__init__()
        self.head = pt.SemiConvEmbedding(2, 3, kernel_size=kernel_size, spacing=0.5)
        self.loss = pt.InstanceMeanLoss(3)

    def forward(self, x, labels):
        return self.loss(self.head(x), labels)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_modules_equal_the_functions(kernel_size):
    torch.manual_seed(0)
    model = _Model(kernel_size).double()
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    psi = model.head(x)
    assert psi.shape == (2, 3, 4, 5)
    phi = model.head.conv(x)
    torch.testing.assert_close(psi, pt.semiconv_embed(phi, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(model(x, LABELS), pt.instance_mean_loss(phi, LABELS, 3, coordinates=True,
                                                                       spacing=0.5), rtol=1e-15, atol=1e-15)


def test_symbolic_trace_keeps_the_functions_as_leaves():
    traced = torch.fx.symbolic_trace(_Model(1))
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert {pt.semiconv_embed, pt.instance_mean_loss} <= targets


def test_torch_compile_fullgraph_matches_eager():
    """aot_eager: Dynamo's graph capture (no break allowed) and AOTAutograd's trace of the fake
    implementations and the autograd formula, without Inductor's C++ build."""
    torch.manual_seed(0)
    model = _Model(3)
    x = torch.randn(2, 2, 6, 5)
    labels = torch.randint(0, 4, (2, 6, 5))
    eager = model(x, labels)
    eager.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, labels)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    compiled.backward()
    for parameter, want in zip(model.parameters(), expected):
        torch.testing.assert_close(parameter.grad, want, rtol=0, atol=0)
