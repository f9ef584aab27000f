#!/usr/bin/env bash
# Slowloris against corral, nginx and HAProxy (each with its defaults) in front of the same two stub
# workers, while a normal client measures latency. Bounded: 300 slow connections, ~45 s per proxy,
# 127.0.0.1 only, every process started here is stopped by PID on exit.
#
#   bench/edge.sh            # full run (~2.5 min), results into bench/RESULTS.md (edge markers)
#   ATTACK_S=15 bench/edge.sh  # shorter
#
# Needs slowhttptest (Debian package `slowhttptest`), nginx and haproxy on PATH.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
CONNS="${CONNS:-300}"          # slow connections
RATE="${RATE:-150}"            # new slow connections per second
INTERVAL="${INTERVAL:-3}"      # seconds between slowloris header lines
ATTACK_S="${ATTACK_S:-35}"     # attack length per proxy
BASELINE_S="${BASELINE_S:-5}"  # undisturbed latency measurement per proxy
BASE=19500                     # corral 19500, nginx 19501, haproxy 19502, workers 19511-19512
W0=$((BASE + 11)); W1=$((BASE + 12))
OUT="$(mktemp -d /tmp/corral-edge-bench.XXXXXX)"
PIDS=()

command -v slowhttptest >/dev/null || { echo "slowhttptest missing: apt-get install -y slowhttptest" >&2; exit 2; }
command -v nginx >/dev/null && command -v haproxy >/dev/null || { echo "nginx and haproxy are needed" >&2; exit 2; }

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $BASE $((BASE + 1)) $((BASE + 2)) $W0 $W1; do
    port_free "$p" || { echo "port $p is busy; is another edge bench running?" >&2; exit 2; }
done

wait_http() {  # port
    for _ in $(seq 1 150); do
        curl -fsS -o /dev/null "http://127.0.0.1:$1/ready" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing answers on port $1 (logs in $OUT)" >&2
    exit 1
}

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# --- the shared workers --------------------------------------------------------------------------
for p in $W0 $W1; do
    "$PY" "$ROOT/tests/stub_worker.py" "$p" >"$OUT/worker-$p.log" 2>&1 &
    PIDS+=($!)
done
wait_http $W0; wait_http $W1

# --- peers with their defaults (only what they cannot run without) ----------------------------------
mkdir -p "$OUT/nginx"
cat >"$OUT/nginx/nginx.conf" <<EOF
# nginx defaults: 1 worker process, 512 worker_connections, client_header_timeout 60s.
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
daemon off;
events {}
http {
    access_log off;
    client_body_temp_path $OUT/nginx/body;
    proxy_temp_path $OUT/nginx/proxy;
    fastcgi_temp_path $OUT/nginx/fastcgi;
    uwsgi_temp_path $OUT/nginx/uwsgi;
    scgi_temp_path $OUT/nginx/scgi;
    upstream workers { server 127.0.0.1:$W0; server 127.0.0.1:$W1; }
    server {
        listen 127.0.0.1:$((BASE + 1));
        location / { proxy_pass http://workers; }
    }
}
EOF
cat >"$OUT/haproxy.cfg" <<EOF
# HAProxy has no default timeouts; these three are the documented minimum. No 'timeout http-request',
# so the request head is bounded by 'timeout client' (an inactivity timeout).
# http-server-close: the stub serves one connection at a time, and HAProxy's default idle server
# connection reuse would park on it (seconds of latency unrelated to this test).
global
    maxconn 4096
defaults
    mode http
    option http-server-close
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend public
    bind 127.0.0.1:$((BASE + 2))
    default_backend workers
backend workers
    server w0 127.0.0.1:$W0
    server w1 127.0.0.1:$W1
EOF

start_proxy() {  # name -> sets PROXY_PID, PROXY_PORT
    case "$1" in
        corral)
            PROXY_PORT=$BASE
            (cd "$OUT" && exec "$PY" -m corral run -p "$PROXY_PORT" --upstream "127.0.0.1:$W0-$W1" --name stub) \
                >"$OUT/corral.log" 2>&1 &
            ;;
        nginx)
            PROXY_PORT=$((BASE + 1))
            nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" >"$OUT/nginx/stdout.log" 2>&1 &
            ;;
        haproxy)
            PROXY_PORT=$((BASE + 2))
            haproxy -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
            ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_http "$PROXY_PORT"
}

probe() {  # port seconds out.json -- a normal client: a fresh connection per request, 20 per second
    "$PY" - "$@" <<'EOF'
import json, socket, sys, time
port, seconds, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
lat, errors = [], 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /probe HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise OSError(data[:40])
        lat.append((time.monotonic() - t0) * 1000)
    except OSError:
        errors += 1
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))
lat.sort()
q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None
json.dump({"n": len(lat), "errors": errors, "p50": q(0.50), "p99": q(0.99), "max": q(1.0)}, open(out, "w"))
EOF
}

sample_open() {  # port seconds out.csv -- established connections on the proxy's side, once a second
    for i in $(seq 0 "$2"); do
        echo "$i,$(ss -Htn state established "( sport = :$1 )" | wc -l)"
        sleep 1
    done >"$3"
}

