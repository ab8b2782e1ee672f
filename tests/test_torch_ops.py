"""pydeform.torch custom ops on CPU tensors: ``torch.library.opcheck`` of every op (schema,
fake implementation, autograd registration, AOT dispatch), ``gradcheck`` in float64 of every
differentiable op against its analytic backward, results equal to the array API's, argument
errors, and the autocast argument rule."""

from __future__ import annotations

import numpy as np
import pytest

import pydeform
import reference
from strategies import build_case, build_roi_case

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pydeform.torch")

ops = torch.ops.pydeform
#: Boxes for the RoI gradient cases: whole bins in the image or across its border (the
#: degenerate kinds are covered by the array-level tests; here they only slow gradcheck down).
KINDS = ("inside", "straddling", "huge")


def _tensors(values: dict, requires_grad=()) -> dict:
    return {k: (torch.from_numpy(np.ascontiguousarray(v)).requires_grad_(k in requires_grad)
                if isinstance(v, np.ndarray) else v) for k, v in values.items()}


def _deform_conv2d_args(with_mask=True, with_bias=True):
    case = build_case(np.random.default_rng(0), n=2, channels=4, out_channels=2, size=(3, 4), kernel=(2, 2),
                      groups=2, offset_groups=2, stride=(1, 2), padding=1, with_mask=with_mask, with_bias=with_bias)
    t = _tensors(case.arguments(), requires_grad=("input", "offset", "weight", "bias", "mask"))
    return case, (t["input"], t["offset"], t["weight"], t["bias"], [1, 2], [1, 1], [1, 1], t["mask"])


def _roi_case(op, **options):
    return build_roi_case(op, np.random.default_rng(1), n=2, channels=options.pop("channels", 2), size=(5, 6),
                          kinds=KINDS, scale=0.5, **options)


def _roi_args(op, case):
    """The custom op's positional arguments for a RoI case (input requires grad)."""
    t = _tensors({"input": case.input, "rois": case.rois, **case.options}, requires_grad=("input", "offset", "mask",
                                                                                            "trans"))
    o = case.options
    size = list(o["output_size"]) if isinstance(o.get("output_size"), tuple) else [o.get("output_size")] * 2
    if op == "roi_align":
        return (t["input"], t["rois"], size, o["spatial_scale"], o["sampling_ratio"], o["aligned"], o["mode"])
    if op == "ps_roi_align":
        return (t["input"], t["rois"], size, o["spatial_scale"], o["sampling_ratio"])
    if op in ("roi_pool", "ps_roi_pool"):
        return (t["input"], t["rois"], size, o["spatial_scale"])
    if op == "deform_roi_pool":
        return (t["input"], t["rois"], t["offset"], size, o["spatial_scale"], o["sampling_ratio"], o["gamma"],
                t["mask"])
    return (t["input"], t["rois"], t["trans"], o["output_dim"], o["group_size"], o["pooled_size"], o["part_size"],
            o["sample_per_part"], o["trans_std"], o["spatial_scale"])


def _roi_cases():
    rng = np.random.default_rng(2)
    return [
        ("roi_align", _roi_case("roi_align", output_size=(2, 3), sampling_ratio=2, aligned=True, mode="avg")),
        ("roi_align", _roi_case("roi_align", output_size=(2, 2), sampling_ratio=-1, aligned=False, mode="max")),
        ("ps_roi_align", _roi_case("ps_roi_align", channels=8, output_size=2, sampling_ratio=2)),
        ("roi_pool", _roi_case("roi_pool", output_size=(2, 3))),
        ("ps_roi_pool", _roi_case("ps_roi_pool", channels=8, output_size=2)),
        ("deform_roi_pool", _roi_case("deform_roi_pool", output_size=(2, 3), sampling_ratio=2, gamma=0.3,
                                      offset=rng.standard_normal((len(KINDS), 2, 2, 3)),
                                      mask=rng.uniform(0.2, 1.2, (len(KINDS), 1, 2, 3)))),
        ("deform_psroi_pool", _roi_case("deform_psroi_pool", channels=8, output_dim=2, group_size=2, pooled_size=2,
                                        part_size=2, sample_per_part=2, trans_std=0.2,
                                        trans=rng.standard_normal((len(KINDS), 4, 2, 2)))),
    ]


