"""What a directory tree holds, to prove a refused or undone run left it as it was."""

from __future__ import annotations

import os
from pathlib import Path

# mode (with the file type), owner, group, and the content or the symlink's target
Entry = tuple[int, int, int, bytes]


def file_states(*tops: Path) -> dict[str, Entry]:
    """Every path under each of `tops` (and each top itself, absent ones left out)."""
    out: dict[str, Entry] = {}
    for top in tops:
        if not top.exists() and not top.is_symlink():
            continue
        for path in [top, *top.rglob("*")] if top.is_dir() else [top]:
            st = path.lstat()
            if path.is_symlink():
                body = os.readlink(path).encode()
            else:
                body = path.read_bytes() if path.is_file() else b""
            out[str(path)] = (st.st_mode, st.st_uid, st.st_gid, body)
    return out
