"""train.py whose main process SIGKILLs the job right after it saved its first state inside an epoch: a kill at a
deterministic moment (the other processes cannot pass the next step's collective without the main one).

    python tests/kill_after_save.py TRAIN_ARGS... --save-every 0.0001
    torchrun --nproc_per_node N tests/kill_after_save.py TRAIN_ARGS...   (torchrun and every process killed)
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import psutil

from tl.runs.checkpointer import Checkpointer

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
save_step = Checkpointer.save_step


def save_then_kill(self, *args, **kwargs):
    save_step(self, *args, **kwargs)
    if self.run is not None:  # the main process, its state written
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's agent first, then every process it started
            agent = psutil.Process(os.getppid())
            for process in [agent, *agent.children(recursive=True)]:
                if process.pid != os.getpid():
                    process.kill()
        os.kill(os.getpid(), signal.SIGKILL)


Checkpointer.save_step = save_then_kill
sys.argv = [str(TRAIN), *sys.argv[1:]]
runpy.run_path(str(TRAIN), run_name="__main__")
