"""Mixture-of-experts pieces: stacked expert linears (float and quantized), the gated expert MLP,
top-k routing, and stacking of per-expert checkpoint tensors.

Expert weights live stacked as one tensor per projection, [E, out, in] (quantized: packed weight
[E, out, in*bits/32] with scales/biases [E, out, in/group]), under the parameter names mlx-lm uses
(`switch_mlp.{gate_proj,up_proj,down_proj}.{weight,scales,biases}`), so mlx-lm and JANG MoE
bundles load as they are. Each token multiplies only its k chosen experts via `mx.gather_mm` /
`kernels.gather_qmm` (mx.gather_qmm, or the gathered CUDA/Metal GEMV where it wins).
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn

from jang_serve.kernels import gather_qmm

# Below this many (token, expert) pairs, sorting the pairs by expert costs more than it saves.
_SORT_THRESHOLD = 64


class SwitchLinear(nn.Module):
    """E stacked linears; row i of x goes through expert indices[i]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x, indices, sorted_indices: bool = False):
        # x: [..., 1, in]; indices: [...] -> [..., 1, out]
        w = self.weight
        if w.dtype == mx.bfloat16 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm has no bfloat16 kernel: compute in float32 (slow, but correct).
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=indices,
                             sorted_indices=sorted_indices).astype(x.dtype)
        else:
            y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QSwitchLinear":
        return QSwitchLinear.from_switch(self, bits, group_size)


class QSwitchLinear(nn.Module):
    """SwitchLinear on MLX affine-quantized expert weights (names weight/scales/biases as mlx-lm)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool, bits: int,
                 group_size: int):
        super().__init__()
        if input_dims % group_size:
            raise ValueError(f"input dim {input_dims} is not a multiple of group size {group_size}")
        self.bits, self.group_size = bits, group_size
        self.weight = mx.zeros((num_experts, output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((num_experts, output_dims, input_dims // group_size))
        self.biases = mx.zeros((num_experts, output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @classmethod
    def from_switch(cls, lin: SwitchLinear, bits: int, group_size: int) -> "QSwitchLinear":
        e, out_d, in_d = lin.weight.shape
        q = cls(in_d, out_d, e, "bias" in lin, bits, group_size)
        q.weight, q.scales, q.biases = mx.quantize(lin.weight, group_size=group_size, bits=bits)
        if "bias" in lin:
            q.bias = lin.bias
        return q

    def __call__(self, x, indices, sorted_indices: bool = False):
        # kernels.gather_qmm: the expert-gathered GEMV kernel on a GPU where it wins, else mx.gather_qmm
        y = gather_qmm(x, self.weight, self.scales, self.biases, indices, self.bits, self.group_size,
                       sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y


class SwitchGLU(nn.Module):
    """Gated expert MLP: down(act(gate(x)) * up(x)) through each token's chosen experts."""

    def __init__(self, dim: int, hidden: int, num_experts: int, act=nn.silu, bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden, num_experts, bias)
        self.up_proj = SwitchLinear(dim, hidden, num_experts, bias)
        self.down_proj = SwitchLinear(hidden, dim, num_experts, bias)
        self.act = act

    def __call__(self, x, indices):
        """x: [T, D]; indices: [T, k] expert ids -> [T, k, D] (one output per chosen expert)."""
        t, k = indices.shape
        flat = indices.reshape(-1)
        do_sort = flat.size >= _SORT_THRESHOLD
        if do_sort:
            # Group the (token, expert) pairs by expert so each expert's weights are read once.
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            xs = x[order // k][:, None, :]
            idx = flat[order]
        else:
            xs = mx.expand_dims(x, (1, 2))  # [T, 1, 1, D] broadcasts against indices [T, k]
            idx = indices
        h = self.act(self.gate_proj(xs, idx, do_sort)) * self.up_proj(xs, idx, do_sort)
        y = self.down_proj(h, idx, do_sort)
        if do_sort:
            return y[inv][:, 0, :].reshape(t, k, -1)
        return y[..., 0, :]


def route_topk(logits: mx.array, k: int, normalize: bool) -> tuple[mx.array, mx.array]:
    """Softmax routing: the k most probable experts per token and their weights (renormalized to
    sum to 1 when `normalize`). logits [T, E] -> (indices [T, k], weights [T, k] float32)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]
    weights = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return inds, weights


def stack_experts(weights: dict, prefix: str, num_experts: int, names: dict[str, str]) -> dict:
    """Stack per-expert tensors `{prefix}.experts.{e}.{src}.{suffix}` into
    `{prefix}.switch_mlp.{dst}.{suffix}` for every src -> dst in `names` and every suffix present
    (weight, scales, biases, bias). Also splits the transformers-5 fused layout
    `{prefix}.experts.gate_up_proj` [E, 2I, D] / `{prefix}.experts.down_proj` [E, D, I]."""
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in weights:
        gu = weights.pop(fused)
        half = gu.shape[1] // 2
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gu[:, :half]
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = gu[:, half:]
        weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
        return weights
    pat = re.compile(re.escape(prefix) + r"\.experts\.(\d+)\.([^.]+)\.(\w+)$")
    found: dict[tuple[str, str], dict[int, mx.array]] = {}
    for key in [k for k in weights if k.startswith(prefix + ".experts.")]:
        m = pat.match(key)
        if m and m.group(2) in names:
            found.setdefault((m.group(2), m.group(3)), {})[int(m.group(1))] = weights.pop(key)
    for (src, suffix), per in found.items():
        missing = sorted(set(range(num_experts)) - set(per))
        if missing:
            raise ValueError(f"{prefix}: experts {missing[:8]} have no {src}.{suffix}")
        weights[f"{prefix}.switch_mlp.{names[src]}.{suffix}"] = mx.stack([per[e] for e in range(num_experts)])
    return weights
