"""`jangq`: `jangq bench serve ...` runs the serving benchmark; every other subcommand goes to the quantizer."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:
        from .loadgen.cli import main as bench_main

        return bench_main(argv[2:])
    if argv[:1] == ["bench"]:
        print("usage: jangq bench serve --url URL | --serve-model PATH [options]  (jangq bench serve -h)",
              file=sys.stderr)
        return 2
    from jang_serve.quantize.cli import main as quantize_main

    return quantize_main(argv)


if __name__ == "__main__":
    sys.exit(main())
