"""Client-side serving benchmark: drives any OpenAI-compatible HTTP server.

Nothing here imports the engine, the server or the quantizer: the load generator only speaks HTTP,
so the same code measures jang-serve and mlx-lm's server alike.

Modules: client (one streaming request), runner (closed loop / Poisson), stats (percentiles),
prompts (synthetic or JSONL), servers (start/stop a server process), baseline (mlx-lm folder from
GGUF), envinfo (device and versions), cli (`jangq bench serve`).
"""
