"""``kvfabric <command>``: each command lives in its own module and is imported only when used."""

from __future__ import annotations

import argparse
import logging
import sys

from kvfabric import bench_cmd, generate_cmd, health_cmd, scale_cmd, serve_cmd, up_cmd

COMMANDS = {
    "up": up_cmd,
    "serve": serve_cmd,
    "generate": generate_cmd,
    "bench": bench_cmd,
    "health": health_cmd,
    "scale": scale_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfabric", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"kvfabric {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
