"""pydeform.torch under ``torch.fx.symbolic_trace``: every op is an FX leaf (a ``call_function``
node of the pydeform.torch function, as torchvision's ops are), so models built of the
pydeform.torch modules trace, and the traced GraphModule computes what the eager model does.
Also what ``torch.jit.script`` gives (not supported: it must fail, not run something else)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pydeform.torch")
fx = torch.fx


def _tensor(seed, *shape):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _rois():
    return torch.tensor([[0, 0.5, 1.0, 6.0, 5.5], [1, 2.0, 0.0, 7.5, 7.0], [0, 3.0, 3.0, 4.0, 6.5]])


class DeformConvModel(torch.nn.Module):
    """torchvision's DeformConv2d with offsets and a mask from an ordinary convolution."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Conv2d(4, 27, 3, padding=1)
        self.deform = pt.DeformConv2d(4, 6, 3, padding=1)
        torch.nn.init.normal_(self.offset.weight, std=0.3)

    def forward(self, x):
        offset, mask = torch.split(self.offset(x), [18, 9], dim=1)
        return self.deform(x, offset, torch.sigmoid(mask))


class RoIHead(torch.nn.Module):
    """A convolution, then ``pool(features, rois)``, then a linear layer: the shape of a detector's box head."""

    def __init__(self, pool, channels=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, channels, 1)
        self.pool = pool
        self.fc = torch.nn.LazyLinear(3)

    def forward(self, x, rois):
        return self.fc(self.pool(self.conv(x), rois).flatten(1))


def _randomised(module):
    """The zero-initialised offset heads of the Pack modules made non-zero, so that their offsets act."""
    with torch.no_grad():
        for index, parameter in enumerate(module.parameters()):
            if not isinstance(parameter, torch.nn.parameter.UninitializedParameter):
                parameter.copy_(0.2 * _tensor(100 + index, *parameter.shape))
    return module


MODELS = {
    "DeformConv2d": (DeformConvModel, lambda: (_tensor(1, 2, 4, 8, 8),)),
    "ModulatedDeformConv2dPack": (lambda: _randomised(pt.ModulatedDeformConv2dPack(4, 6, 3, padding=1)),
                                  lambda: (_tensor(2, 2, 4, 8, 8),)),
    "RoIAlign": (lambda: RoIHead(pt.RoIAlign(2, 1.0, 2, aligned=True)), lambda: (_tensor(3, 2, 4, 8, 8), _rois())),
    "RoIPool": (lambda: RoIHead(pt.RoIPool(2, 1.0)), lambda: (_tensor(4, 2, 4, 8, 8), _rois())),
    "PSRoIAlign": (lambda: RoIHead(pt.PSRoIAlign(2, 1.0, 2), channels=8), lambda: (_tensor(5, 2, 4, 8, 8), _rois())),
    "PSRoIPool": (lambda: RoIHead(pt.PSRoIPool(2, 1.0), channels=8), lambda: (_tensor(6, 2, 4, 8, 8), _rois())),
    "DeformRoIPool": (lambda: RoIHead(pt.DeformRoIPool(2, sampling_ratio=2)), lambda: (_tensor(7, 2, 4, 8, 8), _rois())),
    "DeformRoIPoolPack": (lambda: RoIHead(_randomised(pt.DeformRoIPoolPack(2, 4, deform_fc_channels=8))),
                          lambda: (_tensor(8, 2, 4, 8, 8), _rois())),
    "ModulatedDeformRoIPoolPack": (lambda: RoIHead(_randomised(pt.ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=8))),
                                   lambda: (_tensor(9, 2, 4, 8, 8), _rois())),
    "CenterNetDecoder": (lambda: pt.CenterNetDecoder(K=4),
                         lambda: (torch.sigmoid(_tensor(10, 1, 2, 6, 6)), _tensor(11, 1, 2, 6, 6).abs(),
                                  _tensor(12, 1, 2, 6, 6))),
}


