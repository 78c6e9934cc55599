"""User mistakes end a run with one line on stderr and exit status 2, never a traceback; a stop signal
ends it with one line saying what is saved and exit status 128 + the signal's number.

TL_DEBUG=1 prints the traceback behind the line as well. Under SLURM, launch.sh sets TL_USER_ERROR_MARK:
a user error (not a stop by a signal) touches that file, since accelerate's launcher and srun turn
every failing rank's status into 1 or 143.
"""

import contextlib
import gc
import os
import sys
import traceback
import warnings

from tl.core import stop
from tl.core.stop import Stopped, Stopper, StopRequested, exit_status


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


def is_main_rank() -> bool:
    """The job's first process; in a multi-process job the others keep quiet (one message per job)."""
    return os.environ.get("RANK", "0") == "0"


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    if not is_main_rank():  # every process meets the same warnings: the job says each once
        return
    from tqdm import tqdm

    with tqdm.external_write_mode(file=file or sys.stderr):  # a line of its own, not the end of a progress bar's
        print(f"warning: {message}", file=file or sys.stderr)


def _end_progress_bars():
    """Close the bars an error or a stop left open (a signal can land inside one's first display), so the
    error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        for end in (bar.clear, bar.close):  # clear: close fails on a bar whose __init__ the signal cut short
            with contextlib.suppress(Exception):
                end()


def run_cli(fn, stopped: str = "no file is left half-written: run the command again"):
    """Run a command line's work: warnings as single lines, a UserError as `error: ...` and exit status 2, a
    stop signal as one line and 128 + its number. `stopped`: what a stop before the work's own stop point
    means (tl.core.stop.Stopped carries its own message)."""
    warnings.showwarning = _one_line_warning
    if not Stopper.active:  # Ctrl-C and SIGTERM end every command the same way, not with a traceback
        Stopper()
    # The million objects torch's imports create live until exit: keep them out of every garbage
    # collection, including the ones at interpreter exit (about 1 s per run on a small CPU).
    gc.freeze()
    try:
        return fn()
    except BrokenPipeError:  # the reader of stdout went away (`tl.predict ... | head`): stop as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command its pipe's reader left
    except (Stopped, StopRequested) as e:
        if os.environ.get("TL_DEBUG") == "1":
            traceback.print_exc()
        signum = e.signum if isinstance(e, Stopped) else e.args[0]
        if is_main_rank():
            _end_progress_bars()
            print(str(e) if isinstance(e, Stopped) else f"stopped by {Stopper.name(signum)}; {stopped}",
                  file=sys.stderr)
        sys.exit(exit_status(signum))
    except UserError as e:
        if os.environ.get("TL_DEBUG") == "1":
            traceback.print_exc()
        if "\nOriginal Traceback" in str(e):  # raised in a DataLoader worker, which wraps it in its traceback
            e = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        if is_main_rank():
            _end_progress_bars()
            print(f"error: {e}", file=sys.stderr)
        mark = os.environ.get("TL_USER_ERROR_MARK")
        if mark and not stop.received:  # for slurm/launch.sh: do not requeue what would fail the same way
            try:
                open(mark, "a").close()
            except OSError:
                pass
        sys.exit(2)
