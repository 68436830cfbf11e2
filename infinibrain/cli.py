"""``infinibrain``: see, deploy to and watch a running cluster without writing Python.

Built on argparse (no extra dependency) and on the same AICluster the applications use, so
every command goes through the public API and its numbered errors. A numbered error ends
the command with ``infinibrain: [CODE] message`` plus what to do, and the exit status
``errors.exit_status(CODE)`` (305 -> 35, 500 -> 50, ...); 1 for anything else, 2 for usage.

    infinibrain [--host H] [--port P] [--timeout S] COMMAND ...

The command's main thread (behind it, the AICluster's own I/O and callback threads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._toml import read_toml
from .errors import HINTS, InfinibrainException, exit_status, make_error
from .inference import AICluster
from .types import ContainerConfig

CONFIG_KEYS = {f for f in ContainerConfig.__dataclass_fields__}


# ---- output -----------------------------------------------------------------------------------


def table(rows: list[dict], columns: Sequence[str], out: Any = None) -> None:
    """``rows`` as a plain text table, one column per key, headers in capitals."""
    out = out or sys.stdout
    cells = [[str(r.get(c, "") if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def dump(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class ProgressBar:
    """One line on stderr, redrawn: ``[#####.....]  42%  board b1: sending image``."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.shown = False

    def update(self, event: dict) -> None:
        done, total = event.get("done") or 0, event.get("total") or 0
        share = done / total if total else 0.0
        bar = "#" * int(share * 30)
        line = f"[{bar:<30}] {share * 100:3.0f}%  {event.get('board', '')}: {event.get('stage', '')}"
        with self.lock:
            end = "\n" if not self.stream.isatty() else "\r"
            self.stream.write(line + end)
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        with self.lock:
            if self.shown and self.stream.isatty():
                self.stream.write("\n")


# ---- commands ---------------------------------------------------------------------------------


def cmd_status(c: AICluster, args: argparse.Namespace) -> int:
    boards = [{"board": b.name, "address": b.ip} for b in c.get_coprocessor_handler()]
    rows = c._client.command("get_container_status", {"inference_name": args.name or ""}).wait()
    containers = [
        {"inference": r["name"], "container": r["suffix_name"], "board": r["allocated_coprocessor"],
         "type": r["implementation_type"], "state": r.get("state"), "status": r["status"], "connect": r["connect_status"],
         "distribution": r.get("distribution"), "operate": r["operate"], "queued": r["queue_num"],
         "in_flight": r["send_data_num"], "cpu": r["cpu_proc"], "memory": r["mem_usage"]}
        for r in rows
    ]
    telemetry = c.get_board_telemetry()
    for row in boards:
        row.update(_board_row(telemetry["boards"].get(row["board"]) or {}))
    group = telemetry.get("group")
    if args.json:
        dump({"boards": boards, "containers": containers, "energy": telemetry["energy"], **({"group": group} if group else {})})
        return 0
    if group:
        print("GROUP")
        table(_group_rows(group), ["manager", "host", "role", "lease", "changes"])
        print()
    print("BOARDS")
    table(boards, ["board", "address", "state", "cpu", "memory", "load", "temp", "gpu", "power"])
    if telemetry["energy"]:
        print()
        table([{**e, "J/request": f"{e['joules_per_request']:.3f}"} for e in telemetry["energy"]],
              ["inference", "board", "J/request", "requests"])
    print()
    if containers:
        table(containers, ["inference", "container", "board", "type", "state", "status", "connect", "distribution",
                           "operate", "queued", "in_flight", "cpu", "memory"])
    else:
        print("no inferences deployed")
    return 0


def _group_rows(group: dict) -> list[dict]:
    """The managers of a group: the leader (its lease's age, whether etcd takes changes), standbys."""
    leader = (group.get("leader") or {}).get("id")
    rows = []
    for m in group.get("members") or [group.get("leader") or {}]:
        leads = m.get("id") == leader
        rows.append({"manager": m.get("id", "?"), "host": f"{m.get('host', '?')}:{m.get('port', '?')}",
                     "role": "leader" if leads else "standby",
                     "lease": f"renewed {group['lease_age_s']:.1f} s ago of {group['lease_s']} s" if leads and
                     group.get("lease_age_s") is not None else "",
                     "changes": group.get("changes", "") if leads else ""})
    return rows


def _board_row(t: dict) -> dict:
    """A board's telemetry for ``status`` (its JSON keeps every figure under ``telemetry``)."""
    if t.get("state") != "ok":
        return {"state": f"{t.get('state', '?')}" + (f" ({t['why']})" if t.get("why") else ""), "telemetry": t}
    temps = t.get("temperatures") or {}
    return {
        "state": "ok", "telemetry": t,
        "cpu": f"{t['cpu'].get('all', 0) * 100:.0f}%" if t.get("cpu") else "",
        "memory": f"{t['memory_used'] / 2**30:.1f}/{t['memory_total'] / 2**30:.1f} GiB" if t.get("memory_total") else "",
        "load": f"{t['load'][0]:.2f}" if t.get("load") else "",
        "temp": f"{max(temps.values()):.0f}C" if temps else "",
        "gpu": f"{t['gpu'] * 100:.0f}%" if t.get("gpu") is not None else "",
        "power": f"{t['watts']:.1f} W" if t.get("watts") is not None else "",
    }


def load_deployment(path: Path) -> list[tuple[dict, Any]]:
    """(ContainerConfig fields, boards) for each ``[[inference]]`` of a deployment file.
    Relative ``script_path``, ``image_path`` and ``copy.From`` are relative to the file."""
    data = read_toml(path)
    unknown = sorted(set(data) - {"inference"})
    if unknown:
        raise make_error(302, detail=f"{path}: unknown table {unknown[0]!r} (a deployment file has [[inference]] tables)")
    entries = []
    for i, raw in enumerate(data.get("inference") or []):
        where = f"{path}: inference[{i}]"
        if "boards" not in raw:
            raise make_error(201, detail=f"{where}.boards (a board name, a list of them, or \"all\")")
        bad = sorted(set(raw) - CONFIG_KEYS - {"boards"})
        if bad:
            raise make_error(302, detail=f"{where}: unknown key {bad[0]!r} (ContainerConfig fields and boards)")
        cfg = {k: v for k, v in raw.items() if k != "boards"}
        for key in ("script_path", "image_path"):
            if isinstance(cfg.get(key), str) and not os.path.isabs(cfg[key]):
                cfg[key] = str((path.parent / cfg[key]).resolve())
        for entry in cfg.get("copy") or []:
            if isinstance(entry, dict) and isinstance(entry.get("From"), str) and not os.path.isabs(entry["From"]):
                entry["From"] = str((path.parent / entry["From"]).resolve())
        entries.append((cfg, raw["boards"]))
    if not entries:
        raise make_error(201, detail=f"{path}: no [[inference]] tables")
    return entries


def cmd_deploy(c: AICluster, args: argparse.Namespace) -> int:
    """Apply a deployment file: load what is new, replace what changed, leave the rest."""
    every_board = [b.name for b in c.get_coprocessor_handler()]
    for cfg, boards in load_deployment(Path(args.file)):
        name = cfg.get("name")
        if not isinstance(name, str) or not name:
            raise make_error(201, detail=f"{args.file}: an [[inference]] has no name")
        wanted = every_board if boards == "all" else ([boards] if isinstance(boards, str) else list(boards))
        try:
            before = {h.allocated_coprocessor for h in c.get_container_handler(name)}
        except InfinibrainException as exc:
            if exc.code != 300:
                raise
            before = set()
        changed = False
        try:
            load_with_progress(c, cfg, wanted, args.quiet)
        except InfinibrainException as exc:
            if not before or not (exc.code == 203 or "registered with other settings" in exc.detail):
                raise
            load_with_progress(c, {**cfg, "force_update": True}, wanted, args.quiet)
            changed = True
        for board in sorted(before - set(wanted)):
            c.unload_inference(name, board, delete_image=False)
        print(deploy_outcome(name, before, wanted, changed))
    return 0


def deploy_outcome(name: str, before: set[str], wanted: list[str], changed: bool) -> str:
    """What ``deploy`` did to one inference, each board named once:
    ``classifier: created on b2, local`` (it was new), else the boards it kept, as
    ``updated on`` (new containers from new settings) or ``unchanged on``, then
    ``added on`` (boards new to it) and ``removed from`` (boards no longer listed), e.g.
    ``classifier: updated on local; added on b2; removed from b3``."""
    if not before:
        return f"{name}: created on {', '.join(sorted(set(wanted)))}"
    kept = sorted(before & set(wanted))
    added = sorted(set(wanted) - before)
    removed = sorted(before - set(wanted))
    parts = [f"{'updated' if changed else 'unchanged'} on {', '.join(kept)}" if kept else "",
             f"added on {', '.join(added)}" if added else "",
             f"removed from {', '.join(removed)}" if removed else ""]
    return f"{name}: {'; '.join(p for p in parts if p) or 'unchanged'}"


def load_with_progress(c: AICluster, cfg: dict, boards: list[str], quiet: bool) -> Any:
    """load_inference, showing its progress events as a bar on stderr."""
    bar = ProgressBar()
    c.set_progress_callback(None if quiet else lambda cmd, info: bar.update(info))
    try:
        return c.load_inference(cfg, boards)
    finally:
        c.set_progress_callback(None)
        bar.close()


def handlers_of(c: AICluster, name: str) -> list:
    found = c.get_container_handler(name)
    if not found:
        raise make_error(300, detail=f"inference {name!r} has no containers")
    return found


def cmd_undeploy(c: AICluster, args: argparse.Namespace) -> int:
    c.unload_inference(args.name, args.board or "", delete_image=not args.keep_image)
    print(f"{args.name}: removed{' from ' + args.board if args.board else ''}")
    return 0


def cmd_start_stop(c: AICluster, args: argparse.Namespace) -> int:
    for h in handlers_of(c, args.name):
        if args.board and h.allocated_coprocessor != args.board:
            continue
        status = h.start() if args.command == "start" else h.stop()
        print(f"{h.suffix_name}: {status.status}, {status.connect_status}")
    return 0


def cmd_restart(c: AICluster, args: argparse.Namespace) -> int:
    """New containers, one board after another while the others serve (or in place)."""
    bar = ProgressBar()
    c.set_progress_callback(None if args.quiet else lambda cmd, info: bar.update(info))
    try:
        handlers = c.restart_inference(args.name, args.board or "", rolling=not args.in_place)
    finally:
        c.set_progress_callback(None)
        bar.close()
    print(f"{args.name}: restarted on {', '.join(sorted(h.allocated_coprocessor for h in handlers))}")
    return 0


def cmd_logs(c: AICluster, args: argparse.Namespace) -> int:
    handlers = handlers_of(c, args.name)
    seen: dict[str, list[str]] = {}
    many = len(handlers) > 1
    deadline = time.monotonic() + args.follow_seconds if args.follow_seconds else None
    while True:
        for h in handlers:
            lines = c.get_container_logs(h.suffix_name, h.allocated_coprocessor, args.lines).splitlines()
            for line in new_lines(seen.get(h.suffix_name, []), lines):
                print(f"{h.suffix_name} | {line}" if many else line, flush=True)
            seen[h.suffix_name] = lines
        if not (args.follow or args.follow_seconds) or (deadline is not None and time.monotonic() >= deadline):
            return 0
        time.sleep(1.0)


def new_lines(before: list[str], now: list[str]) -> list[str]:
    """The lines of ``now`` (a tail of a log) that come after what ``before`` showed."""
    if not before:
        return now
    for start in range(len(now), -1, -1):  # the longest overlap of before's end and now's start
        if start <= len(before) and now[:start] == before[len(before) - start:]:
            return now[start:]
    return now


def cmd_queue(c: AICluster, args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] == "delete":
        name = words[1] if len(words) > 1 else ""
        rest = c.delete_queue(name, args.request, args.pid, force_delete=args.force)
        mine = "" if args.force else " (without --force only this command's own requests are deleted)"
        print(f"deleted; {len(rest)} request(s) still waiting{mine if rest else ''}")
        return 0
    name = words[0] if words else ""
    rows = [q.to_dict() for q in c.get_queue_info(name, args.request, args.pid)]
    if args.json:
        dump(rows)
    elif rows:
        table(rows, ["inference_name", "request_no", "pid", "priority", "mng_queue_in"])
    else:
        print("no requests waiting")
    return 0


def cmd_images(c: AICluster, args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] == "rm":
        if len(words) < 2:
            raise make_error(100, "TAG", detail="images rm TAG [TAG ...] [--board BOARD]")
        rows = c.remove_images(words[1:], args.board or "")
        for r in rows:
            print(f"{r['board']}: {r['tag']}: {'removed' if r['removed'] else 'kept (' + r['why'] + ')'}")
        return 0
    board = words[0] if words else args.board
    boards = c.get_coprocessor_images()
    rows = [{"board": b.name, **(i if isinstance(i, dict) else {"image": i})}
            for b in boards if not board or b.name == board for i in b.images]
    if board and board not in {b.name for b in boards}:
        raise make_error(304, detail=f"board {board!r} (known: {', '.join(b.name for b in boards)})")
    if args.json:
        dump(rows)
        return 0
    columns = ["board"] + sorted({k for r in rows for k in r} - {"board"})
    table(rows, columns) if rows else print("no images")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    """Build an inference image from a spec (no manager needed: the local Docker engine)."""
    from . import imagebuild

    spec = imagebuild.load_spec(args.spec)
    if args.save:
        spec.save = Path(args.save).resolve()
    print(f"building {spec.tag} ({spec.platform}) from {spec.base}", file=sys.stderr)
    built = imagebuild.build(spec, say=(lambda line: None) if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr)))
    print(f"{built.tag}: {built.size / 1e6:.1f} MB in {len(built.layers)} layers, built in {built.seconds:g} s")
    for step, size in built.layers:  # largest first, down to the base image's
        if size:
            print(f"  {size / 1e6:8.1f} MB  {step}")
    for package, old, new in built.replaced:
        print(f"warning: pip replaced {package} {old} (the base image's) with {new}: the image carries both; "
              f"add {package!r} to image.keep to forbid it, or pin a version that works with {old}", file=sys.stderr)
    if built.checked:
        print(f"checks passed: {', '.join(built.checked)}")
    if built.tar is not None:
        print(f"{built.tar}: {built.tar_size / 1e6:.1f} MB (image_path={str(built.tar.parent)!r}, image_filename={built.tar.name!r})")
    print(imagebuild.TIPS, file=sys.stderr)
    return 0


