"""Llama (and Llama-2/3, SmolLM, TinyLlama): the generic decoder as it is."""

from dataclasses import dataclass

from .decoder import DecoderArgs, DecoderModel


@dataclass
class ModelArgs(DecoderArgs):
    sliding_window: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self.sliding_window = None  # Llama has no sliding window


class Model(DecoderModel):
    pass
