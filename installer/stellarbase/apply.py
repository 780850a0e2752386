"""The executor: the only code that changes the host. Every step checks first, then acts.

Files under the root it writes itself; everything else goes through its `Host` (host.py).
A host with no running system (--root) skips the steps the plan marks as needing one.
"""

from __future__ import annotations

import difflib
import errno
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from stellarbase import __version__, facts, install_state, localdeps, reown, systemd
from stellarbase.errors import StellarError
from stellarbase.files import copy_atomic, file_digest, symlink_atomic, write_atomic
from stellarbase.host import Host, for_paths
from stellarbase.install_state import State
from stellarbase.paths import HostPaths
from stellarbase.result import Status, StepResult
from stellarbase.steps import (
    ConfigureArchiving,
    CopyFile,
    DaemonReload,
    EnsureDatabase,
    EnsureDataDir,
    EnsureDir,
    EnsureUser,
    FirstBackup,
    InitPostgres,
    Migrate,
    Plan,
    RemoveStale,
    StartUnit,
    Step,
    StopUnits,
    Symlink,
    WaitHealthy,
    WriteFile,
    describe,
)

log = structlog.get_logger()

# What a step did: a detail when it changed something (None: nothing to do), and a diff.
Outcome = tuple[str | None, str]


@dataclass
class Executor:
    paths: HostPaths
    dry_run: bool = False
    config_source: str = ""
    database_url: str = ""
    # Rolling: restart changed units one at a time, each ready before the next (upgrades).
    rolling: bool = False
    unit_timeout: float = 60.0
    host: Host | None = None  # None: the one `paths` names (host.for_paths)
    results: list[StepResult] = field(default_factory=list)
    # Unit states from one `systemctl show` of every unit of the plan; emptied whenever
    # systemd is told to change something, so a guard never reads a stale state.
    _units: dict[str, systemd.UnitStatus] = field(default_factory=dict)
    _plan_units: list[str] = field(default_factory=list)
    # Every path this run changed, as it was before, while no service has been started,
    # stopped or restarted and no data changed: a failure then puts them all back. None
    # once a step changed more than files or failed where it may have (the re-run
    # converges from there), and in a dry run.
    _undo: list[_Kept] | None = None

    def __post_init__(self) -> None:
        self._host: Host = self.host or for_paths(self.paths)

    def apply(self, plan: Plan) -> list[StepResult]:
        current = install_state.load(self.paths.state_file)
        # The one decision a files-only host makes: what needs a running system is skipped.
        steps = [s for s in plan.steps if self._host.running_system or s not in plan.needs_system]
        self._plan_units = list(
            dict.fromkeys(
                unit
                for step in steps
                if isinstance(step, StartUnit | StopUnits | DaemonReload)
                for unit in ((step.unit,) if isinstance(step, StartUnit) else step.units)
            )
        )
        self._undo = None if self.dry_run else [_keep(self.paths.state_file)]
        for index, step in enumerate(steps, start=1):
            name = describe(step)
            try:
                result = self._take(step, name, current, plan)
                if not self.dry_run:
                    self._host.step_done(index)  # may end the run here (tests)
            except BaseException as exc:
                if not isinstance(step, LEAVES_NOTHING_WHEN_FAILED):
                    self._undo = None  # it may have acted on a service or data before failing
                lines = self._put_back()
                if isinstance(exc, StellarError):
                    self.results.append(StepResult(name, Status.FAILED, exc.message))
                    exc.details.extend(lines)
                raise
            self.results.append(result)
        if not self.dry_run:
            current.files = list(plan.owned)
            self._save(current)
        return self.results

    def _take(self, step: Step, name: str, current: State, plan: Plan) -> StepResult:
        detail, diff = self._do(step, current, plan)
        if detail and not isinstance(step, FILE_STEPS):
            self._undo = None  # a service or the data moved on: the files are in use
        if detail and not self.dry_run:
            log.info("step", step=name, changed=detail)
        return StepResult(name, Status.CHANGED if detail else Status.UNCHANGED, detail or "", diff)

    def _do(self, step: Step, current: State, plan: Plan) -> Outcome:
        if self.dry_run and isinstance(step, NEED_RUNNING_SERVERS):
            return None, ""  # the real run reports what they changed
        handlers: dict[type, Callable[..., Outcome]] = {
            EnsureUser: self._ensure_user,
            EnsureDir: self._ensure_dir,
            EnsureDataDir: self._ensure_data_dir,
            WriteFile: self._write_file,
            CopyFile: self._copy_file,
            Symlink: self._symlink,
            RemoveStale: self._remove_stale,
            StopUnits: self._stop_units,
            DaemonReload: self._daemon_reload,
            StartUnit: self._start_unit,
            InitPostgres: self._init_postgres,
            EnsureDatabase: self._ensure_database,
            ConfigureArchiving: self._configure_archiving,
            FirstBackup: self._first_backup,
            Migrate: self._migrate,
            WaitHealthy: self._wait_healthy,
        }
        result = handlers[type(step)](step, current)
        # Record ownership as soon as the state dir exists, before the files themselves,
        # so that uninstall after a crash still knows them.
        if (
            isinstance(step, EnsureDir)
            and step.path == self.paths.state_dir
            and not self.dry_run
            and not set(plan.owned) <= set(current.files)
        ):
            current.files = list(dict.fromkeys([*current.files, *plan.owned]))
            self._save(current)
        return result

    def _remember(self, path: Path) -> None:
        if self._undo is not None:
            self._undo.append(_keep(path))

    def _put_back(self) -> list[str]:
        """After a failure: the changed paths as they were, when no service saw them yet.

        The state file first (it is inside a directory this run may have made), then the
        rest newest first, so a directory is emptied before it is removed. Lines for the error.
        """
        kept, self._undo = self._undo, None
        if not kept or len(kept) == 1:
            return []
        failed: list[str] = []
        for each in [kept[0], *reversed(kept[1:])]:
            try:
                _restore(each)
            except OSError as exc:
                failed.append(f"{each.path}: {exc.strerror or exc}")
        if any(k.path.parent == self.paths.unit_dir for k in kept):
            self._units = {}
            self._host.daemon_reload()
        changed = len({k.path for k in kept[1:]})
        if failed:
            log.error("could not put back every file", failed=failed)
            return [
                f"no service was touched, but {len(failed)} of the {changed} paths this run "
                "changed could not be put back: " + "; ".join(failed),
                "running install again with the intended config converges them",
            ]
        log.info("failed before any service saw the change; files put back", paths=changed)
        return [f"no service was touched: the {changed} paths this run changed are as they were"]

    def _show(self, units: list[str]) -> dict[str, systemd.UnitStatus]:
        if any(u not in self._units for u in units):
            self._units = self._host.show(list(dict.fromkeys([*self._plan_units, *units])))
        return {u: self._units[u] for u in units}

    def _save(self, current: State) -> None:
        if self.paths.state_dir.is_dir():
            current.version = __version__
            current.config_source = self.config_source or current.config_source
            current.database_url = self.database_url or current.database_url
            install_state.save(self.paths.state_file, current)

    # --- files ------------------------------------------------------------------------------

    def _ids(self, owner: str, group: str) -> tuple[int, int]:
        try:
            return facts.lookup_ids(self.paths, owner, group)
        except KeyError:
            if self.dry_run:
                return -1, -1  # the user is created by an earlier step of the same plan
            raise

    def _ensure_user(self, step: EnsureUser, _: State) -> Outcome:
        missing = [u for u in step.users if not facts.user_exists(self.paths, u)]
        if not missing:
            return None, ""
        if not self.dry_run:
            self._host.sysusers(step.sysusers)
        return "created system users " + ", ".join(missing), ""

    def _ensure_dir(self, step: EnsureDir, _: State) -> Outcome:
        uid, gid = self._ids(step.owner, step.group)
        try:
            st = step.path.stat()
        except FileNotFoundError:
            if not self.dry_run:
                made = [p for p in [step.path, *step.path.parents] if not p.exists()]
                for each in reversed(made):  # outermost first: put back innermost first
                    self._remember(each)
                step.path.mkdir(mode=step.mode, parents=True)
                os.chmod(step.path, step.mode)  # mkdir's mode is masked by the umask
                os.chown(step.path, uid, gid)
            return "created", ""
        if _same_meta(st, step.mode, uid, gid):
            return None, ""
        if not self.dry_run:
            self._remember(step.path)
            os.chmod(step.path, step.mode)
            os.chown(step.path, uid, gid)
        return f"owner/mode set to {step.owner}:{step.group} {step.mode:04o}", ""

    def _ensure_data_dir(self, step: EnsureDataDir, _: State) -> Outcome:
        """EnsureDir, and a directory still owned by the previous user re-owned whole."""
        uid, gid = self._ids(step.owner, step.group)
        try:
            st = step.path.lstat()
        except FileNotFoundError:
            return self._ensure_dir(EnsureDir(step.path, step.owner, step.group, step.mode), _)
        try:
            old_uid, _gid = facts.lookup_ids(self.paths, step.previous, "root")
        except KeyError:
            old_uid = -1  # never installed by a release that ran everything as one user
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != old_uid or old_uid == uid:
            return self._ensure_dir(EnsureDir(step.path, step.owner, step.group, step.mode), _)
        if not step.reown:
            return None, ""  # re-owned once the new units are loaded (the same step, later)
        detail = f"re-owned from {step.previous} to {step.owner}"
        if self.dry_run:
            return detail, ""
        self._undo = None  # the units stop: the host is past putting files back
        running = [u for u, s in self._show(list(step.units)).items()
                   if s.active_state != "inactive"]  # fmt: skip
        if running:
            self._units = {}
            self._host.stop(running)
            detail += " (stopped " + ", ".join(running) + " meanwhile)"
        count = reown.reown_tree(step.path, old_uid, uid, gid)
        fd = os.open(step.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, step.mode)
        finally:
            os.close(fd)
        return f"{detail}: {count} entries", ""

    def _write_file(self, step: WriteFile, _: State) -> Outcome:
        uid, gid = self._ids(step.owner, step.group)
        old = _read(step.path)
        if old == step.content and _same_meta(step.path.stat(), step.mode, uid, gid):
            return None, ""
        if old != step.content:
            diff = _diff(step.path, old, step.content, secret=step.secret)
            detail = "created" if old is None else "content changed"
        else:
            diff, detail = "", f"owner/mode set to {step.owner}:{step.group} {step.mode:04o}"
        if not self.dry_run:
            self._remember(step.path)
            write_atomic(step.path, step.content, mode=step.mode, uid=uid, gid=gid)
        return detail, diff

    def _copy_file(self, step: CopyFile, _: State) -> Outcome:
        uid, gid = self._ids(step.owner, step.group)
        exists = step.path.exists()
        if (
            exists
            and _same_meta(step.path.stat(), step.mode, uid, gid)
            and file_digest(step.path) == step.digest
        ):
            return None, ""
        if not self.dry_run:
            self._remember(step.path)
            copy_atomic(step.path, step.source, mode=step.mode, uid=uid, gid=gid)
        return ("replaced" if exists else "created"), ""

    def _symlink(self, step: Symlink, _: State) -> Outcome:
        if step.path.is_symlink() and os.readlink(step.path) == step.target:
            return None, ""
        if not self.dry_run:
            self._remember(step.path)
            symlink_atomic(step.path, step.target)
        return f"now points to {step.target}", ""

    def _remove_stale(self, step: RemoveStale, _: State) -> Outcome:
        present = [p for p in step.paths if p.exists() or p.is_symlink()]
        if not present:
            return None, ""
        if not self.dry_run:
            for path in sorted(present, key=lambda p: len(p.parts), reverse=True):
                remove_path(path)
        return "removed " + ", ".join(p.name for p in present), ""

    # --- units ------------------------------------------------------------------------------

    def _stop_units(self, step: StopUnits, current: State) -> Outcome:
        running = [
            u for u, s in self._show(list(step.units)).items() if s.active_state != "inactive"
        ]
        known = [u for u in step.units if u in current.units]
        if not running and not known:
            return None, ""
        if not self.dry_run:
            self._units = {}
            self._host.stop(running)
            self._host.reset_failed(list(step.units))
            for unit in step.units:
                current.units.pop(unit, None)
                current.ports.pop(unit, None)
            self._save(current)
        return "stopped " + ", ".join(step.units), ""

    def _daemon_reload(self, step: DaemonReload, _: State) -> Outcome:
        stale = [u for u, s in self._show(list(step.units)).items() if s.need_daemon_reload]
        if not stale:
            return None, ""
        if not self.dry_run:
            self._units = {}
            self._host.daemon_reload()
        return "units changed on disk: " + ", ".join(stale), ""

    def _start_unit(self, step: StartUnit, current: State) -> Outcome:
        status = self._show([step.unit])[step.unit]
        running = status.active_state in ("active", "activating", "reloading")
        recorded = current.units.get(step.unit)
        if running and (recorded == step.digest or not step.restart_on_change):
            return None, ""
        if self.dry_run:
            return ("restart: inputs changed" if running else "start"), ""
        self._units = {}
        if running:
            # Until the restart is done the unit's inputs are unknown: a crash or a failed
            # readiness wait here must leave it to be restarted by the next converge.
            current.units[step.unit] = ""
            self._save(current)
            # A deliberate restart is no crash loop: it must not use up StartLimitBurst,
            # or a few upgrades and rollbacks in a row would leave the unit refusing to start.
            self._host.reset_failed([step.unit])
        if running and self.rolling:
            self._host.restart(step.unit, wait=True)
            if step.ready_url:
                ready = [(step.unit, step.ready_url)]
                self._host.wait_healthy([step.unit], ready, self.unit_timeout)
            detail = "restarted and ready: inputs changed"
        elif running:
            self._host.restart(step.unit)
            detail = "restarted: inputs changed"
        else:
            self._host.reset_failed([step.unit])
            self._host.start(step.unit)
            detail = "started"
        current.units[step.unit] = step.digest
        if step.port:
            current.ports[step.unit] = step.port
        self._save(current)
        return detail, ""

    # --- local dependencies and the schema -------------------------------------------------

    def _init_postgres(self, step: InitPostgres, _: State) -> Outcome:
        if localdeps.cluster_ready(step.data_dir):
            return None, ""
        if not self.dry_run:
            self._host.init_cluster(step.bindir, step.data_dir, step.admin_password)
        return "initdb with data checksums and scram-sha-256", ""

    def _configure_archiving(self, step: ConfigureArchiving, _: State) -> Outcome:
        changed, restart = self._host.configure_settings(
            step.port, step.admin_password, step.settings, step.timeout
        )
        if not changed:
            return None, ""
        detail = "set " + ", ".join(changed)
        if restart:
            self._units = {}
            self._host.restart(step.unit)
            self._host.wait_until_up(step.port, step.admin_password, step.timeout)
            detail += f"; restarted {step.unit} for " + ", ".join(restart)
        return detail, ""

    def _first_backup(self, step: FirstBackup, current: State) -> Outcome:
        if current.features.get("first_backup"):
            return None, ""
        if not self.dry_run:
            self._host.start(step.unit)  # runs on; `stellarbase backup list` shows it
            current.features["first_backup"] = True
            self._save(current)
        return "started; it runs in the background", ""

    def _ensure_database(self, step: EnsureDatabase, current: State) -> Outcome:
        changed, vector = self._host.ensure_database(
            step.port, step.admin_password, step.app_password, step.timeout
        )
        if current.features.get("vector") != vector:
            current.features["vector"] = vector
            self._save(current)
        return (", ".join(changed) or None), ""

    def _migrate(self, step: Migrate, _: State) -> Outcome:
        try:
            states = self._host.migration_status(step.url, step.password)
        except StellarError:
            if self.dry_run:  # a local server not started yet: everything is pending
                return "all migrations pending", ""
            raise
        pending = [m for m in states if not m.applied_at]
        # An edited or unknown applied migration goes to migrate_up too, which refuses it
        # unless the schema declares this release compatible (a rollback after an upgrade).
        if not pending and all(m.checksum_matches and m.shipped for m in states):
            return None, ""
        if self.dry_run:
            return "apply " + ", ".join(f"{m.version:04d}_{m.name}" for m in pending), ""
        done = self._host.migrate_up(step.url, step.password)
        if not done:
            return None, ""
        return "applied " + ", ".join(m.filename.removesuffix(".sql") for m in done), ""

    def _wait_healthy(self, step: WaitHealthy, _: State) -> Outcome:
        self._host.wait_healthy(list(step.units), list(step.ready_urls), step.timeout)
        return None, ""


