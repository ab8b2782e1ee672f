"""The benchmark cases (pydeform.benchmark_cases) and the asv suite built on them.

The suite imports and passes ``asv check``; the cases have the standard shapes of docs/benchmarks.md and
deterministic, non-zero inputs; each peer computes what pydeform computes, so a ratio compares
the same work; the suite's CPU benchmark classes run.
"""

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import pydeform
from pydeform import benchmark_cases as bc

ROOT = Path(__file__).resolve().parents[1]


def test_asv_check_passes():
    pytest.importorskip("asv")
    # asv drops PYTHONPATH; ASV_PYTHONPATH checks this checkout's suite against this checkout's
    # package whether or not it is installed.
    env = dict(os.environ, ASV_PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "asv", "check", "--config", "asv_benchmarks/asv.conf.json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout


@pytest.fixture
def suite(monkeypatch):
    """Imports a module of the suite as asv does: ``benchmarks`` is a package in asv_benchmarks/."""
    monkeypatch.syspath_prepend(str(ROOT / "asv_benchmarks"))
    return lambda name: importlib.import_module(f"benchmarks.{name}")


def test_importing_the_cases_imports_no_optional_library():
    code = ("import sys, pydeform.benchmark_cases; "
            "print(sorted(m for m in ('torch', 'torchvision', 'onnxruntime', 'onnx', 'cupy', 'numba') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_op_has_a_gpu_and_a_cpu_case_with_its_dtypes():
    for op in bc.OPS:
        for device in ("gpu", "cpu"):
            found = bc.cases(op, device)
            assert found, (op, device)
            for case in found:
                assert case.op == op and case.device == device and "float32" in case.dtypes
                # centernet_targets reads boxes of float32 or float64, hough_peaks int32 votes, the
                # level-set ops real dtypes NumPy knows.
                takes_bfloat16 = op not in ("centernet_targets", "hough_peaks") and op not in bc.levelset.OPS
                assert ("bfloat16" in case.dtypes) == (device == "gpu" and takes_bfloat16), case.id
    ids = [case.id for case in bc.cases()]
    assert len(ids) == len(set(ids))


def test_cases_filters_and_rejects_unknown_names():
    quick = bc.cases(quick=True)
    assert sorted((case.op, case.device) for case in quick) == sorted(
        (op, device) for op in bc.OPS for device in ("gpu", "cpu"))
    assert [case.name for case in bc.cases("roi_pool", "gpu")] == ["7x7", "14x14", "7x7-deterministic"]
    with pytest.raises(ValueError, match="op: expected one of"):
        bc.cases("roi_alignn")
    with pytest.raises(ValueError, match="device: expected"):
        bc.cases(device="tpu")


def test_deterministic_cases_time_the_deterministic_backward(monkeypatch):
    """One deterministic twin of the first GPU case of each op whose backward scatters: same
    inputs and options, no peer, ``deterministic=True`` passed to the backward only."""
    twins = [case for case in bc.cases(device="gpu") if case.backward_options]
    assert sorted(case.op for case in twins) == sorted(bc.DETERMINISTIC_OPS)
    for twin in twins:
        first = bc.cases(twin.op, "gpu")[0]
        assert twin.name == first.name + "-deterministic" and twin.options == first.options and twin.peer is None
    calls = []
    monkeypatch.setattr(pydeform, "roi_align", lambda **kwargs: calls.append(("forward", kwargs)))
    monkeypatch.setattr(pydeform, "roi_align_backward", lambda grad, **kwargs: calls.append(("backward", kwargs)))
    twin = next(case for case in twins if case.op == "roi_align")
    bc.pydeform_calls(twin, {"input": 1, "rois": 2, "grad_output": 3}).forward_backward()
    assert "deterministic" not in calls[0][1] and calls[1][1]["deterministic"] is True
    forward_twins = [case for case in bc.cases(device="gpu") if case.forward_options]
    assert [case.op for case in forward_twins] == list(bc.DETERMINISTIC_FORWARD_OPS) == ["deform_conv_transpose2d"]
    calls.clear()
    monkeypatch.setattr(pydeform, "deform_conv_transpose2d", lambda **kwargs: calls.append(("forward", kwargs)))
    monkeypatch.setattr(pydeform, "deform_conv_transpose2d_backward",
                        lambda grad, **kwargs: calls.append(("backward", kwargs)))
    bc.pydeform_calls(forward_twins[0], {"input": 1, "offset": 2, "grad_output": 3}).forward_backward()
    assert calls[0][1]["deterministic"] is True and "deterministic" not in calls[1][1]


def test_standard_shapes_of_perf_md():
    def gpu(op, name):
        return next(case for case in bc.cases(op, "gpu") if case.name == name)

    layer = bc.host_inputs(gpu("deform_conv2d", "N8-C64-128x128"))
    assert layer["input"].shape == (8, 64, 128, 128) and layer["weight"].shape == (64, 64, 3, 3)
    assert layer["offset"].shape == (8, 18, 128, 128) and layer["mask"].shape == (8, 9, 128, 128)
    assert {case.name for case in bc.cases("deform_conv2d", "gpu")} >= {
        "N16-C256-64x64", "N64-C128-56x56", "N64-C256-28x28", "N64-C512-14x14", "N64-C1024-7x7"}
    roi = bc.host_inputs(gpu("roi_align", "7x7-adaptive"))
    assert roi["input"].shape == (2, 256, 200, 304) and roi["rois"].shape == (512, 5)
    assert roi["grad_output"].shape == (512, 256, 7, 7)
    assert gpu("roi_align", "14x14-sampling2").options == dict(
        output_size=14, sampling_ratio=2, spatial_scale=0.25, aligned=True)
    assert bc.host_inputs(gpu("ps_roi_pool", "7x7"))["input"].shape == (2, 245, 200, 304)
    decode = gpu("centernet_decode", "B8-C80-128x128-K100")
    assert bc.host_inputs(decode)["heat"].shape == (8, 80, 128, 128) and decode.options == {"K": 100}
    assert bc.floor_bytes(decode, "float32") == 8 * 80 * 128 * 128 * 4
    assert bc.floor_bytes(decode, "bfloat16") == 8 * 80 * 128 * 128 * 2
    with pytest.raises(ValueError, match="defines no bandwidth floor"):
        bc.floor_bytes(gpu("roi_pool", "7x7"), "float32")
    cpu_layer = bc.host_inputs(bc.cases("deform_conv2d", "cpu")[0])
    assert cpu_layer["input"].shape == (2, 64, 64, 64)
    cpu_roi = bc.host_inputs(bc.cases("roi_align", "cpu")[0])
    assert cpu_roi["input"].shape == (1, 64, 100, 152) and cpu_roi["rois"].shape == (256, 5)


# The inputs that are not float32 data: labels, masks, vote counts.
INPUT_DTYPES = {"labels": np.int64, "foreground": np.bool_, "votes": np.int32}


@pytest.mark.parametrize("case", bc.cases(device="cpu"), ids=lambda case: case.id)
def test_cpu_inputs_are_deterministic_nonzero_and_fit_the_op(case):
    first, again, other = bc.host_inputs(case, 0), bc.host_inputs(case, 0), bc.host_inputs(case, 1)
    assert first.keys() == again.keys() == other.keys()
    assert ("grad_output" in first) == case.backward
    for name, array in first.items():
        np.testing.assert_array_equal(array, again[name], err_msg=name)
        assert array.flags.c_contiguous and np.isfinite(array).all() and np.any(array != 0), name
        assert array.dtype == INPUT_DTYPES.get(name, np.float32), name
        if array.size > 1:
            assert not np.array_equal(array, other[name]), name
    # The inputs are valid arguments of the op: the pydeform forward (Numba CPU) accepts them.
    assert bc.pydeform_calls(case, bc.device_inputs(first, "float32")).forward() is not None


@pytest.mark.parametrize("case", bc.cases("roi_align"), ids=lambda case: case.id)
def test_roi_align_floor_counts_the_pixels_the_op_reads(case):
    """The floor's input pixels are those that get gradient from roi_align's backward with a
    ones output gradient (every sample's corner weights are >= 0, summing to 1), on one channel."""
    import pydeform

    host = bc.host_inputs(case)
    host = dict(host, input=np.ascontiguousarray(host["input"][:, :1], np.float64), rois=host["rois"].astype(np.float64))
    count, pooled = len(host["rois"]), case.options["output_size"]
    grad = pydeform.roi_align_backward(np.ones((count, 1, pooled, pooled)), host["input"], host["rois"],
                                       **case.options).input
    read = int(np.count_nonzero(grad))
    assert 0 < read < grad.size
    assert case.floor(host, 8) == (read + count * pooled * pooled) * 8


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, -1])
def test_roi_align_floor_at_borders_and_on_pixel_centres(aligned, sampling_ratio):
    """Rois reaching past the borders (samples beyond -1 and H are not read, those in [-1, 0)
    read row 0) and samples exactly on pixels (the next pixel has weight 0 and is not read)."""
    import pydeform

    rois = np.array([[0, -30.0, -9.0, 14.0, 6.0], [0, 0.0, 0.0, 12.0, 6.0], [0, 10.0, 3.0, 40.0, 25.0],
                     [1, 2.5, 1.0, 14.5, 13.0], [1, -4.0, -1.0, 3.0, 2.0]])
    host = {"input": np.ones((2, 1, 9, 11)), "rois": rois}
    options = dict(output_size=3, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)
    grad = pydeform.roi_align_backward(np.ones((len(rois), 1, 3, 3)), host["input"], rois, **options).input
    floor = bc.roi.roi_align_floor(3, 1.0, sampling_ratio, aligned)
    assert floor(host, 8) == (np.count_nonzero(grad) + len(rois) * 9) * 8


