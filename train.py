"""Entry point: `python train.py ...` or `accelerate launch train.py ...` (see --help)."""

from tl.config import parse_args
from tl.errors import run_cli
from tl.loop import train

if __name__ == "__main__":
    run_cli(lambda: train(parse_args()))