# Steps a dry run cannot ask: they need the servers running, which a plan never starts.
NEED_RUNNING_SERVERS = (ConfigureArchiving, EnsureDatabase, WaitHealthy)

# Steps that change only files and directories (and systemd's view of the unit files):
# until another kind changes something, a failure can put the host back as it was.
FILE_STEPS = (
    EnsureDir,
    EnsureDataDir,
    EnsureUser,
    WriteFile,
    CopyFile,
    Symlink,
    DaemonReload,
    WaitHealthy,
)
# Steps whose failure leaves nothing of theirs beyond files: a migration that fails is
# rolled back (those before it stay, and the schema stays compatible with the running
# release). A unit start or a database change that fails may have acted first.
LEAVES_NOTHING_WHEN_FAILED = (*FILE_STEPS, Migrate)


@dataclass(frozen=True)
class _Kept:
    """A path as it was before this run changed it: absent, a file, a symlink or a dir."""

    path: Path
    kind: str
    content: bytes = b""
    target: str = ""
    mode: int = 0
    uid: int = -1
    gid: int = -1


def _keep(path: Path) -> _Kept:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return _Kept(path, "absent")
    if stat.S_ISLNK(st.st_mode):
        return _Kept(path, "link", target=os.readlink(path))
    mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    if stat.S_ISDIR(st.st_mode):
        return _Kept(path, "dir", mode=mode, uid=uid, gid=gid)
    return _Kept(path, "file", content=path.read_bytes(), mode=mode, uid=uid, gid=gid)


