"""Mixtral: the Mistral decoder with a sparse MoE (`block_sparse_moe`) on every layer. Routing:
softmax over all experts, top-k, renormalized over the k (= softmax of the top-k logits).
HF expert names w1/w3/w2 become switch_mlp gate_proj/up_proj/down_proj."""

import re
from dataclasses import dataclass

from .decoder import ACTIVATIONS, Block as DenseBlock, DecoderModel
from .mistral import ModelArgs as MistralArgs
from .moe import SparseMoE
from .switch import stack_experts


@dataclass
class ModelArgs(MistralArgs):
    model_type: str = "mixtral"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 1e6


class Block(DenseBlock):
    mlp_name = "block_sparse_moe"

    def make_mlp(self, args: ModelArgs, layer: int):
        return SparseMoE(args.hidden_size, args.intermediate_size, args.num_local_experts,
                         args.num_experts_per_tok, True, ACTIVATIONS[args.hidden_act])


class Model(DecoderModel):
    block_class = Block

    def sanitize(self, weights: dict) -> dict:
        weights = super().sanitize(weights)
        # transformers 5 names the MoE `mlp` (fused experts) in memory; checkpoints use block_sparse_moe.
        weights = {re.sub(r"^(model\.layers\.\d+)\.mlp\.", r"\1.block_sparse_moe.", k): v for k, v in weights.items()}
        names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.block_sparse_moe"
            weights = stack_experts(weights, prefix, self.args.num_local_experts, names)
        return weights
