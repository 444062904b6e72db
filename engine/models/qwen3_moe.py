"""Qwen3-MoE: Qwen3 attention (q/k norm) with sparse expert MLPs on every `decoder_sparse_step`-th
layer outside `mlp_only_layers` (dense MLP there). Routing: softmax over all experts, top-k,
renormalized when `norm_topk_prob`."""

from dataclasses import dataclass, field

from .decoder import ACTIVATIONS, MLP, Block as DenseBlock, DecoderModel
from .moe import SparseMoE
from .qwen3 import ModelArgs as Qwen3Args
from .switch import stack_experts


@dataclass
class ModelArgs(Qwen3Args):
    model_type: str = "qwen3_moe"
    num_experts: int | None = None
    num_local_experts: int | None = None  # transformers 5 writes this name for num_experts
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts is None:
            self.num_experts = self.num_local_experts or 128
        self.mlp_only_layers = list(self.mlp_only_layers or [])

    def is_sparse(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


class Block(DenseBlock):
    def make_mlp(self, args: ModelArgs, layer: int):
        if args.is_sparse(layer):
            return SparseMoE(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                             args.num_experts_per_tok, args.norm_topk_prob, ACTIVATIONS[args.hidden_act])
        return MLP(args.hidden_size, args.intermediate_size, False, args.hidden_act)


class Model(DecoderModel):
    block_class = Block

    def sanitize(self, weights: dict) -> dict:
        weights = super().sanitize(weights)
        names = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
        for i in range(self.args.num_hidden_layers):
            if self.args.is_sparse(i):
                weights = stack_experts(weights, f"model.layers.{i}.mlp", self.args.num_experts, names)
        return weights
