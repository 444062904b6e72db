"""`jang-serve`: parse options (defaults < --config TOML < flags), build the app, run uvicorn.

The model loads in the background while the server already answers (/health says 503 until it is
ready); if it cannot be loaded, the server stops with the reason and exit status 1.
"""

from __future__ import annotations

import logging
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"jang-serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.model and cfg.default_model:
        from .default_model import DefaultModelMissing, default_gguf

        try:
            default_gguf()
        except DefaultModelMissing as e:
            print(f"jang-serve: {e}", file=sys.stderr)
            return 1
    import uvicorn

    from .app import create_app

    app = create_app(cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                           timeout_graceful_shutdown=5))
    failed = []

    def on_failure(entry) -> None:
        if not entry.startup:
            return  # a model added later (admin load_after) fails alone
        print(f"jang-serve: could not load model {entry.name!r} from {entry.source}: {entry.error}", file=sys.stderr)
        failed.append(entry)
        server.should_exit = True

    app.state.models.on_failure = on_failure
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
