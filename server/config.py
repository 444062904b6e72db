"""Server options: defaults < TOML file (`--config`) < command-line flags.

Every option is declared once in OPTIONS (name, TOML section, default, type, help); the argparse
parser and the TOML reader are both built from that table, and config.example.toml documents
each entry (a test checks that nothing is missing there).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


def jang_home() -> Path:
    """Where jang-serve keeps converted models and state: $JANG_SERVE_HOME or ~/.cache/jang-serve."""
    env = os.environ.get("JANG_SERVE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jang-serve"


@dataclass(frozen=True)
class Option:
    name: str
    section: str
    default: object
    type: type
    help: str
    choices: tuple | None = None


OPTIONS: list[Option] = [
    # [server]
    Option("model", "server", None, str, "model to serve: a JANG bundle, mlx-lm or HF folder, or a .gguf; "
           "unset = the embedded SmolLM2-135M-Instruct"),
    Option("served_model_name", "server", None, str, "name in /v1/models (default: the folder or file name)"),
    Option("default_model", "server", True, bool, "serve the embedded default model when no model is given"),
    Option("host", "server", "127.0.0.1", str, "address to listen on"),
    Option("port", "server", 8000, int, "port to listen on"),
    Option("cors_origins", "server", [], list, "origins allowed by CORS (e.g. [\"http://localhost:3000\"]); "
           "empty = CORS off"),
    Option("max_body_mb", "server", 8.0, float, "largest request body in MB; bigger ones get 413"),
    Option("max_queue", "server", 64, int, "requests allowed to wait beyond max_num_seqs; more get 429"),
    Option("sse_keepalive_s", "server", 10.0, float, "seconds between SSE comment keep-alives while streaming"),
    Option("tool_call_parser", "server", "auto", str, "how tool calls are read from model output",
           ("auto", "hermes", "llama3", "mistral", "none")),
    Option("log_level", "server", "info", str, "log level", ("debug", "info", "warning", "error")),
    # [auth]
    Option("api_key", "auth", None, str, "Bearer key required on /v1/* (unset = open)"),
    Option("admin_key", "auth", None, str, "Bearer key for /admin/* (unset = the admin API is disabled)"),
    # [engine]
    Option("dtype", "engine", "auto", str, "activation dtype (auto = float32 on CPU, bfloat16 on GPU)",
           ("auto", "float32", "bfloat16", "float16")),
    Option("kv_memory", "engine", None, float, "KV cache memory in GB (unset = the engine's default)"),
    Option("kv_dtype", "engine", "auto", str, "KV cache dtype", ("auto", "q8", "q4")),
    Option("block_size", "engine", 16, int, "tokens per KV block"),
    Option("max_num_seqs", "engine", 16, int, "sequences decoded together"),
    Option("max_num_batched_tokens", "engine", None, int, "token budget per engine step (unset = engine default)"),
    Option("max_prefill_chunk", "engine", None, int, "prefill tokens per step while other requests decode, so a "
           "long prompt cannot stall running streams (unset = 128 on CPU, the whole step budget on GPU)"),
    Option("max_model_len", "engine", None, int, "context length limit (unset = the model's own)"),
    Option("cpu_dense_gb", "engine", None, float, "CPU only: dequantize the quantized layers to dense float "
           "weights at start-up when they then take at most this many GB (faster on MLX's CPU backend; "
           "unset = 2, 0 = keep them packed)"),
    Option("prefix_caching", "engine", True, bool, "reuse KV blocks of shared prompt prefixes"),
    Option("tp", "engine", 1, int, "tensor-parallel ranks: split the model over N processes (ring backend "
           "over loopback on CPU, NCCL over N GPUs on CUDA); see docs/tp.md"),
    # [admin]
    Option("models_dir", "admin", None, str, "folder for converted models (default: $JANG_SERVE_HOME/models)"),
    Option("jobs_db", "admin", None, str, "SQLite file of conversion jobs (default: <models_dir>/.jobs.sqlite)"),
    Option("max_jobs", "admin", 1, int, "conversion jobs running at once"),
]

_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass
class ServerConfig:
    model: str | None = None
    served_model_name: str | None = None
    default_model: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    cors_origins: list = field(default_factory=list)
    max_body_mb: float = 8.0
    max_queue: int = 64
    sse_keepalive_s: float = 10.0
    tool_call_parser: str = "auto"
    log_level: str = "info"
    api_key: str | None = None
    admin_key: str | None = None
    dtype: str = "auto"
    kv_memory: float | None = None
    kv_dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None
    max_prefill_chunk: int | None = None
    max_model_len: int | None = None
    cpu_dense_gb: float | None = None
    prefix_caching: bool = True
    tp: int = 1
    models_dir: str | None = None
    jobs_db: str | None = None
    max_jobs: int = 1

    def __post_init__(self):
        for f in fields(self):
            _check(f.name, getattr(self, f.name))
        if self.tp < 1:
            raise ConfigError(f"option 'tp' must be at least 1, got {self.tp}")

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser() if self.models_dir else jang_home() / "models"

    @property
    def jobs_path(self) -> Path:
        return Path(self.jobs_db).expanduser() if self.jobs_db else self.models_path / ".jobs.sqlite"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class ConfigError(ValueError):
    pass


def _check(name: str, value) -> None:
    opt = _BY_NAME[name]
    if value is None:
        if opt.default is not None:
            raise ConfigError(f"option {name!r} cannot be empty")
        return
    want = opt.type
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"option {name!r} must be of type {want.__name__}, got {value!r}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"option {name!r} must be one of {', '.join(opt.choices)}; got {value!r}")
    if want in (int, float) and value < 0:
        raise ConfigError(f"option {name!r} must not be negative, got {value!r}")


def read_toml(path: str | Path) -> dict:
    """Options from a TOML file: `[server]`, `[auth]`, `[engine]`, `[admin]` tables (or top-level keys)."""
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    out: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for k, v in value.items():
                opt = _BY_NAME.get(k)
                if opt is None or opt.section != key:
                    raise ConfigError(f"{p}: unknown option [{key}] {k}")
                out[k] = v
        elif key in _BY_NAME:
            out[key] = value
        else:
            raise ConfigError(f"{p}: unknown option {key!r}")
    if out.get("model") == "":
        out["model"] = None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jang-serve", description="OpenAI-compatible server for JANG models on MLX")
    p.add_argument("--config", help="TOML file with options (flags override it)")
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        if o.type is bool:
            p.add_argument(flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None, help=o.help)
        elif o.type is list:
            p.add_argument(flag, dest=o.name, action="append", default=None, help=o.help + " (repeatable)")
        else:
            p.add_argument(flag, dest=o.name, type=o.type, default=None, choices=o.choices, help=o.help)
    return p


def load_config(argv: list[str] | None = None) -> ServerConfig:
    """Defaults, then the --config file, then the flags given on the command line."""
    args = build_parser().parse_args(argv)
    values: dict = {}
    if args.config:
        values.update(read_toml(args.config))
    for o in OPTIONS:
        v = getattr(args, o.name)
        if v is not None:
            values[o.name] = v
    return ServerConfig(**values)
