"""`uninstall`: stop and remove every unit and file the installer owns (config and data
stay unless --purge)."""

from __future__ import annotations

from pathlib import Path

import structlog

from stellarbase import facts, install_state, layout
from stellarbase.apply import remove_path
from stellarbase.commands.guards import record_audit, require_root, require_systemd
from stellarbase.host import for_paths
from stellarbase.paths import HostPaths
from stellarbase.result import Result

log = structlog.get_logger()


def uninstall(paths: HostPaths, *, purge: bool) -> Result:
    require_root(paths)
    require_systemd(paths)
    current = install_state.load(paths.state_file)
    host = for_paths(paths)  # a --root uninstall has no unit loaded: it removes files only
    known = host.show([layout.TARGET, *(u for u in current.units if u != layout.TARGET)])
    loaded = [u for u, s in known.items() if s.load_state == "loaded"]
    if host.running_system and current.database_url:  # while a local PostgreSQL still runs
        password = facts.generated_secrets(paths).get(layout.POSTGRES_PASSWORD)
        details = {"purge": purge, "units": loaded}
        record_audit((current.database_url, password), "uninstall", "success", details)
    host.stop(loaded)
    host.reset_failed(loaded)
    keep = () if purge else (paths.etc, paths.state_dir)

    def kept(view: str) -> bool:
        path = paths.at(view)
        return any(path == k or k in path.parents for k in keep)

    removed: list[str] = []
    doomed = [view for view in current.files if not kept(view)]
    for view in sorted(doomed, key=lambda p: len(Path(p).parts), reverse=True):
        path = paths.at(view)
        if path.exists() or path.is_symlink():
            remove_path(path)
            removed.append(view)
    for path in [paths.state_dir, paths.etc] if purge else []:
        if path.exists():
            remove_path(path)
            removed.append(paths.host_view(path))
    host.daemon_reload()
    if not purge and paths.state_dir.is_dir():
        still_ours = [view for view in current.files if kept(view)]
        install_state.save(
            paths.state_file, install_state.State(version=current.version, files=still_ours)
        )
    lines = [f"removed {len(removed)} paths"]
    if not purge:
        lines.append(
            f"kept {paths.host_view(paths.etc)} and {paths.host_view(paths.state_dir)}; "
            "--purge removes them too"
        )
    log.info("uninstalled", removed=len(removed), purge=purge)
    return Result("uninstall", {"removed": removed, "purged": purge}, tuple(lines))
