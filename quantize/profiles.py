"""The JANG profiles: fixed (critical, important, compress) bit triplets and budget ("K") profiles.

Fixed profiles follow the reference package (jang 2.5.50): `JANG_{compress bits}{S|M|L}`, where
S/M/L say how far CRITICAL (and IMPORTANT) sit above the compressed MLP bits. K profiles are a bit
budget (average bits per weight, as for uniform quantization at that width) that our sensitivity
allocator distributes over the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from .roles import Role

# name -> (critical, important, compress) bits, as in the reference
FIXED_PROFILES: dict[str, tuple[int, int, int]] = {
    "JANG_1L": (8, 8, 2),
    "JANG_2S": (6, 4, 2),
    "JANG_2M": (8, 4, 2),
    "JANG_2L": (8, 6, 2),
    "JANG_3S": (6, 3, 3),
    "JANG_3M": (8, 3, 3),
    "JANG_3L": (8, 4, 3),
    "JANG_4S": (6, 4, 4),
    "JANG_4M": (8, 4, 4),
    "JANG_4L": (8, 6, 4),
    "JANG_6M": (8, 6, 6),
}

# budget profiles -> average weight bits (excluding the per-group scale/bias overhead, like "4-bit")
K_PROFILES: dict[str, float] = {"JANG_2K": 2.0, "JANG_3K": 3.0, "JANG_4K": 4.0, "JANG_5K": 5.0, "JANG_6K": 6.0}

PROFILES: tuple[str, ...] = tuple(FIXED_PROFILES) + tuple(K_PROFILES)

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
MIN_BUDGET, MAX_BUDGET = 2.0, 8.0


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Plan:
    """What the user asked for: a fixed profile, or a bit budget (K profile or --bits).

    A profile string may carry options after colons: "JANG_4M:mse:g32" = JANG_4M with method mse and
    group size 32 (used when convert() is not given a method / group size of its own)."""

    profile: str | None  # canonical profile name, or None for a plain --bits budget
    budget: float | None  # average bits target (None for fixed profiles)
    triplet: tuple[int, int, int] | None  # (critical, important, compress) for fixed profiles
    method: str | None = None
    group_size: int | None = None

    @property
    def label(self) -> str:
        return self.profile or f"bits={self.budget:g}"

    def bits_for(self, r: Role) -> int:
        assert self.triplet is not None
        return {Role.CRITICAL: self.triplet[0], Role.IMPORTANT: self.triplet[1], Role.COMPRESS: self.triplet[2]}[r]


def resolve(profile: str | None = None, bits: float | None = None) -> Plan:
    """Turn the convert() arguments into a Plan; clear errors for bad input."""
    if profile is not None and bits is not None:
        raise ProfileError("give either a profile or a bit budget, not both")
    if profile is None and bits is None:
        profile = "JANG_4K"
    if profile is not None:
        name, *opts = str(profile).strip().split(":")
        name = name.upper()
        if not name.startswith("JANG_"):
            name = "JANG_" + name
        method, gs = None, None
        for o in opts:
            o = o.strip().lower()
            if o in ("rtn", "mse", "gptq"):
                method = o
            elif o.startswith("g") and o[1:] in ("32", "64", "128"):
                gs = int(o[1:])
            else:
                raise ProfileError(f"unknown profile option {o!r} in {profile!r} (use rtn|mse|gptq and g32|g64|g128)")
        if name in FIXED_PROFILES:
            return Plan(name, None, FIXED_PROFILES[name], method, gs)
        if name in K_PROFILES:
            return Plan(name, K_PROFILES[name], None, method, gs)
        raise ProfileError(f"unknown profile {profile!r}; known profiles: {', '.join(PROFILES)}")
    try:
        b = float(bits)
    except (TypeError, ValueError):
        raise ProfileError(f"bits must be a number between {MIN_BUDGET:g} and {MAX_BUDGET:g}, got {bits!r}")
    if not (MIN_BUDGET <= b <= MAX_BUDGET):
        raise ProfileError(f"bits must be between {MIN_BUDGET:g} and {MAX_BUDGET:g}, got {b:g}")
    return Plan(None, b, None)
