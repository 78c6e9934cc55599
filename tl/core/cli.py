"""Command lines: one parser class whose every mistake is one `error:` line, and range-checked numbers."""

import argparse
import math

from tl.core.errors import UserError


class Parser(argparse.ArgumentParser):
    """Parse inside errors.run_cli: a mistake raises UserError, printed as one line with exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def number(kind: type = int, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: a finite `kind` of at least `low` (above it, with above=True) and at most `high`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        ok = math.isfinite(value) and (low is None or (value > low if above else value >= low)) and \
            (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {describe(low, high, above)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def describe(low, high, above: bool) -> str:
    lowest = ("positive" if low == 0 else f"above {low}") if above else \
        ("positive" if low == 1 else f"{low} or more")
    return lowest if high is None else f"{lowest} and at most {high}"
