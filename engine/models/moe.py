"""The sparse MoE feed-forward shared by Qwen3-MoE and Mixtral: a float router (`gate`, an
nn.Linear over the hidden state giving one logit per expert), top-k softmax routing, and the
experts stacked in a SwitchGLU (`switch_mlp`)."""

from __future__ import annotations

import mlx.nn as nn

from .switch import SwitchGLU, route_topk


class SparseMoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, normalize: bool, act=nn.silu):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.switch_mlp = SwitchGLU(dim, hidden, num_experts, act)

    def __call__(self, x):
        inds, weights = route_topk(self.gate(x), self.top_k, self.normalize)
        y = self.switch_mlp(x, inds)  # [T, k, D]
        return (y * weights[..., None].astype(y.dtype)).sum(axis=1)
