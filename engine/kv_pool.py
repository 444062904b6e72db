"""The paged KV pool: per layer, K and V blocks of `block_size` token slots.

Layout (shared with the kernels), for every layer:
  auto KV: K, V arrays [num_blocks, block_size, n_kv_heads, head_dim] in the model dtype;
  q8/q4 KV: (packed uint32 [num_blocks, block_size, n_kv_heads, head_dim*bits/32],
             scales, biases [num_blocks, block_size, n_kv_heads, head_dim/group]) per K and per V,
             MLX affine quantization along head_dim.
A slot is block * block_size + offset. Block 0 is an ordinary block (padding rows of block tables
point at it but are always masked out).
"""

from __future__ import annotations

import os

import mlx.core as mx


def _scale_dtype(dtype) -> mx.Dtype:
    # 16-bit scales keep q4 near 4.5 bits/value; bf16 models keep bf16 scales.
    return mx.bfloat16 if dtype == mx.bfloat16 else mx.float16


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype, kv_bits: int | None,
                    group_size: int = 64) -> int:
    """KV bytes one token takes over all layers (K and V)."""
    per_head = head_dim * dtype.size if kv_bits is None else (
        head_dim * kv_bits // 8 + 2 * (head_dim // group_size) * _scale_dtype(dtype).size)
    return 2 * num_layers * kv_heads * per_head


def available_memory_bytes() -> int:
    """Memory the KV pool may draw from: the GPU's working set on Metal/CUDA, else free RAM."""
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        total = info.get("max_recommended_working_set_size") or info.get("memory_size") or info.get("total_memory")
        if mx.default_device() == mx.gpu and total:
            return max(int(total) - mx.get_active_memory(), 0)  # minus the weights already loaded
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def kv_calibration(model, tokenizer, center: str) -> dict | None:
    """Calibration statistics for the KV transform (kv_calibration.kv_stats), or None without a
    tokenizer (no text to run) or with center "none"."""
    if tokenizer is None or center == "none":
        return None
    from .kv_calibration import kv_stats

    return kv_stats(model, tokenizer)


class KVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype=mx.float32, kv_bits: int | None = None, group_size: int = 64):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        if kv_bits is not None:
            if kv_bits not in (4, 8):
                raise ValueError(f"KV bits must be 4 or 8, got {kv_bits}")
            if head_dim % group_size:
                raise ValueError(f"head_dim {head_dim} is not a multiple of the KV group size {group_size}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.kv_bits, self.group_size = kv_bits, group_size
        self.transform = None  # KVTransform for quantized KV (set by for_model)
        self.k = [self._empty() for _ in range(num_layers)]
        self.v = [self._empty() for _ in range(num_layers)]
        mx.eval(self.k, self.v)

    @property
    def kv_quant(self) -> tuple[int, int] | None:
        return None if self.kv_bits is None else (self.kv_bits, self.group_size)

    def _empty(self):
        shape = (self.num_blocks, self.block_size, self.kv_heads)
        if self.kv_bits is None:
            return mx.zeros(shape + (self.head_dim,), dtype=self.dtype)
        sd = _scale_dtype(self.dtype)
        groups = self.head_dim // self.group_size
        return (mx.zeros(shape + (self.head_dim * self.kv_bits // 32,), dtype=mx.uint32),
                mx.zeros(shape + (groups,), dtype=sd), mx.zeros(shape + (groups,), dtype=sd))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        def size(p):
            return sum(a.nbytes for a in p) if isinstance(p, tuple) else p.nbytes
        return sum(size(p) for p in self.k) + sum(size(p) for p in self.v)

    def arrays(self) -> list[mx.array]:
        """Every array of the pool (to evaluate them together with a step's logits)."""
        out = []
        for p in self.k + self.v:
            out.extend(p if isinstance(p, tuple) else (p,))
        return out

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (forking a sequence's partial last block)."""
        if not pairs:
            return
        src = mx.array([s for s, _ in pairs])
        dst = mx.array([d for _, d in pairs])

        def cp(p):
            if isinstance(p, tuple):
                return tuple(cp(a) for a in p)
            p[dst] = p[src]
            return p

        self.k = [cp(p) for p in self.k]
        self.v = [cp(p) for p in self.v]
        mx.eval(self.arrays())

    @classmethod
    def for_model(cls, model, cfg, dtype, tokenizer=None) -> "KVPool":
        """Size the pool from cfg.num_blocks, cfg.kv_memory_gb or cfg.kv_memory_fraction. With a KV
        transform and a tokenizer, a calibration pass gives the keys' / values' means (cfg.kv_center)."""
        per_tok = bytes_per_token(model.num_layers, model.kv_heads, model.head_dim, dtype, cfg.kv_bits,
                                  cfg.kv_group_size)
        if cfg.num_blocks is not None:
            n = cfg.num_blocks
        else:
            budget = cfg.kv_memory_gb * 1e9 if cfg.kv_memory_gb is not None else \
                cfg.kv_memory_fraction * available_memory_bytes()
            n = int(budget // (per_tok * cfg.block_size))
            if n < 2:
                raise ValueError(f"KV memory budget {budget / 1e9:.3f} GB holds fewer than 2 blocks "
                                 f"({per_tok * cfg.block_size} bytes each)")
        pool = cls(model.num_layers, n, cfg.block_size, model.kv_heads, model.head_dim, dtype,
                   cfg.kv_bits, cfg.kv_group_size)
        if cfg.kv_bits is not None and cfg.kv_transform:
            from .kv_transform import KVTransform

            pool.transform = KVTransform(model, dtype, kv_calibration(model, tokenizer, cfg.kv_center), cfg.kv_center)
        return pool
