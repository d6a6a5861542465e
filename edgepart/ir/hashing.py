"""Content hashes of a bundle's files, and the check every loader runs before reading one."""
from __future__ import annotations

import hashlib
from pathlib import Path

from edgepart.errors import BundleError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_relative(rel: str, where: str) -> None:
    """``rel`` must name a file inside the bundle: relative, without ``..``."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise BundleError(f"{where}: names file {rel!r} outside the bundle")


def verify_file(bundle_dir: str | Path, rel: str, files: dict[str, str]) -> Path:
    """The path of bundle file ``rel`` after checking it is listed in ``files`` (the manifest's
    ``files``: relative path -> sha256), lies inside ``bundle_dir``, is a regular file and not a
    symlink, and has that sha256. Raises BundleError naming the file otherwise."""
    bundle_dir = Path(bundle_dir)
    check_relative(rel, str(bundle_dir / "manifest.json"))
    path = bundle_dir / rel
    expected = files.get(rel)
    if expected is None:
        raise BundleError(f"{path}: not listed in manifest.json; the bundle is inconsistent, compile it again")
    if path.is_symlink():
        raise BundleError(f"{path}: is a symbolic link; a bundle's files must be regular files inside it")
    if not path.is_file():
        raise BundleError(f"{path}: missing; the bundle is incomplete, copy it again or compile it again")
    if sha256_file(path) != expected:
        raise BundleError(f"{path}: sha256 does not match manifest.json; the file was modified or corrupted — "
                          "refusing to load it (recompile or copy the bundle again)")
    return path
