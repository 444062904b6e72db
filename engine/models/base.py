"""Shared pieces of model families: config dataclass base."""

from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass
class BaseArgs:
    @classmethod
    def from_dict(cls, cfg: dict):
        """Build from an HF config dict, ignoring keys the dataclass does not declare."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in cfg.items() if k in names})
