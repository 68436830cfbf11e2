#!/usr/bin/env bash
# A Docker engine for development, tests and CI, on this machine only.
#   scripts/engine.sh start   install Debian's docker.io (and debootstrap) if absent, start
#                             `dockerd --bridge=none --iptables=false` if no engine answers
#   scripts/engine.sh stop    stop the engine this script started (by its pid), nothing else
#   scripts/engine.sh status  exit 0 if an engine answers
# Containers run on the host network, so the engine needs no bridge and touches no firewall.
set -uo pipefail
STATE=${INFINIBRAIN_ENGINE_STATE:-/run/infinibrain-engine}
PIDFILE=$STATE/dockerd.pid
LOG=$STATE/dockerd.log

answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v docker >/dev/null || need+=(docker.io)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "engine: ${need[*]} missing and cannot be installed here (needs root and apt-get)" >&2
    return 1
  fi
  echo "engine: installing ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
}

start() {
  install || return 1
  if answers; then echo "engine: a Docker engine answers"; return 0; fi
  if [ "$(id -u)" != 0 ]; then echo "engine: no engine answers and dockerd needs root" >&2; return 1; fi
  mkdir -p "$STATE"
  echo "engine: starting dockerd (log $LOG)"
  setsid dockerd --bridge=none --iptables=false --ip6tables=false >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    answers && { echo "engine: dockerd $(cat "$PIDFILE") answers"; return 0; }
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
    sleep 0.5
  done
  echo "engine: dockerd did not come up; last log lines:" >&2
  tail -n 20 "$LOG" >&2
  return 1
}

stop() {
  [ -f "$PIDFILE" ] || { echo "engine: not started by this script"; return 0; }
  local pid; pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$PIDFILE"
  echo "engine: stopped dockerd $pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) answers ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
