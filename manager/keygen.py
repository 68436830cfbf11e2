"""``infinibrain-keygen``: CurveZMQ key pairs for the manager, its clients and containers.

    infinibrain-keygen DIR NAME [NAME ...]

writes ``DIR/NAME.key`` (the public key, to hand out) and ``DIR/NAME.key_secret`` (owner
only, stays with its owner) for each NAME; an existing pair is kept. The public keys it
prints are safe to share; the secret ones are never printed.

The command's main thread.
"""
from __future__ import annotations

import argparse
import sys

from infinibrain import security


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infinibrain-keygen", description="make CurveZMQ key pairs (zmq.auth certificates)")
    parser.add_argument("folder", help="where the .key and .key_secret files go (made owner-only if new)")
    parser.add_argument("names", nargs="+", help="one key pair per name, e.g. manager client1")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
