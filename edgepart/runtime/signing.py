"""Deploy keys: who may change what a worker runs, separate from who may run requests on it.

A worker started with ``--deploy-pubkey FILE`` takes a ``deploy`` frame only if it carries an
Ed25519 signature, by the matching private key, over the deploy statement::

    b"edgepart-deploy-v1\\n" + JSON {"bundle": <sha256 of manifest.json>, "device": <name>,
                                     "peers": {device: "host:port"}}      (sorted keys, no spaces)

The bundle id fixes the manifest, and the manifest fixes every file's sha256, so the signature
covers the device's program and weights as well as where the worker will send its pieces. The
shared run key (``--key-file``) then authenticates connections and requests only. Keys are made
by ``edgepart keygen`` (docs/security.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepart.errors import EdgepartError

STATEMENT_PREFIX = b"edgepart-deploy-v1\n"
SIGNATURE_HEX_LEN = 128


def deploy_statement(bundle_id: str, device: str, peers: dict[str, str]) -> bytes:
    """The bytes a deploy signature covers (see the module docstring)."""
    body = json.dumps({"bundle": bundle_id, "device": device, "peers": peers}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return STATEMENT_PREFIX + body.encode()


def sign_deploy(key: Ed25519PrivateKey, bundle_id: str, device: str, peers: dict[str, str]) -> str:
    """The hex signature a ``deploy`` frame carries in its ``signature`` field."""
    return key.sign(deploy_statement(bundle_id, device, peers)).hex()


def verify_deploy(key: Ed25519PublicKey, signature, bundle_id: str, device: str, peers: dict[str, str]) -> bool:
    """Whether ``signature`` (hex, from a deploy frame: unchecked input) signs this deploy."""
    if not isinstance(signature, str) or len(signature) != SIGNATURE_HEX_LEN:
        return False
    try:
        key.verify(bytes.fromhex(signature), deploy_statement(bundle_id, device, peers))
    except (ValueError, InvalidSignature):
        return False
    return True


def load_private_key(path) -> Ed25519PrivateKey:
    """A deploy (signing) key from a PEM file written by ``edgepart keygen --deploy``."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise EdgepartError(f"deploy key {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise EdgepartError(f"deploy key {path}: not a PEM private key (make one with edgepart keygen --deploy)"
                            ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgepartError(f"deploy key {path}: not an Ed25519 key")
    return key


def load_public_key(path) -> Ed25519PublicKey:
    """A deploy key's public half from a PEM file (``edgepart keygen --deploy`` writes FILE.pub)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as e:
        raise EdgepartError(f"deploy public key {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise EdgepartError(f"deploy public key {path}: not a PEM public key (edgepart keygen --deploy writes "
                            "one next to the private key, as FILE.pub)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgepartError(f"deploy public key {path}: not an Ed25519 key")
    return key


def _write_secret(path: Path, data: bytes) -> None:
    """Write a new file readable by its owner only (refuses to overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_deploy_key(path) -> tuple[Path, Path]:
    """A new Ed25519 deploy key: the private key at ``path`` (PEM, mode 0600) and its public key at
    ``path.pub``; returns both paths. Refuses to overwrite an existing file."""
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise EdgepartError(f"{p} already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    _write_secret(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def generate_run_key(path) -> Path:
    """A new shared run key: 32 random bytes, written as hex to ``path`` (mode 0600)."""
    path = Path(path)
    if path.exists():
        raise EdgepartError(f"{path} already exists; not overwriting a key")
    _write_secret(path, os.urandom(32).hex().encode() + b"\n")
    return path
