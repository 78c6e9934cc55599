"""User mistakes end a run with one line on stderr and exit status 2, never a traceback."""

import gc
import sys
import warnings


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr)


def run_cli(fn):
    """Run a command line's work: warnings as single lines, a UserError as `error: ...` and exit 2."""
    warnings.showwarning = _one_line_warning
    # The million objects torch's imports create live until exit: keep them out of every garbage
    # collection, including the ones at interpreter exit (about 1 s per run on a small CPU).
    gc.freeze()
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
