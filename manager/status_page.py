"""The status page: one read-only HTML page at ``/`` on the metrics listener, for people.

Boards with their telemetry, inferences and containers with their state, each
inference's requests, errors and mean latency, and the last errors; rendered on the server
from the same figures the metrics show, refreshing itself every few seconds (a meta
refresh: no JavaScript). Every value is escaped.

Pure: any thread (the metrics listener's threads call it with what the router thread gave).
"""
from __future__ import annotations

from html import escape
from typing import Any

REFRESH_SECONDS = 3

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } th, td { padding: 0.25em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #17692f; } .bad { color: #b00020; font-weight: bold; } .muted { color: #888; }
"""


def render(data: dict) -> str:
    """The page for ``data``: ``Figures.live()`` plus ``summary`` (per inference) and ``recent`` (errors)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='{REFRESH_SECONDS}'>",
             f"<title>infinibrain {escape(str(data.get('instance', '')))}</title><style>{STYLE}</style></head><body>",
             f"<h1>infinibrain manager <span class='muted'>{escape(str(data.get('instance', '')))}</span></h1>",
             _group(data.get("group")), _boards(data.get("boards") or {}), _inferences(data), _containers(data.get("containers") or []),
             _energy(data.get("energy") or []), _recent(data.get("recent") or []), "</body></html>"]
    return "".join(parts)


def _table(id_: str, head: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f"<p id='{id_}' class='muted'>{escape(empty)}</p>"
    out = [f"<table id='{id_}'><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>")
        for cell in row:
            cls, text = cell if isinstance(cell, tuple) else ("", cell)
            out.append(f"<td class='{cls}'>{escape(str(text))}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _group(group: dict | None) -> str:
    """A manager group's managers (group.py); nothing for a single manager."""
    if not group:
        return ""
    leader = (group.get("leader") or {}).get("id")
    changes = group.get("changes", "")
    rows = [[m.get("id", "?"), f"{m.get('host', '?')}:{m.get('port', '?')}",
             ("ok", "leader") if m.get("id") == leader else "standby",
             (("ok" if changes == "accepted" else "bad"), f"changes {changes}") if m.get("id") == leader else ""]
            for m in group.get("members") or []]
    return "<h2>Group</h2>" + _table("group", ["manager", "host", "role", ""], rows, "no members read yet")


def _boards(boards: dict) -> str:
    rows = []
    for name, b in sorted(boards.items()):
        if b.get("state") != "ok":
            rows.append([name, ("bad", f"{b.get('state')} {b.get('why') or ''}".strip()), "", "", "", "", "", ""])
            continue
        temps = b.get("temperatures") or {}
        rows.append([
            name, ("ok", "ok"),
            ("num", f"{(b.get('cpu') or {}).get('all', 0) * 100:.0f}%"),
            ("num", f"{b['memory_used'] / 2**30:.1f} / {b['memory_total'] / 2**30:.1f} GiB"),
            ("num", f"{b['load'][0]:.2f}"),
            ("num", f"{max(temps.values()):.0f} °C" if temps else "–"),
            ("num", f"{b['gpu'] * 100:.0f}%" if b.get("gpu") is not None else "–"),
            ("num", f"{b['watts']:.1f} W" if b.get("watts") is not None else "–"),
        ])
    return "<h2>Boards</h2>" + _table("boards", ["board", "state", "CPU", "memory", "load", "hottest", "GPU", "power"], rows,
                                        "no board telemetry (telemetry_interval_ms = 0?)")


def _inferences(data: dict) -> str:
    queues = data.get("queues") or {}
    summary = data.get("summary") or {}
    rows = []
    for name in sorted(set(queues) | {n for n in summary if n}):
        s = summary.get(name) or {}
        mean = s.get("mean_seconds")
        rows.append([name, ("num", queues.get(name, 0)), ("num", s.get("requests", 0)),
                     ("bad" if s.get("errors") else "num", s.get("errors", 0)),
                     ("num", f"{mean * 1000:.1f} ms" if mean is not None else "–")])
    return "<h2>Inferences</h2>" + _table("inferences", ["inference", "queued", "requests", "errors", "mean latency"], rows,
                                            "no inference registered")


def _containers(containers: list[dict]) -> str:
    rows = [[c["suffix"], c["inference"], c["board"], ("ok" if c["state"] == "ready" else "bad", c["state"]),
             ("ok", "connected") if c["connected"] else ("bad", "not connected"), ("num", c["in_flight"]), c["id"]]
            for c in sorted(containers, key=lambda c: (c["inference"], c["board"], c["revision"]))]
    return "<h2>Containers</h2>" + _table("containers", ["container", "inference", "board", "state", "connection", "in flight",
                                                         "instance"], rows, "no container")


def _energy(energy: list[dict]) -> str:
    if not energy:
        return ""
    rows = [[e["inference"], e["board"], ("num", f"{e['joules_per_request']:.3f} J"), ("num", e["requests"])] for e in energy]
    return "<h2>Energy per request</h2>" + _table("energy", ["inference", "board", "per request", "requests"], rows, "")


def _recent(recent: list[dict]) -> str:
    rows = [[r["at"], r["what"], r["inference"] or "(not registered)", r.get("board", ""), ("bad", r["code"])] for r in recent]
    return "<h2>Recent errors</h2>" + _table("recent", ["time", "what", "inference", "container / board", "code"], rows,
                                             "none since the manager started")
