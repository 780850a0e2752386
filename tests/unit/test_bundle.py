"""Release bundles: built by packaging/make_bundle.py, refused when anything in them is off."""

from __future__ import annotations

import base64
import gzip
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stellarbase import __version__, cli, release_key
from stellarbase.bundle import verify_bundle
from stellarbase.errors import ExitCode, StellarError
from tests.filetree import file_states
from tests.release_builds import (
    bundle_members,
    change_sums,
    drop_signature,
    flip_binary_byte,
    rewrite_bundle,
    sign_with_other_key,
)

REPO = Path(__file__).resolve().parents[2]
FAKE_BINARY = b"\x7fELF fake stellarbase release binary\n" * 64
EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z


def _load_make_bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_bundle", REPO / "packaging/make_bundle.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_bundle = _load_make_bundle()


@pytest.fixture(autouse=True)
def _logs_to_default_stream() -> Iterator[None]:
    """A CLI test points the logs at its captured stderr, closed after it: put them back."""
    yield
    structlog.reset_defaults()


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def signing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ed25519PrivateKey:
    """A throwaway key pair; its public half replaces the built-in release key."""
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "release-pub.pem"
    pub.write_bytes(_public_pem(key))
    monkeypatch.setenv(release_key.OVERRIDE_ENV, str(pub))
    return key


BuildFn = Callable[..., Path]


@pytest.fixture
def build(tmp_path: Path, signing_key: Ed25519PrivateKey) -> BuildFn:
    binary = tmp_path / "stellarbase"
    binary.write_bytes(FAKE_BINARY)

    def _build(out: str = "dist", **overrides: object) -> Path:
        args: dict[str, object] = {
            "binary": binary,
            "out_dir": tmp_path / out,
            "version": __version__,
            "arch": "x86_64",
            "upgrade_from": __version__,
            "signing_key": signing_key,
            "source_date_epoch": EPOCH,
        }
        path: Path = make_bundle.build_bundle(**(args | overrides))
        return path

    return _build


def _refusal(path: Path) -> StellarError:
    with pytest.raises(StellarError) as caught:
        verify_bundle(path)
    assert caught.value.code == ExitCode.BUNDLE
    assert "\n" not in caught.value.message and caught.value.hint
    return caught.value


def test_bundle_layout_and_verification(build: BuildFn) -> None:
    path = build()
    assert path.name == f"stellarbase-{__version__}-linux-x86_64.tar.gz"
    top = f"stellarbase-{__version__}"
    members = bundle_members(path)
    assert sorted(members) == [
        top,
        *(
            f"{top}/{n}"
            for n in (
                "LICENSE",
                "README.md",
                "SHA256SUMS",
                "SHA256SUMS.sig",
                "release.json",
                "stellarbase",
            )
        ),
    ]
    sums = members[f"{top}/SHA256SUMS"].decode().splitlines()
    assert [line.split("  ")[1] for line in sums] == [
        "LICENSE",
        "README.md",
        "release.json",
        "stellarbase",
    ]
    assert len(base64.b64decode(members[f"{top}/SHA256SUMS.sig"])) == 64

    with verify_bundle(path) as verified:
        assert verified.binary.read_bytes() == FAKE_BINARY
        assert verified.release.version == __version__
        assert verified.release.upgrade_from == __version__
        assert verified.release.built_at == "2026-01-01T00:00:00Z"
        assert (verified.release.schema_min, verified.release.schema_max) == (0, 2)
        assert stat.S_IMODE(verified.workdir.stat().st_mode) == 0o700
        workdir = verified.workdir
    assert not workdir.exists()


def test_same_inputs_and_epoch_give_identical_bytes(build: BuildFn) -> None:
    first = build(out="one").read_bytes()
    second = build(out="two").read_bytes()
    assert first == second
    with gzip.open(io.BytesIO(first)) as gz, tarfile.open(fileobj=gz) as tar:
        assert {(m.mtime, m.uid, m.gid) for m in tar.getmembers()} == {(EPOCH, 0, 0)}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (flip_binary_byte, "stellarbase does not match its checksum in SHA256SUMS"),
        (change_sums, "signature of SHA256SUMS does not match any trusted release key"),
        (drop_signature, "unsigned: SHA256SUMS.sig is missing"),
        (sign_with_other_key, "signature of SHA256SUMS does not match any trusted release key"),
    ],
    ids=["binary-byte-flipped", "sums-changed", "signature-missing", "other-key"],
)
def test_tampered_bundle_is_refused(
    build: BuildFn, change: Callable[[dict[str, bytes]], None], expected: str
) -> None:
    assert expected in _refusal(rewrite_bundle(build(), change)).message


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_bundle_is_refused(build: BuildFn, keep: float) -> None:
    path = build()
    body = path.read_bytes()
    path.write_bytes(body[: int(len(body) * keep)])
    assert "truncated or not a tar.gz" in _refusal(path).message


