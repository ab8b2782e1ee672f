"""ONNX Runtime (CPU) models used as an external oracle by the tests and the benchmarks."""

import numpy as np
import onnx
import onnxruntime
from onnx import helper


def _pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def deform_conv_session(weight_shape, stride, padding, dilation, groups, offset_groups,
                        has_bias, has_mask, dtype):
    """An ONNX ``DeformConv`` (opset 19) on ORT's CPU provider, for one fixed geometry.

    weight_shape: (Cout, C/G, kh, kw); stride, padding, dilation: int or (h, w) pair (padding is
    symmetric); dtype: the numpy float dtype of every tensor. Returns
    ``run(x, w, offset, b=None, mask=None) -> ndarray [N, Cout, Ho, Wo]`` with x [N, C, H, W],
    w ``weight_shape``, offset [N, 2*Goff*kh*kw, Ho, Wo], b [Cout], mask [N, Goff*kh*kw, Ho, Wo].
    """
    element_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def tensor(name, shape):
        return helper.make_tensor_value_info(name, element_type, shape)

    (pad_h, pad_w) = _pair(padding)
    inputs = [tensor("X", ["N", "C", "H", "W"]), tensor("W", list(weight_shape)),
              tensor("offset", ["N", "offset_channels", "Ho", "Wo"])]
    # Optional inputs are positional: an empty name marks one as absent.
    node_inputs = ["X", "W", "offset", "B" if has_bias else "", "mask" if has_mask else ""]
    if has_bias:
        inputs.append(tensor("B", [weight_shape[0]]))
    if has_mask:
        inputs.append(tensor("mask", ["N", "mask_channels", "Ho", "Wo"]))
    node = helper.make_node(
        "DeformConv", node_inputs,
        ["Y"],
        kernel_shape=list(weight_shape[2:]), strides=list(_pair(stride)),
        pads=[pad_h, pad_w, pad_h, pad_w], dilations=list(_pair(dilation)),
        group=groups, offset_group=offset_groups)
    graph = helper.make_graph([node], "deform_conv", inputs,
                              [tensor("Y", ["N", weight_shape[0], "Ho", "Wo"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])

    def run(x, w, offset, b=None, mask=None):
        feeds = {"X": x, "W": w, "offset": offset, "B": b, "mask": mask}
        feeds = {name: np.ascontiguousarray(value, dtype=dtype)
                 for name, value in feeds.items() if value is not None}
        return session.run(None, feeds)[0]

    return run