ROI_CASES = _roi_cases()


def _centernet_decode_args():
    rng = np.random.default_rng(3)
    heat = torch.from_numpy(rng.uniform(0, 1, (2, 3, 5, 6)))
    return (heat, torch.from_numpy(rng.uniform(1, 4, (2, 2, 5, 6))), torch.from_numpy(rng.uniform(0, 1, (2, 2, 5, 6))),
            7, 3, False, 4.0, None)


def _focal_loss_args():
    rng = np.random.default_rng(4)
    target = rng.uniform(0, 0.9, (1, 2, 4, 5))
    target[0, 1, 2, 3] = target[0, 0, 1, 1] = 1.0
    pred = torch.from_numpy(rng.uniform(0.05, 0.95, target.shape)).requires_grad_()
    return (pred, torch.from_numpy(target), 2.0, 4.0)


def _backward_args(op, args):
    """A backward op's arguments: grad_output like the forward's output, then the forward's."""
    out = op(*args)
    grad_output = torch.from_numpy(np.random.default_rng(5).standard_normal(tuple(out.shape)))
    return (grad_output,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _differentiable_cases():
    cases = [("deform_conv2d", _deform_conv2d_args()[1]), ("deform_conv2d", _deform_conv2d_args(False, False)[1])]
    cases += [(op, _roi_args(op, case)) for op, case in ROI_CASES]
    cases.append(("centernet_focal_loss", _focal_loss_args()))
    return cases


DIFFERENTIABLE = _differentiable_cases()
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(DIFFERENTIABLE)]


@pytest.mark.parametrize("name, args", DIFFERENTIABLE, ids=IDS)
def test_opcheck_forward_and_backward(name, args):
    forward = getattr(ops, name).default
    torch.library.opcheck(forward, args)
    torch.library.opcheck(getattr(ops, name + "_backward").default, _backward_args(forward, args),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def _centernet_targets_args():
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 22.0], [10.5, 2.0, 18.0, 40.0], [0, 0, 0, 0]]], dtype=torch.float64)
    return (boxes, torch.tensor([[1, 0, -1]]), 2, [12, 10], 4.0, 0.7, 4)


def test_opcheck_ops_without_gradient():
    torch.library.opcheck(ops.centernet_decode.default, _centernet_decode_args())
    torch.library.opcheck(ops.centernet_targets.default, _centernet_targets_args())