def test_roi_case_boxes_have_the_standard_sizes():
    rois = bc.random_rois(np.random.default_rng(0), bc.GPU_ROIS, bc.GPU_ROI_MAP)
    image_height, image_width = (size * bc.STRIDE for size in bc.GPU_ROI_MAP[2:])
    sides = rois[:, 3:] - rois[:, 1:3]
    assert rois.shape == (bc.GPU_ROIS, 5) and set(np.unique(rois[:, 0])) == {0, 1}
    assert sides.min() >= bc.ROI_SIDES[0] - 1e-3 and sides.max() <= bc.ROI_SIDES[1] + 1e-3
    assert rois[:, 1:3].min() >= 0
    assert np.all(rois[:, 3] <= image_width) and np.all(rois[:, 4] <= image_height)


def test_device_inputs_cast_data_but_keep_boxes_and_labels():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    host = {"input": np.ones((2, 3), np.float32), "rois": np.full((1, 5), 300.25, np.float32),
            "boxes": np.ones((1, 2, 4), np.float32), "labels": np.zeros((1, 2), np.int64)}
    converted = bc.device_inputs(host, "bfloat16")
    assert converted["input"].dtype == ml_dtypes.bfloat16
    assert converted["rois"].dtype == converted["boxes"].dtype == np.float32
    assert converted["labels"].dtype == np.int64 and converted["rois"][0, 1] == 300.25


