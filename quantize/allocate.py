"""The sensitivity-aware bit allocator: any average-bits budget -> a (width, group size) per tensor.

1. Sensitivity: the diagonal empirical Fisher of the next-token loss on calibration text,
   F = sum over calibration chunks of (dLoss/dW)^2, from one backward pass per chunk of the float
   model. To second order, quantizing W to W' raises the loss by about 1/2 * sum(F * (W - W')^2).
2. Damage table: for every quantizable tensor and every option (width b, group size g) of OPTIONS,
   the Fisher-weighted error D_t(b, g) of quantizing it with the conversion's own rounding (RTN for
   rtn, the MSE clip search for mse and gptq), estimated on a fixed sample of rows for big tensors.
3. Allocation: every option costs its stored bits per weight, b + 32/g (float16 scale and bias per
   group). Start every tensor at the cheapest option and repeatedly take the upgrade with the largest
   damage reduction per extra stored bit while it fits the budget.

A budget of B bits means the stored size of uniform B-bit quantization at the requested group size
(B + 0.5 stored bits at group 64, as mlx-lm's "4-bit" is 4.5): the allocator may spend it on wider
codes or on smaller groups. Float-kept matrices count at 16 bits.
"""

from __future__ import annotations

import heapq

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import affine
from .roles import module_path, role

WIDTHS = (2, 3, 4, 5, 6, 8)
# (bits, group size) choices: small groups where they matter (low widths), group 64 at 5+ bits
OPTIONS = ((2, 32), (2, 64), (3, 32), (3, 64), (3, 128), (4, 32), (4, 64), (4, 128), (5, 64), (6, 64), (8, 64))
SAMPLE = 1 << 18  # elements per tensor used to estimate its damage (rows sampled evenly)


def cost(option) -> float:
    """Stored bits per weight of an option: an int width (nominal, no overhead) or (bits, group)."""
    if isinstance(option, tuple):
        return option[0] + 32.0 / option[1]
    return float(option)


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


def _sample_rows(w: mx.array, f: mx.array):
    """Evenly spaced rows of a big matrix (and its Fisher), plus the factor scaling their damage up."""
    w2 = w.reshape(-1, w.shape[-1])
    f2 = f.reshape(-1, w.shape[-1])
    rows = w2.shape[0]
    keep = max(1, min(rows, SAMPLE // w.shape[-1]))
    if keep == rows:
        return w2, f2, 1.0
    idx = mx.array([int(i * rows / keep) for i in range(keep)])
    return w2[idx], f2[idx], rows / keep


def damage_table(weights: dict, fish: dict, moe: bool, group_size: int, method: str = "rtn",
                 options=OPTIONS) -> tuple[dict, dict, int]:
    """-> ({path: {option: damage}}, {path: n_params}, float_params) over quantizable tensors.
    Options whose group size does not divide the tensor's input dim are left out."""
    table, sizes, float_params = {}, {}, 0
    rounding = "rtn" if method == "rtn" else "mse"
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
        ws, fs, scale = _sample_rows(w.astype(mx.float32), f.astype(mx.float32))
        d = {}
        for opt in options:
            b, g = opt if isinstance(opt, tuple) else (opt, gs)
            if w.shape[-1] % g:
                continue
            q = affine.dequantize(*affine.quantize(ws, b, g, rounding), b, g)
            d[opt] = float(mx.sum(fs * (ws - q) ** 2)) * 0.5 * scale
        table[module_path(name)] = d
        sizes[module_path(name)] = w.size
    return table, sizes, float_params


def greedy(table: dict, sizes: dict, float_params: int, budget: float) -> dict:
    """Options minimising total damage with sum(n * cost) <= budget * all params (float-kept at 16).
    Options are int widths (cost = width) or (bits, group) pairs (cost = stored bits)."""
    total = sum(sizes.values()) + float_params
    cap = budget * total - 16 * float_params
    pick = {p: min(table[p], key=cost) for p in table}
    spent = sum(sizes[p] * cost(pick[p]) for p in table)

    def moves(p, limit=None):
        """Upgrades of p (more stored bits, less damage) by damage saved per extra bit, best first."""
        cur = pick[p]
        out = []
        for o, dmg in table[p].items():
            extra = sizes[p] * (cost(o) - cost(cur))
            if extra <= 0 or dmg >= table[p][cur] or (limit is not None and extra > limit):
                continue
            out.append(((table[p][cur] - dmg) / extra, o))
        return sorted(out, key=lambda x: -x[0])

    heap = []
    for p in table:
        m = moves(p)
        if m:
            heapq.heappush(heap, (-m[0][0], p, m[0][1], pick[p]))
    while heap:
        _, p, o, frm = heapq.heappop(heap)
        if pick[p] != frm:
            continue  # stale entry
        extra = sizes[p] * (cost(o) - cost(pick[p]))
        if spent + extra > cap:
            # the best upgrade that still fits, if any
            m = moves(p, limit=cap - spent)
            if m:
                heapq.heappush(heap, (-m[0][0], p, m[0][1], pick[p]))
            continue
        spent += extra
        pick[p] = o
        m = moves(p)
        if m:
            heapq.heappush(heap, (-m[0][0], p, m[0][1], pick[p]))
    return pick


_CACHE: dict = {}  # (source path, group size, method, calibration) -> damage table; a process converting
                  # one model at several budgets measures it once


def measure(source, group_size: int, calib_ids: list[int], method: str = "rtn"):
    key = (str(source.path), group_size, "rtn" if method == "rtn" else "mse", hash(tuple(calib_ids)))
    if key not in _CACHE:
        model, weights = load_float(source)
        fish = fisher(model, calib_ids)
        _CACHE.clear()
        _CACHE[key] = damage_table(weights, fish, source.moe, group_size, method)
        del model, weights, fish
    return _CACHE[key]


def allocate(source, budget: float, group_size: int, calib_ids: list[int], method: str = "rtn",
             return_table: bool = False):
    """-> {module path: (bits, group size)} whose stored size is at most that of uniform `budget`-bit
    quantization at `group_size`."""
    table, sizes, float_params = measure(source, group_size, calib_ids, method)
    widths = greedy(table, sizes, float_params, budget + 32.0 / group_size)
    if return_table:
        return widths, table, sizes, float_params
    return widths