def cmd_put(c: AICluster, args: argparse.Namespace) -> int:
    c.put_file(args.name, {"file": os.path.abspath(args.file), "To": args.to})
    print(f"{args.file} -> {args.name}:{args.to}")
    return 0


def read_input(path: Path) -> tuple[Any, bool]:
    """(data, is it an image): a .npy array or a binary PPM/PGM is an image, else bytes."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), True
    raw = path.read_bytes()
    if raw[:2] in (b"P5", b"P6"):
        fields = raw.split(maxsplit=4)
        if len(fields) == 5 and fields[3] in (b"255",):
            width, height = int(fields[1]), int(fields[2])
            channels = 3 if raw[:2] == b"P6" else 1
            pixels = np.frombuffer(fields[4], np.uint8)[: width * height * channels]
            return pixels.reshape((height, width, channels) if channels == 3 else (height, width)), True
    return raw, False


def cmd_infer(c: AICluster, args: argparse.Namespace) -> int:
    try:
        data, image = read_input(Path(args.file))
    except (OSError, ValueError) as exc:
        raise make_error(301, detail=f"cannot read {args.file}: {exc}") from None
    started = time.perf_counter()
    if image:
        result = c.infer_image(args.name, data, args.param)
    else:
        result, _ = c.infer(args.name, data, args.param)
    ms = (time.perf_counter() - started) * 1000
    dump({"result": result, "input": list(data.shape) if image else len(data), "latency_ms": round(ms, 3)})
    return 0


# ---- the parser -------------------------------------------------------------------------------


def command(sub: Any, name: str, what: str, run: Callable, *positionals: str, json: bool = False) -> argparse.ArgumentParser:
    """A subcommand running ``run``, with its positionals ("name?" is optional) and ``--json``."""
    s = sub.add_parser(name, help=what)
    for positional in positionals:
        if positional.endswith("?"):
            s.add_argument(positional[:-1], nargs="?")
        else:
            s.add_argument(positional)
    if json:
        s.add_argument("--json", action="store_true")
    s.set_defaults(run=run)
    return s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinibrain", description="see, deploy to and watch an infinibrain cluster")
    p.add_argument("--host", help="the manager's address (default $INFINIBRAIN_MANAGER or 127.0.0.1)")
    p.add_argument("--port", type=int, help="the manager's base port (default $INFINIBRAIN_MANAGER or 5570)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to reach the manager")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(sub, "status", "boards, containers, distribution, queues, CPU and memory", cmd_status, "name?", json=True)

    s = command(sub, "deploy", "apply a TOML deployment file (only what differs changes)", cmd_deploy, "file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = command(sub, "undeploy", "remove an inference (from every board, or one)", cmd_undeploy, "name")
    s.add_argument("--board")
    s.add_argument("--keep-image", action="store_true", help="leave the Docker image on the boards")

    for name, what in (("start", "start an inference's containers"), ("stop", "stop an inference's containers (kept)")):
        command(sub, name, what, cmd_start_stop, "name").add_argument("--board")

    s = command(sub, "restart", "restart an inference's containers, rolling (e.g. after put)", cmd_restart, "name")
    s.add_argument("--board", help="only this board's container (stopped and started in place)")
    s.add_argument("--in-place", action="store_true", help="stop and start every container at once instead of rolling")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = command(sub, "logs", "what an inference's containers wrote", cmd_logs, "name")
    s.add_argument("--lines", type=int, default=100)
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    s.add_argument("--follow-seconds", type=float, default=0.0, help=argparse.SUPPRESS)  # bounded follow, for tests

    s = command(sub, "queue", "waiting requests: queue [NAME], queue delete [NAME] [--request N] [--pid P] [--force]",
                cmd_queue, json=True)
    s.add_argument("words", nargs="*", metavar="[delete] [NAME]")
    s.add_argument("--request", type=int, default=0)
    s.add_argument("--pid", type=int, default=0)
    s.add_argument("--force", action="store_true", help="delete other processes' requests too")

    s = command(sub, "images", "the images on the boards: images [BOARD], images rm TAG [TAG ...] [--board B]", cmd_images,
                json=True)
    s.add_argument("words", nargs="*", metavar="[rm] [BOARD | TAG ...]")
    s.add_argument("--board", help="the board (images rm: only this board; default every board)")

    image = sub.add_parser("image", help="build an inference image: image build SPEC")
    image_sub = image.add_subparsers(dest="image_command", required=True, metavar="build")
    s = image_sub.add_parser("build", help="an image from a TOML spec (containers/README.md), with the local Docker engine")
    s.add_argument("spec")
    s.add_argument("--save", help="also write the docker save tar here (overrides the spec's save)")
    s.add_argument("--quiet", action="store_true", help="no build output")
    s.set_defaults(run=cmd_image_build, local=True)

    s = command(sub, "put", "replace a file in an inference's running containers", cmd_put, "file", "name")
    s.add_argument("--to", default=".", help="folder in the container (default: its working folder)")

    s = command(sub, "infer", "one request: a .npy array or PPM/PGM image, or any file as bytes", cmd_infer, "name", "file")
    s.add_argument("--param", default="{}", help="additional information, a JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run: Callable[..., int] = args.run
    try:
        if getattr(args, "local", False):  # needs no manager
            return run(args)
        with AICluster(args.host, args.port, timeout=args.timeout) as cluster:
            return run(cluster, args)
    except InfinibrainException as exc:
        hint = HINTS.get(exc.code)
        print(f"infinibrain: [{exc.code}] {exc.text}" + (f"\n  what to do: {hint}" if hint else ""), file=sys.stderr)
        return exit_status(exc.code)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
