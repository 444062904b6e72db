"""Sharding a sparse MoE feed-forward (engine/models/moe.py: router `gate` + SwitchGLU `switch_mlp`).

Every rank keeps all experts and the (replicated) router, but only a slice of each expert's
intermediate size: gate/up_proj rows [i0, i1) of every expert, down_proj the same input columns.
The top-k mixture is linear in the down projections, so the partial mixtures of the ranks add up
to the full one: one all_sum after the whole MoE block, as for a dense MLP. Quantized experts
(QSwitchLinear: packed [E, out, in*bits/32] + scales/biases [E, out, in/group]) are cut on groups.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from jang_serve.engine.models.switch import QSwitchLinear, SwitchLinear

from .shard_load import take


def _quant(sw) -> bool:
    return "scales" in sw and hasattr(sw, "bits")


def expert_in_features(sw) -> int:
    return sw.weight.shape[2] * 32 // sw.bits if _quant(sw) else sw.weight.shape[2]


def expert_rows(sw, r0: int, r1: int):
    """Output rows [r0, r1) of every expert."""
    e, _, _ = sw.weight.shape
    bias = "bias" in sw
    if _quant(sw):
        out = QSwitchLinear(expert_in_features(sw), r1 - r0, e, bias, sw.bits, sw.group_size)
        out.weight, out.scales, out.biases = (take(getattr(sw, n), slice(None), slice(r0, r1))
                                              for n in ("weight", "scales", "biases"))
    else:
        out = SwitchLinear(sw.weight.shape[2], r1 - r0, e, bias)
        out.weight = take(sw.weight, slice(None), slice(r0, r1))
    if bias:
        out.bias = take(sw.bias, slice(None), slice(r0, r1))
    return out


def expert_cols(sw, c0: int, c1: int, keep_bias: bool):
    """Input columns [c0, c1) of every expert; the bias only where keep_bias (rank 0), since the
    ranks' outputs are summed."""
    from .sharding import ShardError

    e, out_d, _ = sw.weight.shape
    bias = "bias" in sw and keep_bias
    if _quant(sw):
        gs, bits = sw.group_size, sw.bits
        if c0 % gs or c1 % gs:
            raise ShardError(f"expert input columns {c0}..{c1} do not fall on the quantization groups of {gs}")
        out = QSwitchLinear(c1 - c0, out_d, e, bias, bits, gs)
        out.weight = take(sw.weight, slice(None), slice(None), slice(c0 * bits // 32, c1 * bits // 32))
        out.scales, out.biases = (take(getattr(sw, n), slice(None), slice(None), slice(c0 // gs, c1 // gs))
                                  for n in ("scales", "biases"))
    else:
        out = SwitchLinear(c1 - c0, out_d, e, bias)
        out.weight = take(sw.weight, slice(None), slice(None), slice(c0, c1))
    if bias:
        out.bias = sw.bias
    return out


class AllSumAfter(nn.Module):
    """Runs a module on this rank's shard and sums its output over the group."""

    def __init__(self, inner, group):
        super().__init__()
        self.inner, self.group = inner, group

    def __call__(self, x):
        return mx.distributed.all_sum(self.inner(x), group=self.group)


def shard_moe(moe, group, rank: int, size: int, split_range, unit) -> tuple[nn.Module, int]:
    """(the MoE block wrapped in AllSumAfter, this rank's expert intermediate size)."""
    sw = moe.switch_mlp
    n = expert_in_features(sw.down_proj)
    i0, i1 = split_range(n, size, rank, unit(sw.down_proj, n, size))
    sw.gate_proj, sw.up_proj = expert_rows(sw.gate_proj, i0, i1), expert_rows(sw.up_proj, i0, i1)
    sw.down_proj = expert_cols(sw.down_proj, i0, i1, keep_bias=rank == 0)
    return AllSumAfter(moe, group), i1 - i0
