"""Signed release bundles of this source tree and of variants of it, and tampered copies.

A variant is a copy of the tree with another version, extra migrations and small source
edits, built by packaging/build.sh and bundled by packaging/make_bundle.py with a throwaway
key. Tests trust that key through STELLARBASE_RELEASE_PUBKEY.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO = Path(__file__).resolve().parent.parent
_TREE = ("installer", "units", "config", "packaging", "pyproject.toml", "README.md")
EPOCH = "1767225600"  # 2026-01-01: bundles of the same inputs are byte-identical


@dataclass(frozen=True)
class Variant:
    version: str
    upgrade_from: str = ""
    migrations: dict[str, str] = field(default_factory=dict)  # file name → SQL
    edits: tuple[tuple[str, str, str], ...] = ()  # (path in the tree, old text, new text)


@dataclass(frozen=True)
class SigningKey:
    private_pem: Path
    public_pem: str

    @classmethod
    def throwaway(cls, directory: Path, *, reuse: bool = False) -> SigningKey:
        """A new key pair in directory/signing-key.pem; with reuse, the one already there."""
        path = directory / "signing-key.pem"
        if reuse and path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), None)
            assert isinstance(loaded, Ed25519PrivateKey)
            key = loaded
        else:
            key = Ed25519PrivateKey.generate()
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            path.chmod(0o600)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(path, public.decode())


def make_bundle(binary: Path, out: Path, version: str, upgrade_from: str, key: SigningKey,
                tree: Path = REPO) -> Path:  # fmt: skip
    """Bundle `binary` as `version` with the make_bundle.py of `tree`; the bundle's path."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "STELLARBASE_SIGNING_KEY": str(key.private_pem),
           "SOURCE_DATE_EPOCH": EPOCH}  # fmt: skip
    argv = [str(REPO / ".venv" / "bin" / "python"), str(tree / "packaging" / "make_bundle.py"),
            "--binary", str(binary), "--out", str(out), "--version", version,
            "--upgrade-from", upgrade_from]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"make_bundle.py failed:\n{done.stdout}\n{done.stderr}")
    (bundle,) = out.glob(f"stellarbase-{version}-linux-*.tar.gz")
    return bundle


def build_variant(variant: Variant, workdir: Path, key: SigningKey) -> Path:
    """Copy the tree, apply the variant, build its binary and bundle it; the bundle's path."""
    tree = workdir / f"tree-{variant.version}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for name in _TREE:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tree / name)
    (tree / ".venv").symlink_to(REPO / ".venv")
    init = tree / "installer" / "stellarbase" / "__init__.py"
    text, count = re.subn(r'__version__ = "[^"]*"', f'__version__ = "{variant.version}"',
                          init.read_text())  # fmt: skip
    assert count == 1, "no __version__ line to replace"
    init.write_text(text)
    for name, sql in variant.migrations.items():
        (tree / "installer" / "stellarbase" / "migrations" / name).write_text(sql)
    for relative, old, new in variant.edits:
        path = tree / relative
        source_text = path.read_text()
        assert old in source_text, f"{relative}: {old!r} not found"
        path.write_text(source_text.replace(old, new, 1))
    # The smoke test reads the config: settings meant for the tests must not reach it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLARBASE_")}
    built = subprocess.run(["bash", "packaging/build.sh"], cwd=tree, capture_output=True,
                           text=True, check=False, env=env)  # fmt: skip
    if built.returncode != 0:
        raise RuntimeError(f"build of {variant.version} failed:\n{built.stdout[-3000:]}\n"
                           f"{built.stderr[-3000:]}")  # fmt: skip
    upgrade_from = variant.upgrade_from or variant.version
    return make_bundle(tree / "dist" / "stellarbase", workdir / "bundles", variant.version,
                       upgrade_from, key, tree)  # fmt: skip


# --- tampered bundles ---------------------------------------------------------------------


def bundle_members(path: Path) -> dict[str, bytes]:
    """Entry name → content (b"" for the directory) of a bundle."""
    with tarfile.open(path, "r:gz") as tar:
        return {
            m.name: (tar.extractfile(m) or io.BytesIO()).read() if m.isfile() else b""
            for m in tar.getmembers()
        }


def rewrite_bundle(path: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """Repack a bundle next to it after `change` edited its files (name in the top dir →
    bytes); the tampered copy's path."""
    members = bundle_members(path)
    top = next(name for name in members if "/" not in name)
    files = {name.removeprefix(top + "/"): body for name, body in members.items() if name != top}
    change(files)
    out = path.with_name("tampered-" + path.name)
    with tarfile.open(out, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out


def flip_binary_byte(files: dict[str, bytes]) -> None:
    body = bytearray(files["stellarbase"])
    body[100] ^= 0x01
    files["stellarbase"] = bytes(body)


def change_sums(files: dict[str, bytes]) -> None:
    """The binary is replaced and its line in SHA256SUMS updated to match."""
    old = hashlib.sha256(files["stellarbase"]).hexdigest().encode()
    files["stellarbase"] = b"#!/bin/sh\necho not the release\n"
    new = hashlib.sha256(files["stellarbase"]).hexdigest().encode()
    files["SHA256SUMS"] = files["SHA256SUMS"].replace(old, new)


def drop_signature(files: dict[str, bytes]) -> None:
    del files["SHA256SUMS.sig"]


def sign_with_other_key(files: dict[str, bytes]) -> None:
    other = Ed25519PrivateKey.generate()
    files["SHA256SUMS.sig"] = base64.b64encode(other.sign(files["SHA256SUMS"])) + b"\n"
