"""Offline conversion to JANG v2 bundles: roles, profiles, RTN / MSE / GPTQ, the sensitivity
allocator, the writer, and evaluation (`jangq convert | inspect | eval`)."""

from .convert import METHODS, ConvertResult, convert
from .profiles import FIXED_PROFILES, K_PROFILES, PROFILES, ProfileError
from .roles import Role, role
from .sources import SourceError

# The profile the server uses for its embedded default model (SmolLM2-135M-Instruct, a Q4_1 GGUF):
# JANG_4L (attention 8, embeddings 6, MLP 4 bits) with MSE clipping at group 32. MSE at 4 bits / group 32
# recovers the GGUF's Q4_1 blocks exactly and the 8-bit grid contains them, so only the Q8_0 embedding
# is re-rounded: perplexity within ~0.5% of the dequantized GGUF (bench/results/quality-smollm2.json).
DEFAULT_SERVE_PROFILE = "JANG_4L:mse:g32"

__all__ = ["convert", "ConvertResult", "PROFILES", "FIXED_PROFILES", "K_PROFILES", "METHODS", "ProfileError",
           "SourceError", "Role", "role", "DEFAULT_SERVE_PROFILE"]
