"""ONNX Runtime (CPU) models: the CPU peers of :mod:`pydeform.benchmark_cases` and an external
oracle of the tests.

Imported only where a peer or a test needs it: it imports onnx and onnxruntime.
"""

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
    session = _single_node_session(node, inputs, tensor("Y", ["N", weight_shape[0], "Ho", "Wo"]), 19)

    def run(x, w, offset, b=None, mask=None):
        feeds = {"X": x, "W": w, "offset": offset, "B": b, "mask": mask}
        feeds = {name: np.ascontiguousarray(value, dtype=dtype)
                 for name, value in feeds.items() if value is not None}
        return session.run(None, feeds)[0]

    return run


#: ORT intra-op threads of the sessions built here; 0 is ORT's default (one per core). The CPU
#: benchmark comparison sets it to time both sides on the same number of threads.
SESSION_THREADS = 0


def _single_node_session(node, inputs, output, opset):
    """An InferenceSession on ORT's CPU provider for a model of one node."""
    graph = helper.make_graph([node], node.op_type, inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = SESSION_THREADS
    return onnxruntime.InferenceSession(model.SerializeToString(), sess_options=options,
                                        providers=["CPUExecutionProvider"])


def roi_align_session(output_size, spatial_scale, sampling_ratio, aligned, mode, dtype):
    """An ONNX ``RoiAlign`` (opset 16) on ORT's CPU provider.

    output_size: int or (PH, PW); aligned: True is coordinate_transformation_mode
    ``half_pixel``, False ``output_half_pixel``; mode: "avg" or "max"; sampling_ratio: 0 is
    adaptive. Returns ``run(x, rois) -> ndarray [K, C, PH, PW]`` with x [N, C, H, W] and rois
    [K, 5] rows (batch_index, x1, y1, x2, y2).
    """
    element_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    pooled_h, pooled_w = map(int, _pair(output_size))
    node = helper.make_node(
        "RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode=mode,
        output_height=pooled_h, output_width=pooled_w, sampling_ratio=sampling_ratio,
        spatial_scale=float(spatial_scale),
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")
    inputs = [helper.make_tensor_value_info("X", element_type, ["N", "C", "H", "W"]),
              helper.make_tensor_value_info("rois", element_type, ["K", 4]),
              helper.make_tensor_value_info("batch_indices", onnx.TensorProto.INT64, ["K"])]
    output = helper.make_tensor_value_info("Y", element_type, ["K", "C", pooled_h, pooled_w])
    session = _single_node_session(node, inputs, output, 16)

    def run(x, rois):
        rois = np.asarray(rois)
        return session.run(None, {"X": np.ascontiguousarray(x, dtype=dtype),
                                  "rois": np.ascontiguousarray(rois[:, 1:], dtype=dtype),
                                  "batch_indices": rois[:, 0].astype(np.int64)})[0]

    return run


def max_roi_pool_session(output_size, spatial_scale, dtype=np.float32):
    """An ONNX ``MaxRoiPool`` (the opset 1 operator) on ORT's CPU provider, which runs it in
    float32 only. The model is stamped opset 16: MaxRoiPool is unchanged from 1 to 21, and ORT
    guarantees only models of opset 7 and later.

    output_size: int or (PH, PW), the ``pooled_shape``. Returns ``run(x, rois) -> ndarray
    [K, C, PH, PW]`` with x [N, C, H, W] and rois [K, 5] rows (batch_index, x1, y1, x2, y2).
    """
    element_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    pooled_h, pooled_w = map(int, _pair(output_size))
    node = helper.make_node("MaxRoiPool", ["X", "rois"], ["Y"], pooled_shape=[pooled_h, pooled_w],
                            spatial_scale=float(spatial_scale))
    inputs = [helper.make_tensor_value_info("X", element_type, ["N", "C", "H", "W"]),
              helper.make_tensor_value_info("rois", element_type, ["K", 5])]
    output = helper.make_tensor_value_info("Y", element_type, ["K", "C", pooled_h, pooled_w])
    session = _single_node_session(node, inputs, output, 16)

    def run(x, rois):
        return session.run(None, {"X": np.ascontiguousarray(x, dtype=dtype),
                                  "rois": np.ascontiguousarray(rois, dtype=dtype)})[0]

    return run
