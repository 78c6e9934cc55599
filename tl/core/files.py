"""Files written whole or not at all: atomic writes, directory fsyncs, an output folder checked first."""

import contextlib
import os
from pathlib import Path

from tl.core.errors import UserError


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a kill, a full disk or a crash leaves either the old or the new bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:  # a full disk, or a stop signal mid-write: no temporary file stays behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(e, OSError):
            raise
        fix = (f"create the folder {path.parent} or write elsewhere" if not path.parent.is_dir() else
               f"free disk space or make {path.parent} writable")
        raise UserError(f"cannot write {path} ({e.strerror or e}); {fix}, then run the command again (a run "
                        "continues with --resume)") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def output_folder(path: Path) -> Path:
    """An --out folder, created if needed and checked writable before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder {path} ({e.strerror}); pass --out a writable folder") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write in {path}; pass --out a writable folder")
    return path
