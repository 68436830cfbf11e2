"""A result holding a 1 MB float32 array: encoded as an array (protocol.ARRAY_EXT, issue 26)
against the nested lists results were before (``tolist()``), packed by the container and
unpacked by the caller. The codec alone, in this process: the bytes on the wire are the
same sockets either way (4 MB of msgpack floats as lists against 1 MB as an array).

    .venv/bin/python benchmarks/bench_arrays.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import msgpack
import numpy as np

from infinibrain import protocol as P


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    array = np.random.default_rng(1).random((512, 512), dtype=np.float32)  # 1 MiB
    result = {"map": array, "score": 0.5}

    def as_array() -> None:
        back = P.unpack_value(P.pack_value(result))
        assert back["map"].shape == array.shape

    def as_lists() -> None:
        packed = msgpack.packb({"map": array.tolist(), "score": 0.5}, use_bin_type=True)
        back = msgpack.unpackb(packed, raw=False)
        assert len(back["map"]) == array.shape[0]

    arrays = timed(as_array, args.rounds)
    lists = timed(as_lists, max(args.rounds // 5, 3))
    size_arrays = len(P.pack_value(result))
    size_lists = len(msgpack.packb({"map": array.tolist(), "score": 0.5}, use_bin_type=True))
    print(f"1 MiB float32 result, pack + unpack (median): as an array {arrays:.2f} ms, "
          f"as lists {lists:.2f} ms (x{lists / arrays:.1f}); bytes {size_arrays:,} against {size_lists:,}")


if __name__ == "__main__":
    main()
