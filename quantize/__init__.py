"""Offline conversion to JANG v2 bundles: roles, profiles, RTN / MSE / GPTQ, the sensitivity
allocator, the writer, and evaluation (`jangq convert | inspect | eval`)."""

from .convert import METHODS, ConvertResult, convert
from .profiles import FIXED_PROFILES, K_PROFILES, PROFILES, ProfileError
from .roles import Role, role
from .sources import SourceError

# The profile the server uses for its embedded default model (SmolLM2-135M); see docs/quantizer.md.
DEFAULT_SERVE_PROFILE = "JANG_6M"

__all__ = ["convert", "ConvertResult", "PROFILES", "FIXED_PROFILES", "K_PROFILES", "METHODS", "ProfileError",
           "SourceError", "Role", "role", "DEFAULT_SERVE_PROFILE"]