@pytest.mark.parametrize("name, args", DIFFERENTIABLE, ids=IDS)
def test_gradcheck_float64(name, args):
    op = getattr(ops, name)
    # fast_mode compares random directional derivatives u^T J v with finite differences: a few
    # op calls instead of two per input element, the same check of the analytic backward.
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_deform_conv2d_matches_array_api_and_reference():
    case, args = _deform_conv2d_args()
    out = pt.deform_conv2d(*args[:4], stride=(1, 2), padding=1, dilation=1, mask=args[7])
    np.testing.assert_allclose(out.detach().numpy(), pydeform.deform_conv2d(**case.arguments()), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.detach().numpy(), case.reference_forward(), rtol=1e-10, atol=1e-10)
    out.backward(torch.from_numpy(case.grad_output))
    expected = case.reference_backward()
    for name, tensor in zip(("input", "offset", "weight", "bias", "mask"), (args[0], args[1], args[2], args[3],
                                                                          args[7])):
        np.testing.assert_allclose(tensor.grad.numpy(), expected[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, case", ROI_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ROI_CASES)])
def test_roi_ops_match_reference(name, case):
    args = _roi_args(name, case)
    out = getattr(ops, name)(*args)
    np.testing.assert_allclose(out.detach().numpy(), case.forward(reference), rtol=1e-10, atol=1e-10)
    out.backward(torch.from_numpy(case.grad_output))
    values = dict(zip((a.name for a in getattr(ops, name).default._schema.arguments), args))
    for argument, expected in case.backward(reference).items():
        if expected is not None:
            np.testing.assert_allclose(values[argument].grad.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_functional_boxes_as_list_and_rows_agree():
    case = _roi_case("roi_align", output_size=2, sampling_ratio=2, aligned=False, mode="avg")
    input = torch.from_numpy(case.input)
    rows = torch.from_numpy(case.rois)
    ordered = rows[torch.argsort(rows[:, 0], stable=True)]
    per_image = [ordered[ordered[:, 0] == i, 1:] for i in range(case.input.shape[0])]
    torch.testing.assert_close(pt.roi_align(input, per_image, 2, 0.5, 2), pt.roi_align(input, ordered, 2, 0.5, 2))
    assert pt.roi_align(input, [], 2, 0.5, 2).shape == (0, 2, 2, 2)


def test_centernet_ops_match_array_api():
    args = _centernet_decode_args()
    detections = pt.centernet_decode(*args[:3], K=7, down_ratio=4.0)
    expected = pydeform.centernet_decode(*(a.numpy() for a in args[:3]), K=7, down_ratio=4.0)
    assert detections.dtype == torch.float64 and detections.shape == (2, 7, 6)
    np.testing.assert_array_equal(detections.numpy(), expected)
    boxes, labels, classes, size, down_ratio, overlap, objects = _centernet_targets_args()
    targets = pt.centernet_targets(boxes, labels, classes, size, down_ratio=down_ratio, max_objects=objects)
    expected = pydeform.centernet_targets(boxes.numpy(), labels.numpy(), classes, size, down_ratio=down_ratio,
                                          max_objects=objects)
    assert type(targets) is pydeform.CenterNetTargets
    for got, want in zip(targets, expected):
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), want)
    pred, target, alpha, beta = _focal_loss_args()
    loss = pt.centernet_focal_loss(pred, target)
    loss.backward()
    np.testing.assert_allclose(loss.item(), reference.centernet_focal_loss(pred.detach().numpy(), target.numpy()),
                               rtol=1e-12)


def test_errors_come_from_the_argument_checks():
    image, rois = torch.zeros(1, 2, 4, 4), torch.zeros(1, 5)
    with pytest.raises(ValueError, match=r"output_size: expected positive values"):
        pt.roi_align(image, rois, 0)
    with pytest.raises(TypeError, match=r"input: expected a floating dtype among float32, float64"):
        pt.roi_pool(image.half(), rois.half(), 2)
    with pytest.raises(ValueError, match=r"offset: expected shape"):
        pt.deform_roi_pool(image, rois, torch.zeros(1, 2, 3, 3), output_size=2)
    with pytest.raises(ValueError, match=r"rois\[0\]: expected a Tensor\[L, 4\]"):
        pt.roi_align(image, [torch.zeros(1, 5)], 2)


def test_autocast_rule_casts_features_not_boxes_nor_float64():
    names = ["input", "rois", "offset", "output_size"]
    args = (torch.zeros(1, dtype=torch.float32), torch.zeros(1, 5), torch.zeros(1, dtype=torch.float64), [2, 2])
    cast = pt._autocast_arguments(args, names, "cpu", torch.bfloat16)
    assert [getattr(a, "dtype", None) for a in cast] == [torch.bfloat16, torch.float32, torch.float64, None]
    assert pt._autocast_arguments(args, names, "cuda", torch.float16)[0].dtype == torch.float32  # other device


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_follows_use_deterministic_algorithms(monkeypatch, deterministic):
    """Autograd passes torch.are_deterministic_algorithms_enabled() to the backward ops, which
    hand it to the array API as ``deterministic``."""
    seen = []
    backward_method = pydeform.roi._backward_method

    def recording(call, family, mode):
        seen.append(mode)
        return backward_method(call, family, mode)

    monkeypatch.setattr(pydeform.roi, "_backward_method", recording)
    input = torch.from_numpy(np.random.default_rng(6).standard_normal((1, 2, 5, 5))).requires_grad_()
    boxes = torch.tensor([[0.0, 0.5, 0.5, 3.5, 4.0]], dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        pt.roi_align(input, boxes, 2, 1.0, 2).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [deterministic]
    explicit = ops.roi_align_backward.default(torch.ones(1, 2, 2, 2, dtype=torch.float64), input.detach(), boxes,
                                              [2, 2], 1.0, 2, False, "avg", True)
    assert torch.equal(explicit, input.grad)
