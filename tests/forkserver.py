"""A Python that has imported tl's heavy dependencies once and forks a real process for each command.

Importing torch, torchvision and accelerate takes about 4 s; most test runs take less than that. Each
command runs in a forked child exactly as `python train.py ...` or `python -m tl.X ...` would: its own
pid, stdio, cwd, environment and exit status, signal handlers reset to Python's defaults, atexit
handlers run at the end. conftest.py talks to it over a pipe, one JSON line per request and reply.
Tests of what happens during those imports (a signal at start-up) start a fresh Python instead.
"""

import atexit
import json
import os
import runpy
import select
import signal
import sys
import tempfile
import traceback

import accelerate  # noqa: F401  imported once here, not in every child
import torch  # noqa: F401
import torchvision  # noqa: F401

import tl.train.loop  # noqa: F401

# Not timm or peft: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when imported, and each command brings its own.


def child(request: dict) -> None:
    """Become the command: never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # a group of its own: when the tests end, the server's killpg takes its workers too
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # gettempdir() reads this command's TMPDIR, as a fresh Python would
        sys.argv = list(request["argv"])
        if request["module"]:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
            runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # a fresh Python would end by SIGINT itself (-2); no test tells the two apart
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    children: dict[int, int] = {}  # pid -> request id
    pending = b""
    print(json.dumps({"ready": os.getpid()}), flush=True)
    while True:
        ready, _, _ = select.select([0], [], [], 0.005 if children else None)
        if ready:
            data = os.read(0, 65536)
            if not data:  # the tests are done
                for pid in children:
                    os.killpg(pid, signal.SIGKILL)
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    child(request)
                children[pid] = request["id"]
                print(json.dumps({"id": request["id"], "pid": pid}), flush=True)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print(json.dumps({"id": children.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}),
                      flush=True)


if __name__ == "__main__":
    main()
