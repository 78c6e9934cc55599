"""User mistakes end a run with one line on stderr and exit status 2, never a traceback."""

import sys


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


def run_cli(fn):
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
