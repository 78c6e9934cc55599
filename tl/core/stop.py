"""Stop signals from the first second of a run: Ctrl-C, SIGTERM, SIGUSR1 (SLURM's warning), SIGHUP.

During start-up (listing, decoding, loading weights) a signal stops the process at once. While
training, it is remembered and every process agrees at its next step, so all stop together
after a consistent state; a second signal stops at once, except inside a save (`saving`), which
finishes first. One stop often arrives twice: under `accelerate launch`, from scancel or the
terminal and again from torchrun's agent, which passes it on.
"""

import contextlib
import signal


class StopRequested(BaseException):
    """A stop signal arrived; args[0] is its number. A BaseException, like KeyboardInterrupt, so that
    no library's `except Exception` swallows it."""


received: list[int] = []  # every stop signal this process got (tl.core.errors tells a stop from a user error)


class Stopped(Exception):
    """A stop the user or the scheduler asked for, honoured: the message says what is saved and how to go
    on. Not an error: tl.core.errors.run_cli prints it as it is and exits with exit_status(signum)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def exit_status(signum: int) -> int:
    """A shell's status for a command a signal stopped: 128 + its number (Ctrl-C 130, SIGTERM 143)."""
    return 128 + signum


class Stopper:
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    active: list["Stopper"] = []  # the Stoppers whose handlers are installed, latest last

    def __init__(self):
        Stopper.active.append(self)
        self.signum, self.deferred, self.accelerator = 0, False, None
        self.in_save = self.forced = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        received.append(signum)
        again = bool(self.signum)
        self.signum = signum
        if again or not self.deferred:
            if self.in_save:  # the save a resume needs finishes; `saving` stops right after it
                self.forced = True
                return
            raise StopRequested(signum)

    @contextlib.contextmanager
    def saving(self):
        """Around the writes of a saved state: a second signal waits for them, then stops at once."""
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False
        if self.forced:
            raise StopRequested(self.signum)

    def defer(self, accelerator) -> None:
        """From now on a signal waits for `check`, where all processes agree."""
        self.deferred, self.accelerator = True, accelerator

    def agree(self, *device_flags):
        """One host sync: the largest of this signal number and each device flag over all processes.
        Returns (signal number, *flags); the caller decides what they mean."""
        import torch  # not at the top: the entry point installs the handlers before torch loads

        device = self.accelerator.device
        flags = torch.stack([torch.tensor(self.signum, device=device, dtype=torch.long),
                             *(f.to(device, torch.long) for f in device_flags)])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, "max")
        return flags.tolist()

    def check(self) -> None:
        signum, = self.agree()
        if signum:
            raise StopRequested(signum)

    def restore(self) -> None:
        if self in Stopper.active:
            Stopper.active.remove(self)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name


def writing():
    """Around a command's last writes (several files that belong together): a stop signal waits for them,
    then stops (the active Stopper's `saving`); nothing to wait for without one."""
    return Stopper.active[-1].saving() if Stopper.active else contextlib.nullcontext()


def ignore_in_worker(_worker_id: int) -> None:
    """A DataLoader's worker_init_fn: scancel, SLURM's time limit and Ctrl-C signal the workers as well, and torch's
    workers die of SIGTERM, which the loader then raises as a crash. The main process stops them itself."""
    for sig in Stopper.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
