"""GPTQ in MLX's per-group affine format, layer by layer on calibration activations.

For each transformer layer, in order: load its float weights, run the calibration hidden states
through it while accumulating H = X^T X for the input of every linear, quantize each linear with
GPTQ, then run the calibration states through the *quantized* layer to get the next layer's inputs
(so later layers see, and correct for, the error of earlier ones).

GPTQ itself (Frantar et al.): columns are quantized one at a time and the rounding error of each is
spread over the not-yet-quantized columns through the Cholesky factor of the damped inverse
Hessian. Each group's scale and bias are fixed when the column loop reaches the group's first
column (from the already-updated weights, with the MSE clip search), so the result is exactly
representable as MLX affine groups. With act_order, columns go in decreasing Hessian-diagonal
order and the group parameters are fixed up front from the original weights (static groups).
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import affine
from .roles import module_path

BLOCK = 128
_MLP_IN = re.compile(r"(^|\.)(gate_proj|up_proj|gate_up_proj|w1|w3|fc1|c_fc)$")
# smallest clip factor of the group-range search per width (1.0 = plain min/max); see clip_search
MIN_SHRINK: dict[int, float] = {}


def single_thread_blas() -> None:
    """numpy's OpenBLAS spins its threads against each other on a small shared CPU (a 896x896
    Cholesky takes 1 s with threads, 0.1 s without); GPTQ's small factorizations run best on one."""
    import ctypes
    import glob
    import os

    for lib in glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*")):
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for fn in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(dll, fn):
                getattr(dll, fn)(1)
                return


def gptq_quantize(w: np.ndarray, H: np.ndarray, bits: int, group_size: int, damp: float = 0.01,
                  act_order: bool = False):
    """w [out, in] float32, H [in, in] -> (codes uint8 [out, in], scales [out, G], biases [out, G])
    with scales/biases already rounded to float16."""
    W = np.array(w, dtype=np.float32, copy=True)
    out_d, in_d = W.shape
    n = 2**bits - 1
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ng = in_d // group_size
    S = np.zeros((out_d, ng), np.float32)
    Bz = np.zeros((out_d, ng), np.float32)
    codes = np.zeros((out_d, in_d), np.uint8)

    def group_params(cols: np.ndarray):
        return clip_search(cols, bits, min_shrink=MIN_SHRINK.get(bits, 0.5))

    perm = np.arange(in_d)
    if act_order:
        for g in range(ng):  # static groups from the original weights
            S[:, g], Bz[:, g] = group_params(W[:, g * group_size : (g + 1) * group_size])
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    H[np.diag_indices(in_d)] += damp * np.mean(np.diag(H))
    Hinv = _upper_chol_of_inverse(H)
    Hinv = Hinv.astype(np.float32)
    for i1 in range(0, in_d, BLOCK):
        i2 = min(i1 + BLOCK, in_d)
        W1 = W[:, i1:i2].copy()
        Err = np.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]
            g = col // group_size
            if not act_order and col % group_size == 0:
                S[:, g], Bz[:, g] = group_params(W1[:, i : i + group_size])
            s, b = S[:, g], Bz[:, g]
            x = W1[:, i]
            safe = np.where(s == 0, 1.0, s)
            q = np.clip(np.rint((x - b) / safe), 0, n)
            codes[:, col] = q
            err = (x - (q * s + b)) / Hb[i, i]
            W1[:, i:] -= np.outer(err, Hb[i, i:])
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return codes, S, Bz


def _cuda_torch():
    """torch when it can use a CUDA GPU (MLX CUDA builds link a reference LAPACK on the CPU, whose 4864-wide
    Cholesky takes seconds; torch does it on the GPU in milliseconds), else None."""
    if mx.default_device() != mx.gpu:
        return None  # CPU machines keep the MLX path (and never pay for importing torch)
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _with_damping(H: np.ndarray, factor) -> np.ndarray:
    """factor(shift) -> U for H + shift * I; tried with more damping while H is (near) singular."""
    mean = float(np.mean(np.diag(H)))
    for extra in (0.0, 0.1, 1.0):
        try:
            out = factor(extra * mean)
        except (ValueError, RuntimeError):
            continue
        if np.all(np.isfinite(out)) and np.all(np.diag(out) > 0):
            return out
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with damping")


