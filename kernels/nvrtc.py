"""Compile CUDA source to a cubin for an exact architecture with NVRTC (through ctypes), for kernels that
MLX's own JIT cannot build: `mx.fast.cuda_kernel` compiles for the plain `sm_90` target, and Hopper's
warpgroup instructions (wgmma) need `sm_90a`. The cubin runs through `mx.fast.precompiled_cuda_kernel`.

NVRTC is the library MLX's CUDA backend itself depends on (the `nvidia-cuda-nvrtc` wheel), so it is
wherever MLX runs on CUDA. Sources compiled here include no headers. Cubins are cached in memory and on
disk ($JANG_SERVE_CUBIN_CACHE, default $JANG_SERVE_HOME/cubin, ~/.cache/jang-serve/cubin), keyed by a hash of
the source, the options and the NVRTC version.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys

_lib = None
_mem: dict[str, bytes] = {}


class NvrtcError(RuntimeError):
    pass


def _candidates() -> list[str]:
    found = []
    for base in sys.path:
        for pat in ("nvidia/cu13/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*", "nvidia/*/lib/libnvrtc.so*"):
            found += sorted(glob.glob(os.path.join(base, pat)))
    found = [p for p in found if "builtins" not in os.path.basename(p)]
    return found + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]


def library():
    """The loaded NVRTC library; NvrtcError where there is none."""
    global _lib
    if _lib is None:
        errors = []
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path)
                lib.nvrtcGetErrorString.restype = ctypes.c_char_p
                _lib = lib
                break
            except OSError as e:
                errors.append(f"{path}: {e}")
        if _lib is None:
            raise NvrtcError("NVRTC not found (" + "; ".join(errors[-3:]) + ")")
    return _lib


def version() -> tuple[int, int]:
    lib = library()
    a, b = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b))
    return a.value, b.value


def _check(lib, rc, what, prog=None):
    if rc != 0:
        log = ""
        if prog is not None:
            n = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
            buf = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
        raise NvrtcError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}\n{log[-4000:]}")


def _cache_dir() -> str:
    home = os.environ.get("JANG_SERVE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "jang-serve")
    return os.environ.get("JANG_SERVE_CUBIN_CACHE") or os.path.join(home, "cubin")


def compile_cubin(source: str, name: str, arch: str = "sm_90a", options: tuple[str, ...] = ()) -> bytes:
    """The cubin of `source` for `arch` (a real architecture such as sm_90a)."""
    opts = (f"--gpu-architecture={arch}", "--std=c++17", "-default-device") + tuple(options)
    key = hashlib.sha256("\0".join((source, name) + opts + (repr(version()),)).encode()).hexdigest()[:32]
    if key in _mem:
        return _mem[key]
    path = os.path.join(_cache_dir(), key + ".cubin")
    try:
        with open(path, "rb") as f:
            _mem[key] = f.read()
            return _mem[key]
    except OSError:
        pass
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        _check(lib, lib.nvrtcCompileProgram(prog, len(opts), copts), f"compiling {name}", prog)
        n = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(n)), "nvrtcGetCUBINSize")
        buf = ctypes.create_string_buffer(n.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        cubin = buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    _mem[key] = cubin
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    except OSError:
        pass
    return cubin