def test_unlisted_file_is_refused(build: BuildFn) -> None:
    def add_file(files: dict[str, bytes]) -> None:
        files["extra.sh"] = b"#!/bin/sh\n"

    assert (
        "not listed in SHA256SUMS: extra.sh" in _refusal(rewrite_bundle(build(), add_file)).message
    )


def _tarball(path: Path, *entries: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (_file("stellarbase-0.1.0/../../etc/evil"), "leaves the bundle directory"),
        (_file("/etc/evil"), "absolute path"),
        (_file("elsewhere/evil"), "lies outside stellarbase-0.1.0/"),
        (_file("stellarbase-0.1.0/sub/evil"), "not a plain file"),
        (_link("stellarbase-0.1.0/link", "/etc/shadow"), "not a plain file"),
        (_link("stellarbase-0.1.0/hard", "/etc/shadow", tarfile.LNKTYPE), "not a plain file"),
        (_link("stellarbase-0.1.0/dev", "", tarfile.CHRTYPE), "not a plain file"),
    ],
    ids=["dotdot", "absolute", "outside", "nested", "symlink", "hardlink", "device"],
)
def test_unsafe_entries_are_refused(
    tmp_path: Path, signing_key: Ed25519PrivateKey, entry: tarfile.TarInfo, expected: str
) -> None:
    path = _tarball(tmp_path / "evil.tar.gz", _file("stellarbase-0.1.0/README.md"), entry)
    assert expected in _refusal(path).message
    assert not (tmp_path / "etc").exists()


def _run_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["stellarbase", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)


