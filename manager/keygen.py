"""``infinibrain-keygen``: CurveZMQ key pairs for the manager's clients (and the manager).

    infinibrain-keygen DIR NAME [NAME ...] [--allow CLIENTS] [--role manage|infer]

writes ``DIR/NAME.key`` (the public key, to hand out) and ``DIR/NAME.key_secret`` (owner
only, stays with its owner) for each NAME; an existing pair is kept. With ``--allow``, the
public key also goes where a manager whose ``curve_client_keys`` is CLIENTS takes it: in
CLIENTS itself for role ``manage`` (everything), in ``CLIENTS/infer`` for ``infer``
(inference and read-only calls; docs/DEPLOYMENT.md). The public keys it prints are safe to
share; the secret ones are never printed. (Containers' keys are the manager's to make.)

The command's main thread.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infinibrain import security


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infinibrain-keygen", description="make CurveZMQ key pairs (zmq.auth certificates)")
    parser.add_argument("folder", help="where the .key and .key_secret files go (made owner-only if new)")
    parser.add_argument("names", nargs="+", help="one key pair per name, e.g. manager client1")
    parser.add_argument("--allow", metavar="CLIENTS", help="also allow the keys: copy the public halves into this "
                                                          "curve_client_keys folder (a manager takes them without a restart)")
    parser.add_argument("--role", choices=("manage", "infer"), default="manage",
                        help="with --allow: manage (everything) or infer (inference and read-only calls)")
    args = parser.parse_args(argv)
    if not security.curve_available():
        print("infinibrain-keygen: this pyzmq/libzmq has no CURVE support", file=sys.stderr)
        return 1
    for name in args.names:
        try:
            public_file, secret_file = security.generate(args.folder, name)
            public = security.load_public(str(public_file))
        except (OSError, security.KeyFileError) as exc:
            print(f"infinibrain-keygen: {name}: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: public {public_file} ({public.decode()}), secret {secret_file}")
        if args.allow:
            where = allow(public_file, args.allow, args.role)
            print(f"{name}: allowed as {args.role} ({where})")
    return 0


def allow(public_file: Path, clients: str, role: str) -> Path:
    """Copy a public key where a manager with ``curve_client_keys = clients`` takes it as ``role``."""
    folder = Path(clients).expanduser() / ("infer" if role == "infer" else "")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / public_file.name
    target.write_text(public_file.read_text())
    return target


if __name__ == "__main__":
    sys.exit(main())
