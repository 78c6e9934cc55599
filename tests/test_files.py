"""tl/core/files.py: a failed write names its fix and leaves nothing behind."""

import re

import pytest

from tl.core.errors import UserError
from tl.core.files import write_atomic


def test_a_write_into_a_missing_folder_says_to_create_it(tmp_path):
    with pytest.raises(UserError, match=f"cannot write .*; create the folder {re.escape(str(tmp_path / 'nodir'))} or "):
        write_atomic(tmp_path / "nodir" / "x.png", b"x")
    assert list(tmp_path.iterdir()) == []
    write_atomic(tmp_path / "x.png", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"] and (tmp_path / "x.png").read_bytes() == b"x"
