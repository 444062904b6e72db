"""Qwen3: the generic decoder with per-head RMSNorm on q and k, explicit head_dim."""

from dataclasses import dataclass

from .decoder import DecoderArgs, DecoderModel


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "qwen3"
    use_sliding_window: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.qk_norm = True


class Model(DecoderModel):
    pass
