"""Numba kernels: per-item arithmetic written once, compiled for the CPU and for CUDA."""
