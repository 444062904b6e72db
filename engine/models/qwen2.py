"""Qwen2 / Qwen2.5: the generic decoder with biases on q/k/v; sliding window only if enabled."""

from dataclasses import dataclass

from .decoder import DecoderArgs, DecoderModel


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "qwen2"
    attention_bias: bool = True
    use_sliding_window: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.attention_bias = True


class Model(DecoderModel):
    pass
