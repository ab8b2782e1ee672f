"""CPU speed of pydeform's level-set ops against scikit-image, timed side by side in one process
(median of repeated calls after one untimed call each), with a check that the results agree:

- morphological_chan_vese, 512x512 (scikit-image's ``camera``), 35 iterations, smoothing 3;
- morphological_geodesic_active_contour, 512x512 (inverse_gaussian_gradient of ``camera``),
  100 iterations, balloon -1;
- morphological_chan_vese 3-D, 64^3 integer volume, 10 iterations;
- chan_vese, 512x512 ``camera``, 200 iterations (tol 0);
- batched morphological_chan_vese, 64 images of 128x128 in one call, per image, against the
  single-image call.

Usage: ``python asv_benchmarks/compare_levelset_cpu.py [--size S] [--repeats R] [--best]
[--cpu-time] [--threads T]`` (S: the 2-D side, default 512; the volume side is S / 8, the batched
images S / 4; ``--best``: the fastest call of each side instead of the median, the figure closest
to an idle machine on a shared one; ``--cpu-time``: the process's CPU time instead of the wall
clock, which leaves out the time the process waits for a core on a loaded machine: a long call,
such as the batched one, is otherwise more often interrupted than a short one; the snakes and
scikit-image run on one thread, the Chan-Vese step on Numba's threads, whose CPU time adds up
over the threads; ``--threads``: ``numba.set_num_threads(T)`` first, default Numba's own count).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pydeform


def call_seconds(function, repeats: int, best: bool = False, clock=time.perf_counter) -> float:
    """The median (or with ``best`` the least) seconds of ``repeats`` calls after one untimed."""
    function()
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        times.append(clock() - start)
    return float(np.min(times) if best else np.median(times))


def _reset_phase(morphsnakes):
    """scikit-image keeps the smoothing phase in module state: start every call at phase 0."""
    operators = [lambda u: morphsnakes.sup_inf(morphsnakes.inf_sup(u)),
                 lambda u: morphsnakes.inf_sup(morphsnakes.sup_inf(u))]
    morphsnakes._curvop = morphsnakes._fcycle(operators)


def measure(size: int = 512, repeats: int = 3, best: bool = False, cpu_time: bool = False) -> dict:
    """Median (``best``: least) seconds of each call (``cpu_time``: CPU seconds), the ratios
    (scikit-image / pydeform, single / batched per image) and whether the results agree."""
    clock = time.process_time if cpu_time else time.perf_counter
    from skimage import data, transform
    from skimage.segmentation import chan_vese, morphological_chan_vese, morphological_geodesic_active_contour
    from skimage.segmentation import morphsnakes

    camera = data.camera()
    if camera.shape != (size, size):
        camera = (transform.resize(camera, (size, size), preserve_range=True)).astype(np.uint8)
    gimage = pydeform.inverse_gaussian_gradient(camera / 255.0)
    rng = np.random.default_rng(0)
    side = max(size // 8, 4)
    volume = (np.indices((side,) * 3).sum(0) // 6 % 5 * 40 + rng.integers(0, 30, (side,) * 3)).astype(np.uint8)
    batch_side = max(size // 4, 4)
    batch = np.stack([(transform.resize(camera, (batch_side, batch_side), preserve_range=True) + 3 * i)
                      .astype(np.int64) for i in range(64)])

    def skimage_call(function, *args, **kwargs):
        def call():
            _reset_phase(morphsnakes)
            return function(*args, **kwargs)
        return call

    cases = {
        "ACWE 2-D, 35 it, smoothing 3": (
            lambda: pydeform.morphological_chan_vese(camera, 35, smoothing=3),
            skimage_call(morphological_chan_vese, camera, 35, smoothing=3)),
        "GAC 2-D, 100 it, balloon -1": (
            lambda: pydeform.morphological_geodesic_active_contour(gimage, 100, balloon=-1),
            skimage_call(morphological_geodesic_active_contour, gimage, 100, balloon=-1)),
        "ACWE 3-D, 10 it": (
            lambda: pydeform.morphological_chan_vese(volume, 10),
            skimage_call(morphological_chan_vese, volume, 10)),
        "Chan-Vese 2-D, 200 it": (
            lambda: pydeform.chan_vese(camera, tol=0.0, max_num_iter=200),
            lambda: chan_vese(camera, tol=0.0, max_num_iter=200)),
    }
    times, ratios, agree = {}, {}, {}
    for name, (ours, theirs) in cases.items():
        times[f"{name} pydeform"] = call_seconds(ours, repeats, best, clock)
        times[f"{name} scikit-image"] = call_seconds(theirs, repeats, best, clock)
        ratios[name] = times[f"{name} scikit-image"] / times[f"{name} pydeform"]
        agree[name] = bool(np.array_equal(ours(), theirs()))

    batched = call_seconds(lambda: pydeform.morphological_chan_vese(batch, 35, smoothing=3, batched=True),
                           repeats, best, clock) / len(batch)
    single = call_seconds(lambda: pydeform.morphological_chan_vese(batch[0], 35, smoothing=3), repeats, best, clock)
    times["ACWE batched 64 images, per image"] = batched
    times["ACWE single image"] = single
    ratios["batched per image vs single"] = single / batched
    looped = np.stack([pydeform.morphological_chan_vese(image, 35, smoothing=3) for image in batch])
    agree["batched vs loop"] = bool(np.array_equal(
        pydeform.morphological_chan_vese(batch, 35, smoothing=3, batched=True), looped))
    return {"times": times, "ratios": ratios, "agree": agree}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="side of the 2-D images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--best", action="store_true", help="report the fastest call, not the median")
    parser.add_argument("--cpu-time", action="store_true", help="time calls by the process's CPU time")
    parser.add_argument("--threads", type=int, help="Numba threads (default: Numba's own count)")
    args = parser.parse_args(argv)
    import numba

    if args.threads is not None:
        numba.set_num_threads(args.threads)
    print(f"Numba threads: {numba.get_num_threads()}")
    result = measure(args.size, args.repeats, args.best, args.cpu_time)
    for name, seconds in result["times"].items():
        print(f"{name:45s} {seconds * 1e3:10.2f} ms")
    for name, ratio in result["ratios"].items():
        print(f"{name:45s} {ratio:10.2f}x")
    for name, same in result["agree"].items():
        print(f"{name:45s} {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