def _restore(kept: _Kept) -> None:
    path = kept.path
    if kept.kind == "absent":
        if path.is_dir() and not path.is_symlink():
            try:
                path.rmdir()
            except OSError as exc:  # made by this run, but what is left in it is not its own
                if exc.errno != errno.ENOTEMPTY:
                    raise
        else:
            path.unlink(missing_ok=True)
    elif kept.kind == "link":
        symlink_atomic(path, kept.target)
    elif kept.kind == "dir":
        os.chmod(path, kept.mode)
        os.chown(path, kept.uid, kept.gid)
    else:
        write_atomic(path, kept.content, mode=kept.mode, uid=kept.uid, gid=kept.gid)


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _same_meta(st: os.stat_result, mode: int, uid: int, gid: int) -> bool:
    return stat.S_IMODE(st.st_mode) == mode and (uid, gid) in ((st.st_uid, st.st_gid), (-1, -1))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _diff(path: Path, old: bytes | None, new: bytes, *, secret: bool) -> str:
    if secret:
        return f"--- {path}\n+++ {path}\n(secret content not shown)\n"
    before = (old or b"").decode(errors="replace").splitlines(keepends=True)
    after = new.decode(errors="replace").splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(before, after, f"{path} (current)" if old else "/dev/null", str(path))
    )
