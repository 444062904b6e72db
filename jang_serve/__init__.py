"""jang-serve: an OpenAI-compatible server for JANG mixed-precision models on MLX.

The code lives in the top-level folders server/, engine/, kernels/ and quantize/, installed as
jang_serve.server, jang_serve.engine, jang_serve.kernels and jang_serve.quantize.
"""

__version__ = "0.1.0"
