"""The sensitivity-aware bit allocator: any average-bits budget -> a width per tensor.

1. Sensitivity: the diagonal empirical Fisher of the next-token loss on calibration text,
   F = sum over calibration chunks of (dLoss/dW)^2, from one backward pass per chunk of the float
   model. To second order, quantizing W to W' raises the loss by about 1/2 * sum(F * (W - W')^2).
2. Damage table: for every quantizable tensor and every width b in 2,3,4,5,6,8, the Fisher-weighted
   error D_t(b) of quantizing it at b (RTN, as a fast proxy for the final method).
3. Allocation: start every tensor at 2 bits and repeatedly take the upgrade (to any wider width)
   with the largest damage reduction per extra bit stored, while it fits the budget. Upgrades that
   no longer fit are skipped, so the result lands just under the budget (within one small tensor).

The budget counts nominal bits per weight over every weight matrix, float-kept ones at 16.
"""

from __future__ import annotations

import heapq

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import affine
from .roles import module_path, role

WIDTHS = (2, 3, 4, 5, 6, 8)


def load_float(source):
    """The source's model with its float32 weights loaded; returns (model, {name: weight})."""
    weights = {}
    for _, group in source.groups():
        weights.update(group)
    model = source.model
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model, weights


def fisher(model, ids: list[int], chunk: int = 256) -> dict[str, mx.array]:
    """Diagonal empirical Fisher per parameter name, from squared gradients per chunk of tokens."""
    from jang_serve.engine.attention import ContiguousBackend, ContiguousKV

    def loss_fn(m, toks):
        back = ContiguousBackend([ContiguousKV(m.num_layers)], [toks.shape[0] - 1])
        logits = m(toks[:-1], mx.arange(toks.shape[0] - 1, dtype=mx.int32), back)
        return nn.losses.cross_entropy(logits.astype(mx.float32), toks[1:], reduction="sum")

    vg = nn.value_and_grad(model, loss_fn)
    acc: dict[str, mx.array] = {}
    for s in range(0, max(len(ids) - 1, 1), chunk):
        toks = mx.array(ids[s : s + chunk + 1], dtype=mx.int32)
        if toks.shape[0] < 8:
            break
        _, grads = vg(model, toks)
        for k, g in tree_flatten(grads):
            if g.ndim >= 2:
                acc[k] = acc[k] + g * g if k in acc else g * g
        mx.eval(acc)
    return acc


def damage_table(weights: dict, fish: dict, moe: bool, group_size: int) -> tuple[dict, dict, int]:
    """-> ({path: {bits: damage}}, {path: n_params}, float_params) over quantizable tensors."""
    table, sizes, float_params = {}, {}, 0
    for name, w in weights.items():
        if not name.endswith(".weight") or w.ndim < 2:
            continue
        r = role(name, tuple(w.shape), moe)
        gs = affine.pick_group_size(w.shape[-1], group_size) if r is not None else None
        if r is None or gs is None:
            float_params += w.size
            continue
        f = fish.get(name)
        if f is None:
            f = mx.ones_like(w)
        d = {}
        for b in WIDTHS:
            q = affine.dequantize(*affine.rtn(w, b, gs), b, gs)
            d[b] = float(mx.sum(f * (w - q) ** 2)) * 0.5
        table[module_path(name)] = d
        sizes[module_path(name)] = w.size
    return table, sizes, float_params


def greedy(table: dict, sizes: dict, float_params: int, budget: float) -> dict[str, int]:
    """Widths minimising total damage with sum(n*b) <= budget * all params (float-kept at 16)."""
    total = sum(sizes.values()) + float_params
    cap = budget * total - 16 * float_params
    bits = {p: WIDTHS[0] for p in table}
    spent = sum(sizes[p] * WIDTHS[0] for p in table)

    def best_move(p):
        cur = bits[p]
        best = None
        for b in WIDTHS:
            if b <= cur:
                continue
            gain = (table[p][cur] - table[p][b]) / (sizes[p] * (b - cur))
            if best is None or gain > best[0]:
                best = (gain, b)
        return best

    heap = []
    for p in table:
        m = best_move(p)
        if m:
            heapq.heappush(heap, (-m[0], p, m[1]))
    while heap:
        neg, p, b = heapq.heappop(heap)
        if b <= bits[p]:
            continue
        cost = sizes[p] * (b - bits[p])
        if spent + cost > cap:
            # try the next smaller upgrade of this tensor that still fits
            smaller = [x for x in WIDTHS if bits[p] < x < b and spent + sizes[p] * (x - bits[p]) <= cap]
            if smaller:
                x = max(smaller, key=lambda x: (table[p][bits[p]] - table[p][x]) / (x - bits[p]))
                heapq.heappush(heap, (-(table[p][bits[p]] - table[p][x]) / (sizes[p] * (x - bits[p])), p, x))
            continue
        spent += cost
        bits[p] = b
        m = best_move(p)
        if m:
            heapq.heappush(heap, (-m[0], p, m[1]))
    return bits


_CACHE: dict = {}  # (source path, group size, calibration) -> damage table; a process converting one
                  # model at several budgets measures it once


def measure(source, group_size: int, calib_ids: list[int]):
    key = (str(source.path), group_size, hash(tuple(calib_ids)))
    if key not in _CACHE:
        model, weights = load_float(source)
        fish = fisher(model, calib_ids)
        _CACHE.clear()
        _CACHE[key] = damage_table(weights, fish, source.moe, group_size)
        del model, weights, fish
    return _CACHE[key]


def allocate(source, budget: float, group_size: int, calib_ids: list[int], method: str = "rtn",
             return_table: bool = False):
    table, sizes, float_params = measure(source, group_size, calib_ids)
    widths = greedy(table, sizes, float_params, budget)
    if return_table:
        return widths, table, sizes, float_params
    return widths
