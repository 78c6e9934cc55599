"""Entry point: `python train.py ...` or `accelerate launch train.py ...` (see --help)."""

from tl.core.stop import Stopper

stopper = Stopper()  # first, before the slow imports: a stop signal works from the first second

from tl.core.errors import run_cli  # noqa: E402


def main():
    from tl.core.config import parse_args
    from tl.train.loop import train

    return train(parse_args(), stopper)


if __name__ == "__main__":
    run_cli(main, "during start-up; nothing was saved: run the command again")
