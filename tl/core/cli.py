"""Command lines: one parser class whose every mistake is one `error:` line, and range-checked numbers."""

import argparse
import math
from dataclasses import dataclass

from tl.core.errors import UserError


class Parser(argparse.ArgumentParser):
    """Parse inside errors.run_cli: a mistake raises UserError, printed as one line with exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


@dataclass(frozen=True)
class Range:
    """The values an option takes: at least `low` (above it with above=True), at most `high` (below it with
    below=True); `says` replaces the generated "must be ..." where an option explains itself better."""
    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    says: str | None = None

    def holds(self, value) -> bool:
        return math.isfinite(value) and (self.low is None or (value > self.low if self.above else value >= self.low)) \
            and (self.high is None or (value < self.high if self.below else value <= self.high))

    def message(self, value) -> str:
        """What is wrong with `value`, after the option's name: "must be positive, got 0"."""
        return f"{self.says or 'must be ' + describe(self.low, self.high, self.above, self.below)}, got {value}"


def number(kind: type = int, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: a finite `kind` in Range(low, high, above)."""
    allowed = Range(low, high, above)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not allowed.holds(value):
            raise argparse.ArgumentTypeError(allowed.message(text))
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def describe(low, high, above: bool, below: bool = False) -> str:
    lowest = ("positive" if low == 0 else f"above {low}") if above else \
        ("positive" if low == 1 else f"{low} or more")
    return lowest if high is None else f"{lowest} and {'below' if below else 'at most'} {high}"
