"""Command line of segpipe.shards:

    python -m segpipe.shards write ROOT OUT [--shard-size 256MB] [--splits train valid] [--skip-unpaired]
    python -m segpipe.shards index FOLDER      # shards.json for SPLIT-NNNNNN.tar files made by other tools
"""
from __future__ import annotations

import argparse
import sys
import time

from segpipe.config import parse_size
from segpipe.data import DataError
from segpipe.shards.write import index_shards, write_shards


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segpipe.shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="pack ROOT/train and ROOT/valid into OUT/SPLIT-NNNNNN.tar + shards.json")
    write.add_argument("root", help="folder with SPLIT/NAME.jpg + SPLIT/NAME_mask.png")
    write.add_argument("out", help="output folder (a killed run continues there)")
    write.add_argument("--shard-size", default="256MB", help="close a shard once it reaches this size (default 256MB)")
    write.add_argument("--splits", nargs="+", default=["train", "valid"], help="split folders to pack")
    write.add_argument("--skip-unpaired", action="store_true", help="leave out images without a mask (else an error)")
    index = commands.add_parser("index", help="write FOLDER/shards.json for tars already there")
    index.add_argument("folder", help="folder with SPLIT-NNNNNN.tar shards of NAME.jpg + NAME.mask.png members")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    tic = time.perf_counter()
    try:
        if args.command == "write":
            descriptor = write_shards(args.root, args.out, parse_size(args.shard_size), tuple(args.splits),
                                      args.skip_unpaired)
        else:
            descriptor = index_shards(args.folder)
    except ValueError as e:  # DataError, or a --shard-size that is not a size
        print(f"{'data error' if isinstance(e, DataError) else 'error'}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {descriptor} in {time.perf_counter() - tic:.1f} s; train with data.root={descriptor} "
          f"(or the URL it will have once uploaded with its shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
