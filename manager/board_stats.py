"""What a board's sampler prints, turned into figures: /proc and /sys blocks, and NVIDIA's
``tegrastats`` lines (Jetson). Parsed here, from the formats NVIDIA documents (L4T's
"tegrastats Utility" appendix): jetson-stats is AGPL, and all that is needed is a parser.

The sampler (``SAMPLER``) is one POSIX shell loop run on the board (a local process, or one
command on the board's SSH connection): every interval it prints a block between
``@sample`` and ``@end`` (the ``cpu`` lines of /proc/stat, MemTotal and MemAvailable, the
load average, each thermal zone's type and millidegrees); where ``tegrastats`` is on the
board's PATH it also runs it at the same interval, each of its lines prefixed ``tegra``.

Pure: any thread.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

SAMPLER = r"""
T=$(command -v tegrastats 2>/dev/null)
if [ -n "$T" ]; then
  "$T" --interval {ms} 2>/dev/null | while IFS= read -r l; do echo "tegra $l"; done &
fi
while :; do
  echo "@sample"
  grep '^cpu' /proc/stat
  grep -E '^(MemTotal|MemAvailable):' /proc/meminfo
  echo "load $(cat /proc/loadavg)"
  for z in /sys/class/thermal/thermal_zone*; do
    [ -r "$z/temp" ] && echo "thermal $(cat "$z/type" 2>/dev/null || echo "${{z##*/}}") $(cat "$z/temp" 2>/dev/null)"
  done
  echo "@end"
  sleep {seconds}
done
"""

# Rails whose reading is the whole board's input power, by the names L4T gives them (Orin
# Nano/NX: VDD_IN; Nano, TX2: POM_5V_IN). Boards without one (AGX Orin, Xavier) list the
# rails of their main supplies: their sum is the estimate.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def sampler(interval: float) -> str:
    return SAMPLER.format(ms=max(int(interval * 1000), 100), seconds=f"{interval:g}")


@dataclass
class Block:
    """One ``@sample`` block, as read (CPU times are counters: ratios come from two blocks)."""

    cpu: dict[str, list[int]] = field(default_factory=dict)  # "cpu" (all), "cpu0", ...: jiffies per state
    memory_total: int = 0  # bytes
    memory_available: int = 0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    temperatures: dict[str, float] = field(default_factory=dict)  # sensor -> degrees Celsius


def parse_block(lines: list[str]) -> Block:
    b = Block()
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        head = parts[0]
        if head.startswith("cpu"):
            b.cpu[head] = [int(x) for x in parts[1:] if x.isdigit()]
        elif head == "MemTotal:":
            b.memory_total = int(parts[1]) * 1024
        elif head == "MemAvailable:":
            b.memory_available = int(parts[1]) * 1024
        elif head == "load" and len(parts) >= 4:
            b.load = (float(parts[1]), float(parts[2]), float(parts[3]))
        elif head == "thermal" and len(parts) >= 3 and _number(parts[-1]):
            sensor = "_".join(parts[1:-1]) or "zone"
            milli = float(parts[-1])
            if -100_000 < milli < 200_000:  # a sensor that is off reads nonsense
                b.temperatures[sensor] = milli / 1000
    return b


def cpu_busy(before: Block, after: Block) -> dict[str, float]:
    """Each CPU's busy share (0..1) between two blocks: "all" and "0", "1", ..."""
    out = {}
    for name, now in after.cpu.items():
        then = before.cpu.get(name)
        if not then or len(then) < 4 or len(now) < 4:
            continue
        delta = [a - b for a, b in zip(now, then)]
        total = sum(delta)
        idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
        if total > 0:
            out["all" if name == "cpu" else name[3:]] = round(max(0.0, min(1.0, 1 - idle / total)), 4)
    return out


# ---- tegrastats ---------------------------------------------------------------------------------

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL_MW = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW\b")  # Orin and later: "VDD_IN 5123mW/5123mW"
_RAIL_OLD = re.compile(r"\b(?:POM_)?([A-Z][A-Z0-9_]*) (\d+)/(\d+)\b")  # Xavier, Nano: "GPU 0/0", "POM_5V_IN 2240/2240"


@dataclass
class Tegra:
    """One tegrastats line's figures."""

    gpu: float | None = None  # GR3D load, 0..1
    emc: float | None = None  # external memory controller load, 0..1
    cpu: list[float | None] = field(default_factory=list)  # per core, None when off
    ram_used: int | None = None  # bytes
    ram_total: int | None = None
    temperatures: dict[str, float] = field(default_factory=dict)
    rails: dict[str, tuple[float, float]] = field(default_factory=dict)  # rail -> (current W, average W)

    @property
    def board_watts(self) -> float | None:
        """The board's input power: its input rail's reading, else the sum of its rails."""
        for name in INPUT_RAILS:
            if name in self.rails:
                return self.rails[name][0]
        return round(sum(current for current, _ in self.rails.values()), 3) if self.rails else None


def parse_tegrastats(line: str) -> Tegra:
    t = Tegra()
    if m := _RAM.search(line):
        t.ram_used, t.ram_total = int(m[1]) << 20, int(m[2]) << 20
    if m := _CPU.search(line):
        for core in m[1].split(","):
            core = core.strip()
            t.cpu.append(None if core == "off" or "%" not in core else int(core.split("%")[0]) / 100)
    if m := _EMC.search(line):
        t.emc = int(m[1]) / 100
    if m := _GR3D.search(line):
        t.gpu = int(m[1]) / 100
    for name, value in _TEMP.findall(line):
        degrees = float(value)
        if degrees > -100:  # -256C: a sensor that is off
            t.temperatures[name] = degrees
    rails = _RAIL_MW.findall(line)
    if not rails:  # the older form has no unit: strip what is not a rail first
        rest = _CPU.sub("", _RAM.sub("", line))
        rest = re.sub(r"\bSWAP \d+/\d+MB|\bIRAM \d+/\d+kB|\(lfb [^)]*\)|\(cached [^)]*\)", "", rest)
        rails = [r for r in _RAIL_OLD.findall(rest)]
    for name, current, average in rails:
        t.rails[name] = (int(current) / 1000, int(average) / 1000)
    return t


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
