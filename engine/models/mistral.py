"""Mistral: the generic decoder with a sliding window on every layer (when the config sets one)."""

from dataclasses import dataclass

from .decoder import DecoderArgs, DecoderModel


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "mistral"


class Model(DecoderModel):
    pass
