"""CUDA C sources of cpattn, compiled at run time through CuPy (NVRTC). Installed as
``cpattn.raw_kernels``; read them with ``importlib.resources``."""
