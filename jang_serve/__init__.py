"""jang-serve: an OpenAI-compatible server for JANG mixed-precision models on MLX.

The code lives in the top-level folders server/, engine/, kernels/ and quantize/, installed as
jang_serve.server, jang_serve.engine, jang_serve.kernels and jang_serve.quantize.
"""

from ._blas import preload as _preload_blas

__version__ = "0.1.0"

_preload_blas()  # before anything of ours imports MLX
