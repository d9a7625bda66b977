#!/usr/bin/env bash
# Where a relay's time goes, per request: the per-connection profile of bench/PROFILE.md.
#
#   bash bench/profile.sh [RELAY...]      (RELAY: splice, pure, haproxy; default splice haproxy;
#                                          pure = the splice relay's pure-Python twin)
#
# In a private network namespace (pp-prof-$$, removed on exit, also on failure or Ctrl-C):
# nginx as the HTTP backend on 127.0.0.1:8080, the relay on 127.0.0.1:15001 (bench.relayrig,
# a one-service table, no kernel rules) or HAProxy 1 thread, and wrk as the client, for
#   rr  (16 kept-alive connections)  and  crr (Connection: close: a connection per request).
# Per request it prints: instructions (valgrind callgrind, steady state only: instrumentation
# is switched on after a warm-up; repeatable on a shared machine), syscalls by name
# (strace -c), and user and system CPU microseconds (/proc/PID/stat; these need a quiet machine:
# run under /work/notes/quiet.sh). Needs root, nginx, wrk, valgrind, strace (and haproxy).
# PYTHON (default: the venv's python) and WT (the checkout to profile; default this one).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WT="${WT:-$here}"
PY="${PYTHON:-${PYPROXY_VENV:-/var/cache/pyproxy/venv}/bin/python}"
NS="pp-prof-$$"
TMP="$(mktemp -d /tmp/pp-prof.XXXXXX)"
RELAYS=("${@:-splice haproxy}")
read -r -a RELAYS <<< "${RELAYS[*]}"
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

ip netns add "$NS"
ip -n "$NS" link set lo up
cat > "$TMP/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/nginx.err warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:8080 reuseport backlog=4096; location / { return 200 "hello-from-backend\n"; } }
}
EOF
cat > "$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend f
    bind 127.0.0.1:15001
    default_backend b
backend b
    server s1 127.0.0.1:8080
EOF
ip netns exec "$NS" nginx -c "$TMP/nginx.conf" -e "$TMP/nginx.err" & pids+=($!)

start_relay() {  # RELAY [wrapper...] -> sets RIG (pid of the relay)
    local relay=$1; shift
    if [[ $relay == haproxy ]]; then
        ip netns exec "$NS" "$@" haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/relay.log" 2>&1 &
    else
        local pure=0 kind=$relay extra=()
        [[ $relay == pure ]] && pure=1 kind=splice  # the splice relay's pure-Python twin
        [[ $relay == thread ]] && kind=splice extra=(--engine-thread)  # experiment: the engine's epoll not nested
        (cd "$WT" && PYPROXY_PURE_PYTHON=$pure exec ip netns exec "$NS" "$@" "$PY" -m bench.relayrig --relay "$kind" --listen 127.0.0.1:15001 \
            --backend 127.0.0.1:8080 --seconds 600 "${extra[@]}") >"$TMP/relay.log" 2>&1 &
    fi
    RIG=$!
    pids+=("$RIG")
    for _ in $(seq 600); do
        ip netns exec "$NS" bash -c 'exec 3<>/dev/tcp/127.0.0.1/15001' 2>/dev/null && return 0
        sleep 0.1
    done
    echo "relay $relay did not start: $(tail -3 "$TMP/relay.log")" >&2
    return 1
}

stop_relay() { kill "$RIG" 2>/dev/null || true; wait "$RIG" 2>/dev/null || true; }

load() {  # MODE SECONDS CONNS -> prints the request count
    local hdr=()
    [[ $1 == crr ]] && hdr=(-H "Connection: close")
    ip netns exec "$NS" wrk -t1 -c"$3" -d"$2"s "${hdr[@]}" http://127.0.0.1:15001/ | awk '/requests in/{print $1}'
}

for relay in "${RELAYS[@]}"; do
    for mode in rr crr; do
        # user and system CPU per request
        start_relay "$relay"
        load "$mode" 1 16 >/dev/null
        read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$RIG/stat")
        n=$(load "$mode" 3 16)
        read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$RIG/stat")
        tck=$(getconf CLK_TCK)
        awk -v r="$relay" -v m="$mode" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$tck" \
            'BEGIN {printf "%-8s %-3s %7d req/3s  user %6.1f us  sys %6.1f us per request\n", r, m, n, u/t/n*1e6, s/t/n*1e6}'
        # syscalls per request
        strace -c -f -p "$RIG" -o "$TMP/strace.txt" 2>/dev/null & st=$!
        sleep 0.5
        n=$(load "$mode" 2 4)
        kill -INT "$st"; wait "$st" 2>/dev/null || true
        awk -v n="$n" 'NR > 2 && $4 ~ /^[0-9]+$/ && $NF != "total" {calls += $4; out = out sprintf(" %s %.2f", $NF, $4 / n)}
            END {printf "         syscalls per request: %.1f =%s\n", calls / n, out}' "$TMP/strace.txt"
        stop_relay
        # instructions per request (valgrind: slow, so fewer requests)
        if [[ $relay != haproxy ]]; then
            start_relay "$relay" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/cg.out"
            load "$mode" 1 4 >/dev/null
            callgrind_control -i on "$RIG" >/dev/null
            n=$(load "$mode" 4 4)
            callgrind_control -i off "$RIG" >/dev/null
            callgrind_control -d "$RIG" >/dev/null
            stop_relay
            total=$(callgrind_annotate "$TMP/cg.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
            awk -v n="$n" -v t="$total" 'BEGIN {printf "         instructions per request: %.0f (callgrind, %d requests)\n", t / n, n}'
            rm -f "$TMP"/cg.out*
        fi
    done
done
