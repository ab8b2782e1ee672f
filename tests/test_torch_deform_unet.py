"""pydeform.torch's Deformable U-Net ops and modules on the CPU: opcheck and float64 gradcheck of
the custom ops, equality with the array API and the reference, the modules' parameters and
starting points, torch.compile(fullgraph=True) against eager, and the autocast registration."""

import numpy as np
import pytest
import torch

import pydeform
import pydeform.torch as pt
from tests.deform_unet_cases import pool_case_from, transpose_case_from
from tests.strategies import build_case

ops = torch.ops.pydeform


def _conv_case(seed, with_mask=True, with_bias=True):
    return build_case(np.random.default_rng(seed), n=2, channels=4, out_channels=2, size=(5, 4), kernel=(2, 2),
                      groups=2, offset_groups=2, stride=(2, 1), padding=1, with_mask=with_mask, with_bias=with_bias)


def _tensor(array, requires_grad=True):
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array)).requires_grad_(requires_grad)


def pair(value) -> list:
    """An int-or-pair option as the custom ops' int[] argument."""
    return list(value) if isinstance(value, tuple) else [value, value]


def _transpose_args(seed=0, with_mask=True, with_bias=True):
    case = transpose_case_from(_conv_case(seed, with_mask, with_bias), np.random.default_rng(seed))
    op = case.options()
    args = (_tensor(case.input), _tensor(case.offset), _tensor(case.weight), _tensor(case.bias), pair(op["stride"]),
            pair(op["padding"]), pair(op["output_padding"]), pair(op["dilation"]), op["groups"], _tensor(case.mask))
    return case, args


def _pool_args(mode, seed=1, with_mask=True):
    case = pool_case_from(_conv_case(seed, with_mask), mode, np.random.default_rng(seed))
    args = (_tensor(case.input), _tensor(case.offset), pair(case.kernel_size), pair(case.stride), pair(case.padding),
            pair(case.dilation), mode, _tensor(case.mask))
    return case, args


CASES = [
    ("deform_conv_transpose2d", _transpose_args(0)),
    ("deform_conv_transpose2d", _transpose_args(1, with_mask=False, with_bias=False)),
    ("deform_pool2d", _pool_args("max")),
    ("deform_pool2d", _pool_args("avg", with_mask=False)),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


@pytest.mark.parametrize("name, case_args", CASES, ids=IDS)
def test_opcheck_forward_and_backward(name, case_args):
    _, args = case_args
    forward = getattr(ops, name).default
    torch.library.opcheck(forward, args)
    out = forward(*args)
    grad_output = torch.from_numpy(np.random.default_rng(5).standard_normal(tuple(out.shape)))
    backward_args = (grad_output,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(ops, name + "_backward").default, backward_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name, case_args", CASES, ids=IDS)
def test_gradcheck_float64(name, case_args):
    _, args = case_args
    op = getattr(ops, name)
    for seed in range(2):
        torch.manual_seed(seed)
        assert torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name, case_args", CASES, ids=IDS)
def test_functional_matches_array_api_and_reference(name, case_args):
    case, args = case_args
    args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    if name == "deform_conv_transpose2d":
        out = pt.deform_conv_transpose2d(*args[:4], stride=case.stride, padding=case.padding,
                                         output_padding=case.output_padding, groups=case.groups,
                                         dilation=case.dilation, mask=args[9])
        array_out = pydeform.deform_conv_transpose2d(**case.arguments())
        tensors = dict(zip(("input", "offset", "weight", "bias", "mask"), args[:4] + (args[9],)))
    else:
        out = pt.deform_pool2d(args[0], args[1], case.kernel_size, case.stride, case.padding, case.dilation,
                               case.mode, args[7])
        array_out = pydeform.deform_pool2d(**case.arguments())
        tensors = {"input": args[0], "offset": args[1], "mask": args[7]}
    np.testing.assert_array_equal(out.detach().numpy(), array_out)
    np.testing.assert_allclose(out.detach().numpy(), case.reference_forward(), rtol=1e-10, atol=1e-10)
    out.backward(torch.from_numpy(case.grad_output))
    for argument, expected in case.reference_backward().items():
        if expected is not None:
            np.testing.assert_allclose(tensors[argument].grad.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_modules_with_zero_offsets_are_torch_layers():
    torch.manual_seed(0)
    layer = pt.DeformConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2).double()
    reference_layer = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2).double()
    assert {k: v.shape for k, v in layer.state_dict().items()} == \
        {k: v.shape for k, v in reference_layer.state_dict().items()}
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    offset = torch.zeros(2, 18, 5, 6, dtype=torch.float64)
    expected = torch.nn.functional.conv_transpose2d(x, layer.weight, layer.bias, 2, 1, 1, 2)
    torch.testing.assert_close(layer(x, offset), expected)
    pack = pt.DeformConvTranspose2dPack(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, modulated=False)
    pack = pack.double()
    torch.testing.assert_close(pack(x), torch.nn.functional.conv_transpose2d(x, pack.weight, pack.bias, 2, 1, 1, 2))
    modulated = pt.DeformConvTranspose2dPack(4, 6, 3, stride=2, padding=1, output_padding=1, bias=False).double()
    torch.testing.assert_close(modulated(x), 0.5 * torch.nn.functional.conv_transpose2d(x, modulated.weight, None, 2,
                                                                                         1, 1))
    for mode, pool in (("max", torch.nn.functional.max_pool2d), ("avg", torch.nn.functional.avg_pool2d)):
        torch.testing.assert_close(pt.DeformPool2d(2, mode=mode)(x, torch.zeros(2, 8, 2, 3, dtype=torch.float64)),
                                   pool(x, 2))
        torch.testing.assert_close(pt.DeformPool2dPack(4, 3, stride=2, mode=mode).double()(x), pool(x, 3, 2))
    assert set(pt.DeformPool2dPack(4, 3).state_dict()) == {"conv_offset.weight", "conv_offset.bias"}


def test_module_argument_errors():
    with pytest.raises(ValueError, match="groups: 3 must divide"):
        pt.DeformConvTranspose2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="deform_groups: 4 must divide out_channels"):
        pt.DeformConvTranspose2d(4, 6, 3, deform_groups=4)
    with pytest.raises(ValueError, match="mode: expected 'avg' or 'max'"):
        pt.DeformPool2d(2, mode="sum")


