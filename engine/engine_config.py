"""Engine settings (the server's --kv-memory, --max-num-seqs, ... flags land here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_memory_gb: float | None = None  # absolute KV budget in GB; wins over kv_memory_fraction
    kv_memory_fraction: float = 0.25  # of the machine's available memory, when kv_memory_gb is None
    num_blocks: int | None = None  # exact pool size (tests); wins over both budgets
    kv_dtype: str = "auto"  # auto (model dtype) | q8 | q4
    kv_group_size: int | None = None  # 32 or 64; None: 32 for q4, 64 for q8
    kv_transform: bool | None = None  # store K/V smoothed + Hadamard-rotated (engine/kv_transform.py); None: q4 only
    # With kv_transform: centre keys and/or values on means from a calibration pass at pool creation
    # (engine/kv_calibration.py; needs a tokenizer): "k", "kv" or "none". None: "k".
    kv_center: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Per-step cap on prefill tokens while other sequences are decoding, so one long prompt cannot
    # stall the running streams (chunked prefill). None: 128 on the CPU (a step there is slow); on a
    # GPU the whole max_num_batched_tokens budget, as vLLM does: fewer, fuller mixed steps (64 new
    # prompts among decoding streams, 8B on an H100: 1.3-1.6x the throughput of a 512 cap,
    # bench/results/e2e-h100.json). With no decode in the step, a prefill always takes the whole budget.
    max_prefill_chunk: int | None = None
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds the PRNG of requests without their own seed
    # Pipelined decode (engine/async_decode.py): build step t+1 while step t runs. None: on a GPU.
    async_decode: bool | None = None
    # Fuse q/k/v and gate/up into one matmul each at start-up (models/layers.fuse_projections). None: on a GPU.
    fuse_projections: bool | None = None
    # Decode steps (<= max_num_seqs tokens) through mx.compile'd layers (models/compiled.py). None: on, on every
    # device (on the CPU 1.08x / 1.14x decode tok/s at 1 / 4 requests of SmolLM2: bench/results/compile-cpu-ab.json).
    compile_decode: bool | None = None
    # CPU only: dequantize quantized linears / embeddings to dense weights at start-up when the dense copy takes at
    # most this many GB (models/dense.py: MLX's CPU quantized matmul is scalar, BLAS is not). None: 2 GB; 0: never.
    cpu_dense_gb: float | None = None

    def __post_init__(self):
        if self.kv_dtype not in ("auto", "q8", "q4"):
            raise ValueError(f"kv_dtype must be auto, q8 or q4, got {self.kv_dtype!r}")
        if self.kv_group_size is None:
            self.kv_group_size = 32 if self.kv_dtype == "q4" else 64
        if self.kv_transform is None:
            self.kv_transform = self.kv_dtype == "q4"
        if self.kv_center is None:
            self.kv_center = "k"
        if self.kv_center not in ("kv", "k", "none"):
            raise ValueError(f"kv_center must be kv, k or none, got {self.kv_center!r}")
        if self.kv_group_size not in (32, 64):
            raise ValueError(f"kv_group_size must be 32 or 64, got {self.kv_group_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk must be >= 1, got {self.max_prefill_chunk}")
        if self.kv_memory_gb is not None and self.kv_memory_gb <= 0:
            raise ValueError(f"kv_memory_gb must be > 0, got {self.kv_memory_gb}")
        if self.cpu_dense_gb is not None and self.cpu_dense_gb < 0:
            raise ValueError(f"cpu_dense_gb must be >= 0, got {self.cpu_dense_gb}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")

    def on_gpu_by_default(self, name: str) -> bool:
        """A switch whose None means "on a GPU, off on the CPU" (async_decode, fuse_projections)."""
        value = getattr(self, name)
        if value is not None:
            return bool(value)
        import mlx.core as mx

        return mx.default_device() != mx.cpu

    def prefill_chunk(self) -> int:
        """max_prefill_chunk, or its default for the current device."""
        if self.max_prefill_chunk is not None:
            return self.max_prefill_chunk
        import mlx.core as mx

        return 128 if mx.default_device() == mx.cpu else self.max_num_batched_tokens

    @property
    def kv_bits(self) -> int | None:
        return {"q8": 8, "q4": 4}.get(self.kv_dtype)