for name in corral nginx haproxy; do
    echo "== $name"
    start_proxy "$name"
    probe "$PROXY_PORT" "$BASELINE_S" "$OUT/$name-baseline.json"
    sample_open "$PROXY_PORT" "$((ATTACK_S + 2))" "$OUT/$name-open.csv" &
    SAMPLER_PID=$!
    PIDS+=("$SAMPLER_PID")
    slowhttptest -H -c "$CONNS" -r "$RATE" -i "$INTERVAL" -l "$ATTACK_S" -x 16 -p 3 -g \
        -o "$OUT/$name-slow" -u "http://127.0.0.1:$PROXY_PORT/" >"$OUT/$name-slowhttptest.log" 2>&1 &
    SLOW_PID=$!
    PIDS+=("$SLOW_PID")
    sleep 1  # let the slow connections open before measuring
    probe "$PROXY_PORT" "$((ATTACK_S - 3))" "$OUT/$name-attack.json"
    wait "$SLOW_PID" || true
    wait "$SAMPLER_PID" || true
    stop_pid "$PROXY_PID"
done

# --- results ----------------------------------------------------------------------------------------
"$PY" - "$OUT" "$ROOT/bench/RESULTS.md" "$CONNS" "$INTERVAL" "$ATTACK_S" <<'EOF'
import csv, datetime, json, os, re, subprocess, sys
from pathlib import Path
out, results, conns, interval, attack_s = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]

def version(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except OSError:
        return "?"

def slow_stats(name):
    # Open connections as the kernel saw them (ss, proxy side), and how slowhttptest's run ended.
    rows = [tuple(map(int, line.split(","))) for line in open(out / f"{name}-open.csv") if line.strip()]
    peak = max(n for _, n in rows)
    t_peak = next(t for t, n in rows if n == peak)
    # A drop at or after the attack's end is slowhttptest leaving, not the proxy cutting.
    cut = next((t for t, n in rows if t > t_peak and n <= peak * 0.1 and t < int(attack_s)), None)
    at = lambda s: next((n for t, n in rows if t >= s), "-")
    log = re.sub(r"\x1b\[[0-9;]*m", "", (out / f"{name}-slowhttptest.log").read_text())
    ended = re.findall(r"Test ended on (\d+)\w* second\s+Exit status: ([^\n]+)", log)
    ended = f"{ended[-1][1].strip().lower()} ({ended[-1][0]} s)" if ended else "?"
    down = len(re.findall(r"service available:\s+NO", log))
    checks = len(re.findall(r"service available:", log))
    return peak, cut, at(15), at(30), ended, f"{down} of {checks}"


lines = [
    f"Run `bench/edge.sh` on {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC: slowhttptest slowloris (-H), "
    f"{conns} connections, one header line every {interval} s, {attack_s} s per proxy, against each proxy "
    "in turn over the same 2 stub workers; a normal client makes 20 fresh-connection GETs per second "
    "before (baseline) and during the attack.",
    "",
    f"Versions: {version(['slowhttptest', '-h'])}; {version(['nginx', '-v'])}; {version(['haproxy', '-v'])}.",
    "",
    "| proxy (defaults) | head timeout | open conns (peak) | 90% cut at (s) | open at 15 s | open at 30 s "
    "| slowhttptest ended | its probe: unavailable | normal client p50 / p99 / max ms, before "
    "| same, under attack | normal client failures |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
heads = {"corral": "10 s (--header-timeout)", "nginx": "60 s (client_header_timeout)",
         "haproxy": "30 s idle (timeout client)"}
for name in ("corral", "nginx", "haproxy"):
    b = json.load(open(out / f"{name}-baseline.json"))
    a = json.load(open(out / f"{name}-attack.json"))
    peak, cut, at15, at30, ended, down = slow_stats(name)
    fmt = lambda d: f"{d['p50']} / {d['p99']} / {d['max']}"
    lines.append(f"| {name} | {heads[name]} | {peak} | {cut if cut is not None else 'not cut'} "
                 f"| {at15} | {at30} | {ended} | {down} | {fmt(b)} | {fmt(a)} "
                 f"| {a['errors']} of {a['n'] + a['errors']} |")
lines += [
    "",
    "Open conns: established sockets on the proxy's port (`ss`, once a second from the attack's start; "
    "includes the normal client's one). 90% cut: first second after the peak with at most 10% of it left. "
    "slowhttptest stops early when every slow connection has been closed on it.",
    "",
    f"Raw slowhttptest CSV/HTML, connection samples and proxy logs: {out} (temporary).",
]
block = "<!-- edge:begin -->\n" + "\n".join(lines) + "\n<!-- edge:end -->"
text = results.read_text() if results.exists() else "# corral benchmark results\n"
if "<!-- edge:begin -->" in text and "<!-- edge:end -->" in text:
    text = re.sub(r"<!-- edge:begin -->.*?<!-- edge:end -->", lambda m: block, text, flags=re.S)
else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
results.write_text(text)
print("\n".join(lines))
EOF