def _leaf_targets(graph_module) -> set:
    return {node.target.__name__ for node in graph_module.graph.nodes
            if node.op == "call_function" and getattr(node.target, "__module__", None) == "pydeform.torch"}


@pytest.mark.parametrize("name", list(MODELS))
def test_symbolic_trace_matches_eager(name):
    make, inputs = MODELS[name]
    model = make()
    arguments = inputs()
    expected = model(*arguments)  # also materialises the lazy layers before tracing
    traced = fx.symbolic_trace(model)
    assert _leaf_targets(traced), f"no pydeform.torch leaf in\n{traced.code}"
    torch.testing.assert_close(traced(*arguments), expected, rtol=0, atol=0)


def test_traced_graph_is_differentiable_like_the_eager_model():
    model = _randomised(pt.ModulatedDeformConv2dPack(4, 6, 3, padding=1))
    x = _tensor(13, 2, 4, 8, 8)
    traced = fx.symbolic_trace(model)
    eager_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    traced_grads = torch.autograd.grad(traced(x).square().sum(), list(traced.parameters()))
    for eager, traced_grad in zip(eager_grads, traced_grads):
        torch.testing.assert_close(traced_grad, eager, rtol=0, atol=0)


def test_functions_called_through_the_module_are_leaves():
    """``pydeform.torch.roi_align(...)`` called from user code (through the module, as with
    torchvision.ops) is one node, with per-image box lists as its argument."""

    class Model(torch.nn.Module):
        def forward(self, x, boxes):
            return pt.roi_align(x, [boxes[:2], boxes[2:]], (2, 2), 0.5, 2)

    x, boxes = _tensor(14, 2, 3, 8, 8), _rois()[:, 1:].contiguous()
    traced = fx.symbolic_trace(Model())
    assert _leaf_targets(traced) == {"roi_align"}
    torch.testing.assert_close(traced(x, boxes), Model()(x, boxes), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_jit_script_is_refused_with_a_clear_error(name):
    """TorchScript is not supported (docs/torch.md): scripting a model holding a pydeform.torch
    module fails at once, saying so, instead of with an error deep in the argument handling."""
    model = MODELS[name][0]()
    with pytest.raises(RuntimeError, match="pydeform.torch does not support TorchScript"):
        torch.jit.script(model)


def test_torch_jit_trace_records_the_custom_ops_and_round_trips(tmp_path):
    """``torch.jit.trace`` records ``pydeform::`` custom ops, and the saved module loads and
    runs again (in a process that has imported pydeform.torch, which registers the ops)."""
    model = pt.RoIAlign(2, 1.0, 2)
    x, rois = _tensor(15, 2, 3, 8, 8), _rois()
    traced = torch.jit.trace(model, (x, rois))
    assert "pydeform::roi_align" in str(traced.graph)
    torch.jit.save(traced, tmp_path / "roi_align.pt")
    torch.testing.assert_close(torch.jit.load(tmp_path / "roi_align.pt")(x, rois), model(x, rois), rtol=0, atol=0)


def test_fx_graph_mode_quantization_keeps_the_op_in_float():
    """FX graph mode quantization of a detection-style head: the convolution and the linear
    layer are quantized, the pydeform.torch leaf runs on dequantized float32 features between
    them, and the result stays close to the float model."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = RoIHead(pt.RoIAlign(2, 1.0, 2)).eval()
    x, rois = _tensor(16, 2, 4, 8, 8), _rois()
    expected = model(x, rois)
    prepared = prepare_fx(model, get_default_qconfig_mapping("fbgemm"), example_inputs=(x, rois))
    prepared(x, rois)  # calibration
    quantized = convert_fx(prepared)
    assert _leaf_targets(quantized) == {"roi_align"}
    assert "quantize_per_tensor" in quantized.code
    torch.testing.assert_close(quantized(x, rois), expected, rtol=0, atol=0.05)
