"""Hand a data directory from one system user to another, without following links.

Used by install when the local servers and the agent move from the one user every unit ran
as to users of their own, and by rollback to a release from before that (`hand_back`). The
old owner could have planted symbolic links (or swapped a directory for one) anywhere
inside: every entry is reached through the file descriptor of its parent directory
(`os.fwalk`, which never descends a link), owners are set with
`fchownat(AT_SYMLINK_NOFOLLOW)`, and a link is re-owned itself, never its target.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stellarbase import facts, layout
from stellarbase.host import Host, for_paths
from stellarbase.paths import (
    AGENT_USER,
    GROUP,
    LEGACY_USER,
    POSTGRES_USER,
    REDIS_USER,
    HostPaths,
)
from stellarbase.service_settings import load_catalog
from stellarbase.values import RepositoryLocation


def reown_tree(top: Path, old_uid: int, uid: int, gid: int) -> int:
    """Give every entry under `top` owned by `old_uid` to uid:gid; returns how many.

    Bottom-up, `top` itself last: until it is re-owned the job is not done, so an
    interrupted run is finished by the next (its owner is what install checks first).
    Entries of other owners (root's, say) are left as they are.
    """
    changed = 0
    for _, dirnames, filenames, dir_fd in os.fwalk(top, topdown=False, follow_symlinks=False):
        for name in [*filenames, *dirnames]:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone meanwhile
            if stat.S_ISDIR(st.st_mode):
                continue  # re-owned through its own descriptor, before this directory
            if st.st_uid == old_uid:
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                changed += 1
        if os.fstat(dir_fd).st_uid == old_uid:
            os.fchown(dir_fd, uid, gid)
            changed += 1
    return changed


def hand_back(paths: HostPaths, repository: str, host: Host | None = None) -> list[str]:
    """Before a release that ran everything as one user (`stellarbase`) takes over again,
    as a rollback does: give that user back what its units open, with them stopped.

    The older release's install re-owns only the top of each directory, so without this
    its PostgreSQL would start over files it cannot read. Returns what was handed back.
    `host`: where the units stop (None: the one `paths` names).
    """
    host = host or for_paths(paths)
    try:
        legacy_uid, legacy_gid = facts.lookup_ids(paths, LEGACY_USER, GROUP)
    except KeyError:
        return []  # that release never ran on this host
    agent = load_catalog().services["agent"].unit
    dirs = [
        (paths.postgres_data, POSTGRES_USER, layout.POSTGRES_UNIT),
        (paths.redis_data, REDIS_USER, layout.REDIS_UNIT),
        (paths.wal_spool, AGENT_USER, agent),
    ]
    repo_dir = RepositoryLocation.parse(repository).directory  # the one parser of the text
    if repo_dir is not None:
        dirs.append((paths.at(repo_dir), AGENT_USER, agent))
    done: list[str] = []
    for top, user, unit in dirs:
        try:
            uid, _ = facts.lookup_ids(paths, user, "root")
            owner = top.lstat().st_uid
        except (KeyError, FileNotFoundError):
            continue
        if owner != uid:
            continue
        host.stop([unit])
        count = reown_tree(top, uid, legacy_uid, legacy_gid)
        done.append(f"{paths.host_view(top)}: {count} entries back to {LEGACY_USER}")
    return done
