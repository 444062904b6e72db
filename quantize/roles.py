"""Tensor roles: which weights get quantized, and how sensitive each one is.

A role is decided from the parameter name (our names = mlx-lm names: `model.layers.N.self_attn.q_proj`,
`...mlp.switch_mlp.gate_proj`, `lm_head`, ...) and from whether the model is a mixture of experts:

    CRITICAL   attention q/k/v/o (and fused qkv), MLA projections, shared experts, lm_head,
               dense MLPs inside MoE models (they see every token)
    IMPORTANT  embeddings, linear-attention / SSM projections
    COMPRESS   MLP and routed-expert projections (the bulk of the parameters)

Norms, biases, 1-D tensors, routers and anything that is not a 2-D (or stacked 3-D expert) weight
matrix stay in float: `role()` returns None for them.
"""

from __future__ import annotations

import enum
import re


class Role(str, enum.Enum):
    CRITICAL = "critical"
    IMPORTANT = "important"
    COMPRESS = "compress"


# First match wins; patterns are matched against the module path (no ".weight").
_CRITICAL = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|query_key_value|c_attn|out_proj_attn|"
    r"q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|embed_q|unembed_out|"
    r"lm_head|output)$"
)
_SHARED_EXPERT = re.compile(r"\.shared_experts?(\.|$)")
_IMPORTANT = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|"
    r"in_proj|x_proj|dt_proj|in_proj_qkvz|in_proj_ba|in_proj_qkv|in_proj_z|in_proj_a|in_proj_b)$"
    r"|(linear_attn|mixer|mamba|ssm)\.[^.]*proj$"
)
_ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$|\.router\.")
_EXPERTS = re.compile(r"(switch_mlp|experts)\.")
_MLP = re.compile(r"(^|\.)(gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|w1|w2|w3|c_fc|c_proj)$")
_SKIP = re.compile(r"norm|\.bias$|rotary|vision|visual|patch_embed|conv1d|\.conv(\.|$)")


def module_path(tensor_name: str) -> str:
    """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj'."""
    for suffix in (".weight", ".scales", ".biases"):
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name


def role(tensor_name: str, shape: tuple[int, ...], moe: bool = False) -> Role | None:
    """The role of one weight tensor, or None when it stays in float.

    `shape` is the float shape ([out, in] for a linear, [vocab, dim] for an embedding,
    [experts, out, in] for stacked experts); `moe` says the model has routed experts.
    """
    if not tensor_name.endswith(".weight") or len(shape) not in (2, 3):
        return None
    path = module_path(tensor_name)
    low = path.lower()
    if _SKIP.search(low):
        return None
    if _ROUTER.search(low):
        return None  # MoE routers decide which experts fire: keep them exact
    if len(shape) == 3 and not _EXPERTS.search(low):
        return None  # 3-D tensors other than stacked experts (convolutions) stay in float
    if _SHARED_EXPERT.search(low):
        return Role.CRITICAL
    if _CRITICAL.search(low):
        return Role.CRITICAL
    if _IMPORTANT.search(low):
        return Role.IMPORTANT
    if _MLP.search(low):
        if moe and not _EXPERTS.search(low):
            return Role.CRITICAL  # a dense MLP in an MoE model runs for every token
        return Role.COMPRESS
    return Role.COMPRESS


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (None for embeddings, final norm, lm_head)."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", tensor_name)
    return int(m.group(1)) if m else None


def is_moe_config(config: dict) -> bool:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if int(config.get(key) or 0) > 1:
            return True
    return False