def test_alternating_medians_times_every_function():
    calls = []
    medians = bc.alternating_medians([lambda: calls.append("a"), lambda: calls.append("b")], rounds=2)
    assert len(medians) == 2 and all(m >= 0 for m in medians)
    # Per round: one untimed call, then a block of timed ones, for each function in turn.
    assert calls == (["a"] * (bc.BLOCK + 1) + ["b"] * (bc.BLOCK + 1)) * 2


class EventClock:
    """A stand-in for the few CuPy calls the GPU timing helpers make: events whose elapsed time
    is the number of calls timed between them, NumPy arrays for device arrays."""

    def __init__(self):
        self.calls = []
        clock = self

        class Event:
            def record(self):
                self.calls_so_far = len(clock.calls)

            def synchronize(self):
                pass

        self.cuda = types.SimpleNamespace(
            Event=Event, get_elapsed_time=lambda start, stop: float(stop.calls_so_far - start.calls_so_far))
        self.uint8, self.ones, self.empty_like = np.uint8, np.ones, np.empty_like

    def copyto(self, target, source):
        self.calls.append("copy")
        np.copyto(target, source)


def test_cuda_median_ms_warms_up_then_times_each_call_between_events():
    clock = EventClock()
    median = bc.cuda_median_ms(clock, clock.calls.append, repeats=4, warmup=2)
    assert clock.calls == [0, 1, 0, 1, 2, 3]  # indices to rotate input sets by
    assert median == 1.0  # one call between the events of each sample


def test_copy_bandwidth_counts_bytes_read_and_written():
    clock = EventClock()
    # Each copy "takes" 1 ms: 2 * 1 MiB per millisecond.
    assert bc.copy_bandwidth(clock, mebibytes=1) == 2 * 2**20 / 1e-3
    assert clock.calls.count("copy") == 25  # 5 warm-up calls and 20 timed ones


