"""pydeform.torch on CUDA tensors (gpu-marked; their CPU twins are tests/test_torch_ops.py,
test_torch_modules.py and test_interop.py): opcheck and float64 gradcheck of every op, results
equal to the CPU ops, float16 / bfloat16 and autocast, PyTorch's stream (a non-default stream
gives the same result without waiting for other streams) and allocator, a second device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pt = pytest.importorskip("pydeform.torch")

from test_torch_ops import DIFFERENTIABLE, IDS, _backward_args, _centernet_decode_args  # noqa: E402

pytestmark = pytest.mark.gpu
ops = torch.ops.pydeform


@pytest.fixture(autouse=True)
def _torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")


def _to(args, device, dtype=None):
    """The arguments on ``device`` (floating tensors in ``dtype`` when given), detached copies
    keeping requires_grad."""
    def move(a):
        if not isinstance(a, torch.Tensor):
            return a
        moved = a.detach().to(device=device, dtype=dtype if dtype is not None and a.is_floating_point() else None)
        return moved.requires_grad_(a.requires_grad)

    return tuple(move(a) for a in args)


@pytest.mark.parametrize("name, args", DIFFERENTIABLE, ids=IDS)
def test_cuda_matches_cpu_forward_and_backward(name, args):
    op = getattr(ops, name)
    cpu_args, cuda_args = _to(args, "cpu"), _to(args, "cuda")
    expected, got = op(*cpu_args), op(*cuda_args)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad.cuda())
    for c, g in zip(cpu_args, cuda_args):
        if isinstance(c, torch.Tensor) and c.requires_grad:
            torch.testing.assert_close(g.grad.cpu(), c.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, args", DIFFERENTIABLE, ids=IDS)
def test_cuda_opcheck_and_gradcheck(name, args):
    forward = getattr(ops, name).default
    cuda_args = _to(args, "cuda")
    torch.library.opcheck(forward, cuda_args)
    torch.library.opcheck(getattr(ops, name + "_backward").default, _backward_args(forward, cuda_args),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert torch.autograd.gradcheck(lambda *a: forward(*a), cuda_args, eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


def test_cuda_centernet_decode_matches_cpu():
    args = _centernet_decode_args()
    torch.testing.assert_close(ops.centernet_decode(*_to(args, "cuda")).cpu(), ops.centernet_decode(*args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, args", DIFFERENTIABLE, ids=IDS)
def test_half_precision_runs_natively(name, args, dtype):
    op = getattr(ops, name)
    half = list(_to(args, "cuda", dtype))
    if name not in ("deform_conv2d", "centernet_focal_loss"):
        half[1] = half[1].float()  # boxes stay float32: pixel coordinates do not fit half precision
    reference = op(*_to(half, "cuda", torch.float32))
    got = op(*half)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
    got.float().sum().backward()
    assert half[0].grad.dtype == dtype and torch.isfinite(half[0].grad.float()).all()


def test_autocast_runs_in_the_autocast_dtype():
    conv = pt.DeformConv2d(4, 8, 3, padding=1).cuda()
    x = torch.randn(2, 4, 9, 9, device="cuda")
    offset = torch.randn(2, 18, 9, 9, device="cuda")
    rois = torch.tensor([[0, 1.0, 1.0, 7.5, 6.0], [1, 0.5, 2.0, 8.0, 8.5]], device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            features = conv(x, offset)
            pooled = pt.roi_align(features, rois, 2, 1.0, 2)
        assert features.dtype == dtype and pooled.dtype == dtype
        pooled.float().sum().backward()
        assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()
        conv.zero_grad()


def test_non_default_stream_same_result_without_waiting_for_other_streams():
    case_args = _to(DIFFERENTIABLE[0][1], "cuda")
    op = ops.deform_conv2d
    expected = op(*case_args)  # also compiles the kernels, outside the timed region
    torch.cuda.synchronize()
    source = case_args[0].detach()
    side, work = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time on another stream
        side_done = torch.cuda.Event()
        side_done.record()
    with torch.cuda.stream(work):
        # The input is written on `work` after a delay: an op on another stream would read zeros.
        x = torch.zeros_like(source)
        torch.cuda._sleep(50_000_000)
        x.copy_(source)
        out = op(x, *case_args[1:])
    assert not side_done.query(), "the op waited for another stream (device-wide synchronisation)"
    work.synchronize()
    torch.testing.assert_close(out, expected)
    side.synchronize()


def test_outputs_and_scratch_come_from_torch_allocator():
    import cupy

    args = _to(DIFFERENTIABLE[0][1], "cuda")
    ops.deform_conv2d(*args)  # warm-up: compilation
    pool = cupy.get_default_memory_pool()
    before = pool.total_bytes()
    with torch.no_grad():
        out = ops.deform_conv2d(*args)
        grads = ops.deform_conv2d_backward(torch.ones_like(out), *args)
    torch.cuda.synchronize()
    assert pool.total_bytes() == before, "CuPy's own pool allocated memory for a torch call"
    assert all(g.device == out.device for g in grads)


def test_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    name, args = DIFFERENTIABLE[0]
    expected = ops.deform_conv2d(*_to(args, "cpu"))
    current = torch.cuda.current_device()
    got = ops.deform_conv2d(*_to(args, "cuda:1"))
    assert got.device == torch.device("cuda", 1) and torch.cuda.current_device() == current
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)
    rois = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    pooled = pt.roi_align(args[0].detach().to("cuda:1"), rois.to("cuda:1"), 2, 1.0, 2)
    torch.testing.assert_close(pooled.cpu(), pt.roi_align(args[0].detach(), rois, 2, 1.0, 2))


def test_compiled_model_on_cuda_matches_eager():
    from test_torch_modules import _Detector

    torch.manual_seed(0)
    model = _Detector().cuda()
    x = torch.randn(2, 2, 6, 6, device="cuda")
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 8.0], [1, 0.0, 2.0, 6.0, 11.0]], device="cuda")
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, rois), model(x, rois))


def test_box_values_are_not_checked_on_the_host():
    """On CUDA tensors the ops make no device-to-host read to check box values (that would
    synchronise; it is the only host read of a RoI call): bad rois give 0 outputs instead of
    the error the check would raise (CPU twin: tests/test_unchecked_values.py)."""
    x = torch.randn(2, 3, 6, 6, device="cuda")
    rois = torch.tensor([[0, 1.2, 0.7, 4.1, 5.3], [2, 1.0, 1.0, 3.0, 3.0], [0, float("nan"), 1.0, 3.0, 3.0]],
                        device="cuda")
    out = pt.roi_align(x, rois, output_size=2, sampling_ratio=-1, aligned=True)
    expected = pt.roi_align(x.cpu(), rois[:1].cpu(), output_size=2, sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(out[:1].cpu(), expected)
    assert (out[1:] == 0).all()
    with pytest.raises(ValueError, match="rois: row 1"):
        pt.roi_align(x.cpu(), rois.cpu(), output_size=2, sampling_ratio=-1, aligned=True)