def test_install_of_tampered_bundle_leaves_root_untouched(
    tmp_path: Path,
    build: BuildFn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("host\n")
    before = file_states(root)
    tampered = rewrite_bundle(build(), flip_binary_byte)
    code = _run_cli(monkeypatch, "install", "--root", str(root), "--bundle", str(tampered))
    assert code == ExitCode.BUNDLE == 12
    err = capsys.readouterr().err
    assert "stellarbase does not match its checksum" in err
    assert file_states(root) == before
    assert not list(scratch.iterdir())  # the unpacked files went with the refusal


def _recording_binary(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    """A stand-in release binary: a script that writes its command line and exits."""
    record = tmp_path / "child-argv"
    script = tmp_path / "child-stellarbase"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit {exit_code}\n')
    return script, record


def _installed(root: Path, version: str) -> None:
    state = root / "var/lib/stellarbase/state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"version": version}))


def test_install_of_another_version_hands_over_once_verified(
    tmp_path: Path, build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, record = _recording_binary(tmp_path, exit_code=7)
    path = build(binary=script, version="9.9.9", upgrade_from="0.1.0")
    root = tmp_path / "root"
    argv = ["install", "--root", str(root), "--bundle", str(path), "--tier", "pilot"]
    assert _run_cli(monkeypatch, *argv) == 7  # the bundle's binary's exit code
    assert record.read_text().splitlines() == argv

    record.unlink()
    tampered = rewrite_bundle(path, flip_binary_byte)
    assert _run_cli(monkeypatch, "install", "--root", str(root), "--bundle", str(tampered)) == 12
    assert not record.exists(), "an unverified binary ran"


def test_older_release_is_refused_unless_allowed(
    tmp_path: Path,
    build: BuildFn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script, record = _recording_binary(tmp_path)
    older = build(binary=script, version="0.0.9", upgrade_from="0.0.9")
    root = tmp_path / "root"
    _installed(root, __version__)
    argv = ["install", "--root", str(root), "--bundle", str(older)]
    assert _run_cli(monkeypatch, *argv) == ExitCode.UPGRADE
    err = capsys.readouterr().err
    assert f"release 0.0.9 is older than the installed {__version__}" in err
    assert "--allow-downgrade" in err
    assert not record.exists()

    assert _run_cli(monkeypatch, *argv, "--allow-downgrade") == 0
    assert record.read_text().splitlines() == [*argv, "--allow-downgrade"]


def test_running_an_older_binary_directly_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    _installed(root, "9.9.9")
    assert _run_cli(monkeypatch, "install", "--root", str(root)) == ExitCode.UPGRADE
    assert f"release {__version__} is older than the installed 9.9.9" in capsys.readouterr().err


def _pax_bomb(path: Path, header_bytes: int) -> Path:
    """A small tar.gz whose first entry is a pax header of header_bytes (zeros)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, header_bytes
    with gzip.open(path, "wb", compresslevel=9) as gz:
        gz.write(info.tobuf(tarfile.USTAR_FORMAT))
        chunk = bytes(1 << 20)
        for _ in range(header_bytes >> 20):
            gz.write(chunk)
        gz.write(bytes(1024))
    return path


def test_oversized_pax_header_is_refused_in_bounded_memory(
    tmp_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    bomb = _pax_bomb(tmp_path / "bomb.tar.gz", 400 << 20)
    assert bomb.stat().st_size < 1 << 20
    # The whole command under an address-space limit the 400 MB header would break.
    limit = 768 << 20
    code = (
        "import resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
        "from stellarbase.cli import main; "
        f"sys.argv = ['stellarbase', 'install', '--root', {str(tmp_path / 'root')!r}, "
        f"'--bundle', {str(bomb)!r}]; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == ExitCode.BUNDLE, done.stderr
    assert "pax or GNU extension header" in done.stderr
    assert "hint:" in done.stderr


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME])
def test_extension_headers_are_refused(
    tmp_path: Path, signing_key: Ed25519PrivateKey, kind: bytes
) -> None:
    info = tarfile.TarInfo("stellarbase-0.1.0/x")
    info.type, info.size = kind, 10
    path = _tarball(tmp_path / "ext.tar.gz", info)
    assert "pax or GNU extension header" in _refusal(path).message


def test_garbage_header_is_a_bundle_error(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    path = tmp_path / "garbage.tar.gz"
    with gzip.open(path, "wb") as gz:
        gz.write(b"\xff" * 2048)
    assert "not a tar.gz" in _refusal(path).message


def test_members_are_unpacked_on_disk_not_in_tmp(
    build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    with verify_bundle(build()) as verified:
        assert verified.workdir.parent == Path("/var/tmp")


@pytest.mark.host_commands  # systemd-sysusers --root=<tmp> creates the user
def test_install_from_bundle_installs_its_binary(
    tmp_path: Path, build: BuildFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stellarbase.commands.install import install_bundle
    from stellarbase.commands.status import status
    from stellarbase.configload import load_config
    from stellarbase.paths import HostPaths

    paths = HostPaths(tmp_path / "root")
    result = install_bundle(load_config(env={}), paths, build(revoked=("0.0.5",)))
    assert result.messages[0].endswith("signature and checksums OK")
    assert f"verified with the keys of {release_key.OVERRIDE_ENV}=" in result.messages[1]
    assert (paths.current / "stellarbase").read_bytes() == FAKE_BINARY
    assert json.loads(json.dumps(result.as_dict()))["changed"] > 10
    # the override stays on record after the shell that set it is gone
    monkeypatch.delenv(release_key.OVERRIDE_ENV)
    shown = status(paths)
    assert any(line.startswith("release key: OVERRIDDEN by ") for line in shown.messages)
    assert "revoked releases: 0.0.5" in shown.messages
    assert shown.data["release_trust"]["key_override"]["action"] == "install"


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership rule applies to root only")
@pytest.mark.parametrize("mode", [0o666, 0o664])
def test_a_key_override_others_can_write_is_refused_for_root(
    build: BuildFn, tmp_path: Path, mode: int
) -> None:
    path = build()
    (tmp_path / "release-pub.pem").chmod(mode)
    err = _refusal(path)
    assert "another user could change which bundles root trusts" in err.message
    assert "chmod 644" in err.hint