def test_cases_without_peer_say_so():
    case = bc.cases("deform_roi_pool", "cpu")[0]
    with pytest.raises(bc.PeerUnavailable, match="deform_roi_pool has no peer"):
        bc.peer_calls(case, bc.host_inputs(case), "float32")


def float32_bins_differ(rois, spatial_scale, pooled):
    """Per roi: whether roi_pool's bin edges computed as ORT and torchvision do, in float32 from
    the rounded bin size, differ from the exact ones of docs/roi.md (pydeform), e.g. a 57-pixel roi in 7
    bins: 7 * float32(57 / 7) = 57.000003, whose ceil includes one pixel more."""
    ends = np.sign(rois[:, 1:]) * np.floor(np.abs(rois[:, 1:] * spatial_scale) + 0.5)
    sizes = np.maximum(ends[:, 2:] - ends[:, :2] + 1, 1)[:, :, None]  # [K, 2, 1]
    steps = np.arange(pooled + 1)
    rounded = steps.astype(np.float32) * (sizes.astype(np.float32) / np.float32(pooled))
    exact = steps * sizes / pooled
    return ((np.floor(rounded) != np.floor(exact)) | (np.ceil(rounded) != np.ceil(exact))).any(axis=(1, 2))


def sorted_rows(detections):
    """``[B, K, 6]`` detections with each image's rows in lexicographic order: equal scores
    may come in any order from torch.topk."""
    return np.stack([image[np.lexsort(image.T[::-1])] for image in np.asarray(detections, np.float64)])


@pytest.mark.parametrize("case", [case for case in bc.cases(device="cpu")
                                  if case.peer and case.op not in bc.levelset.OPS], ids=lambda case: case.id)
def test_cpu_peers_compute_the_benchmarked_op(case):
    """ONNX Runtime / the PyTorch decode and pydeform compute the same thing on the case's data
    (MaxRoiPool: apart from the rois whose float32 bin edges differ from the exact ones). The
    level-set peers (seconds at the standard shapes): tests/test_benchmark_levelset.py."""
    host = bc.host_inputs(case)
    try:
        peer = bc.peer_calls(case, host, "float32").forward
    except bc.PeerUnavailable as error:
        pytest.skip(str(error))
    expected = bc.pydeform_calls(case, bc.device_inputs(host, "float32")).forward()
    actual = np.asarray(peer())
    if case.op == "centernet_decode":
        expected, actual = sorted_rows(expected), sorted_rows(actual)
        assert len(np.unique(expected[:, :, 4])) > 10  # scores are not all tied
    if case.op == "roi_pool":
        keep = ~float32_bins_differ(host["rois"], case.options["spatial_scale"], case.options["output_size"])
        assert keep.sum() > 0.9 * len(keep)
        expected, actual = expected[keep], actual[keep]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_torch_decode_on_a_planted_heatmap():
    """The PyTorch decode peer on a hand-built case: three peaks of distinct scores, one of them
    beside a larger neighbour (not a peak), boxes from wh and reg."""
    torch = pytest.importorskip("torch")
    heat = np.zeros((1, 2, 5, 6), np.float32)
    heat[0, 0, 1, 2] = 0.9
    heat[0, 1, 3, 4] = 0.7
    heat[0, 1, 3, 5] = 0.8  # the neighbour of 0.7 suppresses it
    heat[0, 0, 4, 0] = 0.5
    wh = np.zeros((1, 2, 5, 6), np.float32)
    wh[0, :, 1, 2], wh[0, :, 3, 5], wh[0, :, 4, 0] = (4, 2), (2, 6), (1, 1)
    reg = np.full((1, 2, 5, 6), 0.25, np.float32)
    detections = bc.torch_centernet_decode(*(torch.from_numpy(a) for a in (heat, wh, reg)), K=4).numpy()
    expected = [[0.25, 0.25, 4.25, 2.25, 0.9, 0],
                [4.25, 0.25, 6.25, 6.25, 0.8, 1],
                [-0.25, 3.75, 0.75, 4.75, 0.5, 0]]
    np.testing.assert_allclose(detections[0, :3], expected, rtol=1e-6)
    assert detections[0, 3, 4] == 0


