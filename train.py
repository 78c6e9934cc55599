"""Entry point: `python train.py ...` or `accelerate launch train.py ...` (see --help)."""

from tl.stop import Stopper

stopper = Stopper()  # first, before the slow imports: a stop signal works from the first second

from tl.errors import run_cli  # noqa: E402


def main():
    from tl.config import parse_args
    from tl.loop import train

    return train(parse_args(), stopper)


if __name__ == "__main__":
    run_cli(main)