def _upper_chol_torch(H: np.ndarray, torch, device: str) -> np.ndarray:
    """The same factor as _upper_chol_of_inverse, in float64 with torch on `device`."""
    Ht = torch.from_numpy(np.ascontiguousarray(H, dtype=np.float64)).to(device)
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=device)

    def factor(shift: float) -> np.ndarray:
        L = torch.linalg.cholesky(Ht + shift * eye)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float().cpu().numpy()

    return _with_damping(H, factor)


def _upper_chol_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper-triangular with U^T U = H^-1 (float64 in, float32 out); more damping if H is singular."""
    torch = _cuda_torch()
    if torch is not None:
        return _upper_chol_torch(H, torch, "cuda")
    Hm, eye = mx.array(H.astype(np.float32)), mx.eye(H.shape[0])

    def factor(shift: float) -> np.ndarray:
        Hi = mx.linalg.cholesky_inv(mx.linalg.cholesky(Hm + shift * eye, stream=mx.cpu), stream=mx.cpu)
        return np.array(mx.linalg.cholesky(Hi, upper=True, stream=mx.cpu))

    return _with_damping(H, factor)


def clip_search(cols: np.ndarray, bits: int, grid: int = 10, min_shrink: float = 0.5):
    """Per-row (scale, bias) for one group of columns [rows, gs]: the min/max range shrunk by the
    factor (1 .. min_shrink) with the least squared error; float16-rounded like the stored values."""
    n = 2**bits - 1
    wmin, wmax = cols.min(1), cols.max(1)
    a = np.linspace(1.0, min_shrink, grid, dtype=np.float32)[:, None]
    lo, hi = (a * wmin).astype(np.float16).astype(np.float32), a * wmax
    s = ((hi - lo) / n).astype(np.float16).astype(np.float32)
    safe = np.where(s == 0, 1.0, s)
    q = np.clip(np.rint((cols[None] - lo[..., None]) / safe[..., None]), 0, n)
    err = (((q * s[..., None] + lo[..., None]) - cols[None]) ** 2).sum(-1)  # [grid, rows]
    k = np.argmin(err, 0)
    r = np.arange(cols.shape[0])
    return s[k, r], lo[k, r]


class GPTQRunner:
    """Feeds calibration activations layer by layer during the streaming conversion."""

    def __init__(self, source, ids: list[int], seq_len: int = 512, damp: float = 0.01, act_order: bool = False,
                 minmax_mlp_in_bits: int = 0):
        single_thread_blas()
        self.model = source.model
        self.damp, self.act_order = damp, act_order
        # MLP input projections (gate/up) at this width or below get plain min/max rounding instead of GPTQ:
        # on Qwen2.5-0.5B at 2 bits GPTQ there hurt held-out perplexity (docs/quantizer.md); 0 = off
        self.minmax_mlp_in_bits = int(minmax_mlp_in_bits)
        n = max(1, len(ids) // seq_len)
        self.seqs = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
        self.h = None  # calibration hidden states [T, D]
        self.hess: dict[str, np.ndarray] = {}
        self.tokens = sum(len(s) for s in self.seqs)
        self._quantized: dict[str, mx.array] = {}

    def damping(self, in_dim: int) -> float:
        """The usual 1% of the mean Hessian diagonal, but 10% when the calibration tokens are fewer than
        twice the input dim: H is then (near) singular and light damping lets GPTQ push rounding error
        into directions the calibration text never excites (Qwen2.5-0.5B's 4864-wide down_proj with
        4096 tokens: JANG_2S with 1% damping lost to plain rounding)."""
        return self.damp if self.tokens >= 2 * in_dim else max(self.damp, 0.1)

    def describe(self) -> dict:
        return {"method": "gptq", "tokens": self.tokens, "sequences": len(self.seqs), "damp": self.damp,
                "damp_when_tokens_below_2x_input_dim": max(self.damp, 0.1),
                "act_order": self.act_order, "group_params": "mse clip search per group",
                "minmax_mlp_in_bits": self.minmax_mlp_in_bits}

    def see_group(self, key: int, tensors: dict) -> None:
        if key == -1:
            self.model.load_weights([(k, v) for k, v in tensors.items() if "embed" in k], strict=False)
            toks = mx.array([t for s in self.seqs for t in s], dtype=mx.int32)
            self.h = self.model.embed(toks).astype(mx.float32)
            mx.eval(self.h)

    def _run_block(self, i: int) -> mx.array:
        from jang_serve.engine.attention import ContiguousBackend, ContiguousKV

        block = self.model.model.layers[i]
        pos = mx.array([p for s in self.seqs for p in range(len(s))], dtype=mx.int32)
        caches = [ContiguousKV(self.model.num_layers) for _ in self.seqs]
        out = block(self.h, pos, ContiguousBackend(caches, [len(s) for s in self.seqs]))
        mx.eval(out)
        return out

    def prepare_layer(self, i: int, tensors: dict) -> None:
        if self.h is None:
            raise RuntimeError("GPTQ needs the embeddings before the first layer")
        prefix = f"model.layers.{i}."
        block = self.model.model.layers[i]
        block.load_weights([(k[len(prefix):], v) for k, v in tensors.items() if k.startswith(prefix)], strict=False)
        self.hess = {}
        originals = []
        for path, m in block.named_modules():
            if isinstance(m, nn.Linear):
                originals.append((path, m))
        captured = {}

        class Capture(nn.Module):
            def __init__(self, lin, key):
                super().__init__()
                self.lin, self.key = lin, key

            def __call__(self, x):
                x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
                h = x2.T @ x2
                captured[self.key] = captured[self.key] + h if self.key in captured else h
                return self.lin(x)

        from mlx.utils import tree_unflatten

        block.update_modules(tree_unflatten([(p, Capture(m, prefix + p)) for p, m in originals]))
        try:
            self._run_block(i)
        finally:
            block.update_modules(tree_unflatten(originals))
        self.hess = {k: np.array(v) for k, v in captured.items()}

    def quantize(self, name: str, w: mx.array, bits: int, group_size: int):
        path = module_path(name)
        H = self.hess.get(path)
        if H is None or H.shape[0] != w.shape[1]:
            return affine.quantize(w, bits, group_size, "mse")
        if bits <= self.minmax_mlp_in_bits and _MLP_IN.search(path):
            wq, s16, b16 = affine.quantize(w, bits, group_size, "rtn")
            self._quantized[path] = affine.dequantize(wq, s16, b16, bits, group_size)
            return wq, s16, b16
        codes, s, b = gptq_quantize(np.array(w.astype(mx.float32)), H, bits, group_size,
                                    self.damping(w.shape[1]), self.act_order)
        wq = affine.pack(codes, bits)
        s16, b16 = mx.array(s).astype(affine.STORE_DTYPE), mx.array(b).astype(affine.STORE_DTYPE)
        # the next layer must see this layer's quantized output
        self._quantized[path] = affine.dequantize(wq, s16, b16, bits, group_size)
        return wq, s16, b16

    def finish_layer(self, i: int) -> None:
        prefix = f"model.layers.{i}."
        block = self.model.model.layers[i]
        q = [(k[len(prefix):] + ".weight", v) for k, v in self._quantized.items() if k.startswith(prefix)]
        if q:
            block.load_weights(q, strict=False)
        self.h = self._run_block(i)
        self._quantized = {}
        self.hess = {}


