"""Train a segmentation model: `python train.py --config configs/camvid.yaml [section.key=value ...]`.

Multi-GPU / multi-node: `torchrun --nproc_per_node=N train.py --config ...` (one process per device).
train.batch_size is per process; the learning rate scales linearly with the global batch
(batch_size * world_size * accum_steps) relative to train.lr_reference_batch. The run itself, step by step
(data, model, optimizer, resume, loop, checkpoints), is segpipe/training.py's train().
"""
import argparse
import sys
from typing import Optional

from segpipe.training import read_config, train


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: a config file and dotted overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml", help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2 data.root=/data/x")
    return parser


def main(argv: Optional[list] = None) -> int:
    """Parse the command line, read and check the config, train. Returns the exit code."""
    args = get_args_parser().parse_args(argv)
    cfg = read_config(args.config, args.overrides)
    return train(cfg)


# A DataLoader worker started with spawn or forkserver (macOS, Windows, Python >= 3.14) imports this file
# again as __mp_main__: nothing above runs on import.
if __name__ == "__main__":
    sys.exit(main())