def test_the_suite_has_a_gpu_and_a_cpu_class_for_every_op(suite):
    common = suite("common")
    covered = {"gpu": set(), "cpu": set()}
    for module in ("deform_conv", "roi", "centernet", "deform_unet", "semiconv", "levelset"):
        for name, value in vars(suite(module)).items():
            if isinstance(value, type) and not name.startswith("_") and getattr(value, "op", None):
                bases = [device for device, base in (("gpu", common._GpuOp), ("cpu", common._CpuOp))
                         if issubclass(value, base)]
                assert len(bases) == 1, name
                covered[bases[0]].add(value.op)
    assert covered == {"gpu": set(bc.OPS), "cpu": set(bc.OPS)}


def test_cpu_benchmark_classes_run(suite):
    """asv's calls of a CPU benchmark class: setup, then the timed call (small: the targets)."""
    centernet = suite("centernet")
    benchmark = centernet.CenterNetTargetsCpu()
    params = [values[0] for values in benchmark.params]
    benchmark.setup(*params)
    benchmark.time_call(*params)
    assert centernet.CenterNetDecodeCpu.params[-1] == ["pydeform", "peer"]
    assert centernet.CenterNetFocalLossCpu.params[1] == ["forward", "forward+backward"]


def test_gpu_benchmarks_skip_without_a_gpu(suite):
    common = suite("common")
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present")
    except Exception:
        pass
    benchmark = suite("centernet").CenterNetDecodeGpu()
    with pytest.raises(NotImplementedError, match="no CUDA GPU"):
        benchmark.setup("B8-C80-128x128-K100", "float32", common.FORWARD, "pydeform-cupy")


@pytest.mark.gpu
def test_gpu_benchmark_classes_track_time_memory_and_the_floor(suite):
    benchmark = suite("centernet").CenterNetDecodeGpu()
    params = ("B8-C80-128x128-K100", "float32", "forward", "pydeform-cupy")
    benchmark.setup(*params)
    assert benchmark.track_ms(*params) > 0
    assert benchmark.track_peak_extra_memory_mib(*params) >= 0
    floor = suite("floors").BandwidthFloorGpu()
    for case_id in floor.params[0]:
        floor.setup(case_id, "float32", "pydeform-cupy")
        assert 0 < floor.track_fraction(case_id, "float32", "pydeform-cupy") <= 1.5


@pytest.mark.gpu
@pytest.mark.parametrize("case", [case for case in bc.cases(device="gpu")
                                  if case.peer and "roi_pool" not in case.op and case.op not in bc.levelset.OPS],
                         ids=lambda case: case.id)
def test_gpu_peers_compute_the_benchmarked_op(case):
    """The GPU twin of test_cpu_peers_compute_the_benchmarked_op (the pools' float32 bin edges
    differ from pydeform's exact ones, see float32_bins_differ)."""
    import cupy

    host = bc.host_inputs(case)
    try:
        peer = bc.peer_calls(case, host, "float32").forward
    except bc.PeerUnavailable as error:
        pytest.skip(str(error))
    expected = cupy.asnumpy(bc.pydeform_calls(case, bc.device_inputs(host, "float32", cupy)).forward())
    actual = peer().cpu().numpy()
    if case.op == "centernet_decode":
        expected, actual = sorted_rows(expected), sorted_rows(actual)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_instance_mean_loss_case_computes_the_peers_gradient(device):
    """The loss case's forward + backward (the backward taking the forward's statistics) and
    the PyTorch peer's autograd give the same gradient, on small inputs of the case's kind (the
    GPU case's calls run on the CPU arrays here: only the device of the peer's tensors differs)."""
    torch = pytest.importorskip("torch")
    case = bc.cases("instance_mean_loss", device)[0]
    rng = np.random.default_rng(1)
    host = {"psi": rng.standard_normal((2, 3, 9, 7)).astype(np.float32),
            "labels": bc.semiconv.block_labels(rng, 2, 9, case.options["num_instances"])[:, :, :7].copy(),
            "grad_output": np.asarray(1.5, np.float32)}
    ours = bc.pydeform_calls(case, bc.device_inputs(host, "float32")).forward_backward()
    psi = torch.from_numpy(host["psi"]).requires_grad_()
    loss = bc.torch_instance_mean_loss(psi, torch.from_numpy(host["labels"]), case.options["num_instances"])
    (expected,) = torch.autograd.grad(loss, [psi], torch.tensor(1.5))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-7)
