"""pydeform.torch nn.Modules on CPU tensors: parameter names and state_dict keys of torchvision /
mmcv, their initialisation identities (zero-initialised offset heads give plain convolution /
pooling), and ``torch.compile(fullgraph=True)`` of a small DeformConv2d + RoIAlign model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pydeform.torch")
F = torch.nn.functional

# Parameter names as torchvision / mmcv document them (constructor arguments in the test ids).
EXPECTED_STATE = {
    "DeformConv2d(4, 6, 3, groups=2)": (lambda: pt.DeformConv2d(4, 6, 3, groups=2), {
        "weight": (6, 2, 3, 3), "bias": (6,)}),
    "DeformConv2d(4, 6, (3, 1), bias=False)": (lambda: pt.DeformConv2d(4, 6, (3, 1), bias=False), {
        "weight": (6, 4, 3, 1)}),
    "ModulatedDeformConv2d(4, 6, 3, deform_groups=2)": (lambda: pt.ModulatedDeformConv2d(4, 6, 3, deform_groups=2), {
        "weight": (6, 4, 3, 3), "bias": (6,)}),
    "ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2)": (
        lambda: pt.ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2), {
            "weight": (6, 4, 3, 3), "bias": (6,), "conv_offset.weight": (54, 4, 3, 3), "conv_offset.bias": (54,)}),
    "DeformRoIPoolPack((2, 3), 4, deform_fc_channels=8)": (
        lambda: pt.DeformRoIPoolPack((2, 3), 4, deform_fc_channels=8), {
            "offset_fc.0.weight": (8, 24), "offset_fc.0.bias": (8,), "offset_fc.2.weight": (8, 8),
            "offset_fc.2.bias": (8,), "offset_fc.4.weight": (12, 8), "offset_fc.4.bias": (12,)}),
    "ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=8)": (
        lambda: pt.ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=8), {
            "offset_fc.0.weight": (8, 16), "offset_fc.0.bias": (8,), "offset_fc.2.weight": (8, 8),
            "offset_fc.2.bias": (8,), "offset_fc.4.weight": (8, 8), "offset_fc.4.bias": (8,),
            "mask_fc.0.weight": (8, 16), "mask_fc.0.bias": (8,), "mask_fc.2.weight": (4, 8), "mask_fc.2.bias": (4,)}),
    "RoIAlign(2, 0.5, 2)": (lambda: pt.RoIAlign(2, 0.5, 2), {}),
    "RoIPool(2, 0.5)": (lambda: pt.RoIPool(2, 0.5), {}),
    "PSRoIAlign(2, 0.5, 2)": (lambda: pt.PSRoIAlign(2, 0.5, 2), {}),
    "PSRoIPool(2, 0.5)": (lambda: pt.PSRoIPool(2, 0.5), {}),
    "DeformRoIPool(2)": (lambda: pt.DeformRoIPool(2), {}),
    "CenterNetDecoder(K=5)": (lambda: pt.CenterNetDecoder(K=5), {}),
}


@pytest.mark.parametrize("name", list(EXPECTED_STATE))
def test_state_dict_keys_and_shapes(name):
    make, expected = EXPECTED_STATE[name]
    state = make().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_checkpoint_round_trip():
    source, target = pt.ModulatedDeformConv2dPack(2, 3, 3, padding=1), pt.ModulatedDeformConv2dPack(2, 3, 3, padding=1)
    with torch.no_grad():
        source.conv_offset.weight.normal_()
    target.load_state_dict(source.state_dict())
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(target(x), source(x))


def _image(*shape):
    return torch.from_numpy(np.random.default_rng(sum(shape)).standard_normal(shape))


def test_deform_conv2d_with_zero_offset_is_a_convolution():
    conv = pt.DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2).double()
    x = _image(2, 4, 7, 6)
    expected = F.conv2d(x, conv.weight, conv.bias, (2, 1), 1, (1, 2), 2)
    offset = x.new_zeros(2, 2 * 3 * 2, *expected.shape[2:])
    torch.testing.assert_close(conv(x, offset), expected)


def test_pack_starts_as_a_convolution_with_mask_one_half():
    block = pt.ModulatedDeformConv2dPack(3, 4, 3, padding=1, deform_groups=1).double()
    with torch.no_grad():
        block.bias.normal_()
    x = _image(2, 3, 5, 6)
    expected = 0.5 * F.conv2d(x, block.weight, None, 1, 1) + block.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(block(x), expected)


def test_roi_pool_packs_start_without_deformation():
    x = _image(2, 4, 6, 7)
    rois = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0], [1, 2.0, 0.0, 6.5, 3.5]], dtype=torch.float64)
    plain = pt.DeformRoIPool((2, 3), 0.5, 2)(x, rois)
    pack = pt.DeformRoIPoolPack((2, 3), 4, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2).double()
    torch.testing.assert_close(pack(x, rois), plain)
    modulated = pt.ModulatedDeformRoIPoolPack((2, 3), 4, 8, 0.5, 2).double()
    torch.testing.assert_close(modulated(x, rois), 0.5 * plain)
    modulated(x, rois).sum().backward()
    assert modulated.mask_fc[2].weight.grad.abs().sum() > 0 and modulated.offset_fc[4].weight.grad is not None


def test_roi_modules_are_their_functions():
    x, rois = _image(1, 8, 5, 5), torch.tensor([[0, 0.3, 0.6, 7.1, 8.2]], dtype=torch.float64)
    torch.testing.assert_close(pt.RoIAlign(2, 0.5, 2, aligned=True)(x, rois), pt.roi_align(x, rois, 2, 0.5, 2, True))
    torch.testing.assert_close(pt.RoIPool((2, 1), 0.5)(x, rois), pt.roi_pool(x, rois, (2, 1), 0.5))
    torch.testing.assert_close(pt.PSRoIAlign(2, 0.5, 1)(x, rois), pt.ps_roi_align(x, rois, 2, 0.5, 1))
    torch.testing.assert_close(pt.PSRoIPool(2, 0.5)(x, rois), pt.ps_roi_pool(x, rois, 2, 0.5))


class _Detector(torch.nn.Module):
    """A DeformConv2d whose offsets come from a plain convolution, then RoIAlign on its output."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Conv2d(2, 2 * 9, 3, padding=1)
        self.deform = pt.DeformConv2d(2, 4, 3, padding=1)

    def forward(self, x, rois):
        return pt.roi_align(torch.relu(self.deform(x, self.offset(x))), rois, 2, 0.5, 2)


def test_torch_compile_fullgraph_matches_eager():
    """torch.compile's default backend (Inductor, which compiles C++ for the CPU) with
    fullgraph=True: no graph break around the custom ops, and the same values and gradients."""
    torch.manual_seed(0)
    model = _Detector()
    x = torch.randn(2, 2, 6, 6)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 8.0], [1, 0.0, 2.0, 6.0, 11.0]])
    eager = model(x, rois)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(x, rois)
    torch.testing.assert_close(compiled, eager)
    compiled.square().sum().backward()
    for parameter, expected in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(parameter.grad, expected)


def test_centernet_decoder_is_its_function():
    rng = np.random.default_rng(7)
    heat = torch.from_numpy(rng.uniform(0, 1, (1, 2, 4, 5)))
    wh = torch.from_numpy(rng.uniform(1, 3, (1, 2, 4, 5)))
    decoder = pt.CenterNetDecoder(K=5, down_ratio=4.0, threshold=0.3)
    torch.testing.assert_close(decoder(heat, wh), pt.centernet_decode(heat, wh, None, 5, down_ratio=4.0,
                                                                      threshold=0.3))
