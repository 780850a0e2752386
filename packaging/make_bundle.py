"""Build the release bundle: dist/stellarbase-<version>-linux-<arch>.tar.gz.

Usage: .venv/bin/python packaging/make_bundle.py [--binary dist/stellarbase] [--out dist]
           [--version V] [--arch A] [--upgrade-from V]
Needs STELLARBASE_SIGNING_KEY: the path of the ed25519 private key (PEM, PKCS#8), which is
kept off the repository. With SOURCE_DATE_EPOCH set, the same inputs give the same bytes.

The format (what `stellarbase.bundle.verify_bundle` checks) is described in that module.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "installer"))

# The source tree is put on the path above, so these imports come after it.
from stellarbase import __version__, bundle, migrate  # noqa: E402

SIGNING_KEY_ENV = "STELLARBASE_SIGNING_KEY"
LICENSE_PLACEHOLDER = b"License: see the project's distribution terms\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", type=Path, default=REPO / "dist" / "stellarbase")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--version", default=__version__)
    parser.add_argument("--arch", default=platform.machine())
    parser.add_argument("--upgrade-from", help="oldest version this one upgrades (default: same)")
    parser.add_argument(
        "--revoke", action="append", default=[], metavar="VERSION",
        help="an older release this one withdraws: hosts that install it refuse that one",
    )  # fmt: skip
    args = parser.parse_args(argv)
    key_path = os.environ.get(SIGNING_KEY_ENV)
    if not key_path:
        print(f"make_bundle.py: set {SIGNING_KEY_ENV} to the signing key's path", file=sys.stderr)
        return 1
    if not args.binary.is_file():
        print(f"make_bundle.py: {args.binary} not found; run packaging/build.sh", file=sys.stderr)
        return 1
    out = build_bundle(
        binary=args.binary,
        out_dir=args.out,
        version=args.version,
        arch=args.arch,
        upgrade_from=args.upgrade_from or args.version,
        signing_key=load_signing_key(Path(key_path)),
        source_date_epoch=source_date_epoch(),
        revoked=tuple(args.revoke),
    )
    print(f"built {out} ({out.stat().st_size} bytes)")
    return 0


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SystemExit(f"make_bundle.py: {path} is not an ed25519 private key")
    return key


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    return int(value) if value else None


def schema_range() -> dict[str, int]:
    """What the release's migrations say: the schema it migrates to ("max") and the oldest
    release schema that still runs against it ("min", from `-- compatible-from:` headers)."""
    return migrate.schema_range(migrate.load_migrations()).as_dict()


def release_json(
    version: str, upgrade_from: str, built: int, revoked: tuple[str, ...] = ()
) -> bytes:
    built_at = datetime.datetime.fromtimestamp(built, datetime.UTC)
    data: dict[str, object] = {
        "bundle_format": bundle.FORMAT,
        "version": version,
        "schema": schema_range(),
        "upgrade_from": upgrade_from,
        "built_at": built_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if revoked:  # older releases this one withdraws; signed with the rest
        data["revoked"] = sorted(set(revoked))
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def bundle_files(
    binary: Path,
    version: str,
    upgrade_from: str,
    signing_key: Ed25519PrivateKey,
    built: int,
    revoked: tuple[str, ...] = (),
) -> dict[str, bytes]:
    """Name → content of every file in the bundle directory."""
    license_file = REPO / "LICENSE"
    files = {
        bundle.BINARY: binary.read_bytes(),
        bundle.RELEASE: release_json(version, upgrade_from, built, revoked),
        "README.md": (REPO / "README.md").read_bytes(),
        "LICENSE": license_file.read_bytes() if license_file.exists() else LICENSE_PLACEHOLDER,
    }
    sums = "".join(
        f"{hashlib.sha256(body).hexdigest()}  {name}\n" for name, body in sorted(files.items())
    ).encode()
    files[bundle.SUMS] = sums
    files[bundle.SIGNATURE] = base64.b64encode(signing_key.sign(sums)) + b"\n"
    return files


def build_bundle(
    *,
    binary: Path,
    out_dir: Path,
    version: str,
    arch: str,
    upgrade_from: str,
    signing_key: Ed25519PrivateKey,
    source_date_epoch: int | None,
    revoked: tuple[str, ...] = (),
) -> Path:
    built = source_date_epoch if source_date_epoch is not None else int(_now())
    files = bundle_files(binary, version, upgrade_from, signing_key, built, revoked)
    top = f"stellarbase-{version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{top}-linux-{arch}.tar.gz"
    partial = out.with_name(f".{out.name}.partial")
    # mtime 0 and no file name in the gzip header: the bytes depend on the content only
    with (
        partial.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        tar.addfile(_entry(top, tarfile.DIRTYPE, 0o755, 0, built))
        for name in sorted(files):
            mode = 0o755 if name == bundle.BINARY else 0o644
            info = _entry(f"{top}/{name}", tarfile.REGTYPE, mode, len(files[name]), built)
            tar.addfile(info, io.BytesIO(files[name]))
    with partial.open("rb") as written:
        os.fsync(written.fileno())
    partial.replace(out)
    return out


def _entry(name: str, kind: bytes, mode: int, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


if __name__ == "__main__":
    sys.exit(main())
