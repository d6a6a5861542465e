"""Deploy a bundle to running workers (the client side; the worker side is deploy.py).

    edgepart deploy DIR --endpoints FILE --key-file FILE [--sign-key FILE]

Each worker gets the manifest, its peers' addresses and only the files its device
needs (files it already holds with the right sha256 are not sent again); it checks
every file against the manifest before loading. Deploying the same bundle again is
a no-op, so several clients may deploy and use the same workers. Workers started with
``--deploy-pubkey`` take only deploys signed with the matching private key: ``--sign-key``
(``edgepart keygen --deploy FILE`` makes the pair; docs/security.md).
"""
from __future__ import annotations

import argparse
import sys
import time

from edgepart.runtime.client import Session, load_endpoints
from edgepart.runtime.protocol import read_key
from edgepart.runtime.signing import load_private_key


def deploy(bundle_or_dir, endpoints, key, **kw) -> None:
    """Deploy (connect, send, verify, load) and disconnect; raises on any refusal."""
    Session(bundle_or_dir, endpoints, key, deploy=True, **kw).close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgepart deploy", description="Deploy a bundle to running workers.")
    p.add_argument("dir", help="bundle directory")
    p.add_argument("--endpoints", required=True, help="YAML/JSON file mapping device name to host:port")
    p.add_argument("--key-file", required=True, help="file holding the shared run key")
    p.add_argument("--sign-key", help="deploy key (PEM, edgepart keygen --deploy): sign each worker's deploy")
    args = p.parse_args(argv)
    endpoints = load_endpoints(args.endpoints)
    sign_key = load_private_key(args.sign_key) if args.sign_key else None
    t0 = time.perf_counter()
    deploy(args.dir, endpoints, read_key(args.key_file), sign_key=sign_key)
    for d, a in endpoints.items():
        print(f"deployed {d} -> {a}")
    print(f"bundle {args.dir} deployed to {len(endpoints)} worker(s) in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
