"""CuPy RawKernel backends: CUDA C sources (``*.cu``, ``*.cuh``) compiled with NVRTC at first use.

Each kernel-set module declares a ``KERNELS`` manifest (its ``.cu`` file and kernel templates);
compilation and the tests' compile check both read it.
"""