class _UpDown(torch.nn.Module):
    """Deformable pooling down, a transposed deformable convolution back up."""

    def __init__(self):
        super().__init__()
        self.down = pt.DeformPool2dPack(2, 2, mode="max", modulated=True)
        self.up = pt.DeformConvTranspose2dPack(2, 3, 3, stride=2, padding=1, output_padding=1)
        for module in (self.down.conv_offset, self.up.conv_offset):
            torch.nn.init.normal_(module.weight, std=0.3)

    def forward(self, x):
        return self.up(torch.relu(self.down(x)))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _UpDown()
    x = torch.randn(2, 2, 6, 8)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    compiled.square().sum().backward()
    for parameter, expected in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(parameter.grad, expected)


@pytest.mark.parametrize("name", ["deform_conv_transpose2d", "deform_pool2d", "deform_pool2d_with_indices"])
def test_autocast_rule_is_registered(name):
    """Under torch.autocast("cuda") both ops run in the autocast dtype (the rule every op shares)."""
    for op in (name, name + "_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pydeform::{op}", "AutocastCUDA"), op


@pytest.mark.parametrize("deterministic", [False, True])
def test_scatters_follow_use_deterministic_algorithms(monkeypatch, deterministic):
    """The transposed convolution's forward and deformable pooling's backward get
    torch.are_deterministic_algorithms_enabled() as the array API's ``deterministic``; the ops
    also take it explicitly."""
    from pydeform import deform_unet

    seen = []
    for driver in ("run_deform_conv_transpose2d_forward", "run_deform_pool2d_backward"):
        original = getattr(deform_unet, driver)

        def recording(*args, original=original, driver=driver):
            seen.append((driver, args[-1]))
            return original(*args)

        monkeypatch.setattr(deform_unet, driver, recording)
    _, transpose_args = _transpose_args(0)
    _, pool_args = _pool_args("avg")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        pt.deform_conv_transpose2d(*transpose_args[:4], *transpose_args[4:6], transpose_args[6],
                                   transpose_args[8], transpose_args[7], transpose_args[9]).sum().backward()
        pt.deform_pool2d(*pool_args).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [("run_deform_conv_transpose2d_forward", deterministic),
                    ("run_deform_pool2d_backward", deterministic)]
    explicit = ops.deform_conv_transpose2d.default(*(a.detach() if isinstance(a, torch.Tensor) else a
                                                     for a in transpose_args), True)
    grad = ops.deform_pool2d_backward.default(torch.ones_like(pt.deform_pool2d(*pool_args)),
                                              *(a.detach() if isinstance(a, torch.Tensor) else a for a in pool_args),
                                              True)
    assert explicit.shape[1] == transpose_args[2].shape[1] * transpose_args[8]
    torch.testing.assert_close(grad[0], pool_args[0].grad)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_pool_return_indices_are_the_array_apis_and_route_the_gradient(with_mask):
    """return_indices=True: the array API's output and int32 indices, and the same gradients as
    without them (the backward routes through the saved indices instead of recomputing them)."""
    case, args = _pool_args("max", with_mask=with_mask)
    options = dict(kernel_size=case.kernel_size, stride=case.stride, padding=case.padding, dilation=case.dilation,
                   mode="max", mask=args[7])
    out, indices = pt.deform_pool2d(args[0], args[1], **options, return_indices=True)
    array_out, array_indices = pydeform.deform_pool2d(**case.arguments(), return_indices=True)
    np.testing.assert_array_equal(out.detach().numpy(), array_out)
    assert indices.dtype == torch.int32 and not indices.requires_grad
    np.testing.assert_array_equal(indices.numpy(), array_indices)
    grad_output = torch.from_numpy(case.grad_output)
    tensors = [a for a in (args[0], args[1], args[7]) if a is not None]
    with_indices = torch.autograd.grad(out, tensors, grad_output)
    recomputed = torch.autograd.grad(pt.deform_pool2d(args[0], args[1], **options), tensors, grad_output)
    for got, expected in zip(with_indices, recomputed):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.library.opcheck(ops.deform_pool2d_with_indices.default, args)
    backward_args = (grad_output,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) + (
        indices,)
    torch.library.opcheck(ops.deform_pool2d_with_indices_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert torch.autograd.gradcheck(lambda *a: ops.deform_pool2d_with_indices(*a)[0], args, eps=1e-6, atol=1e-6,
                                    rtol=1e-5, fast_mode=True)


def test_pool_return_indices_under_torch_compile_and_its_errors():
    case, args = _pool_args("max")

    def pool(input, offset, mask):
        return pt.deform_pool2d(input, offset, case.kernel_size, case.stride, case.padding, case.dilation, "max",
                                mask, return_indices=True)

    eager = pool(args[0], args[1], args[7])
    compiled = torch.compile(pool, fullgraph=True)(args[0], args[1], args[7])
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])
    with pytest.raises(ValueError, match="return_indices"):
        pt.deform_pool2d(args[0], args[1], case.kernel_size, mode="avg", return_indices=True)
    with pytest.raises(TypeError, match="return_indices"):
        pt.deform_pool2d(args[0], args[1], case.kernel_size, mode="max", return_indices=1)
