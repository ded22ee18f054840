#!/usr/bin/env bash
# Shoal against the official socketcluster-server v20, in the same run, on
# this machine; writes docs/benchmarks.md. `make bench` runs it as
#
#   scripts/bench.sh bin/shoal
#
# 1. starts the reference (test/reference/server.js, one Node process) on a
#    free port, runs the `shoal bench` scenarios against it, stops it;
# 2. starts `BIN run -c <temp config>` (workers auto, brokers 2, one
#    balancer, a TLS listener with a generated certificate, free ports,
#    storage in a temp dir), runs the same scenarios with --admin (server
#    memory = summed RSS of the supervisor's whole process tree) plus wss://
#    through the balancer, stops it; optionally a bigger cluster for the
#    most connections (MAX_CONNS) and the full 100 × 2,000 fan-out (BIG_SUBS2);
# 3. writes the report with scripts/benchreport. Everything after the marker
#    line of an existing docs/benchmarks.md (hand-written notes) is kept.
#
# Sizes come from the environment; the defaults take about 5 minutes.
# Every process this script starts is stopped on exit, also on failure.
# Only loopback addresses are used; every port is picked free at run time.
set -euo pipefail

usage() { echo "usage: scripts/bench.sh BIN   (BIN = a built shoal binary, e.g. bin/shoal)" >&2; exit 2; }
[ $# -eq 1 ] || usage
[ -x "$1" ] || { echo "bench.sh: $1 is not an executable (run make build)" >&2; exit 2; }
bin=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/docs/benchmarks.md}

# ---- sizes ------------------------------------------------------------------
CONNS1=${CONNS1:-10000}          # idle-memory run 1 (ws://)
CONNS2=${CONNS2:-20000}          # idle-memory run 2 (ws://); the reference runs REF_CONNS2
REF_CONNS2=${REF_CONNS2:-19000}  # one Node process holds at most ~19,900 here
CONN_AGENTS=${CONN_AGENTS:-2}    # load processes for the conns runs
CONN_CONCURRENCY=${CONN_CONCURRENCY:-64} # connection openings in flight per agent (the tool's default)
SOURCES=${SOURCES:-64}           # client source addresses, from SOURCE_BASE on
SOURCE_BASE=${SOURCE_BASE:-127.0.1.1}
HOLD=${HOLD:-3s}                 # idle time before memory is read
WSS_CONNS=${WSS_CONNS:-5000}     # wss:// through the balancer (0 = skip); one balancer holds < 9,900
MAX_CONNS=${MAX_CONNS:-0}        # Shoal only, a cluster with enough workers (0 = skip)
SUBS=${SUBS:-1000}               # fan-out 1 channel × SUBS
CHANNELS2=${CHANNELS2:-100}      # fan-out CHANNELS2 × SUBS2 × PUBS2, sized for the reference
SUBS2=${SUBS2:-190}
PUBS2=${PUBS2:-10}
BIG_SUBS2=${BIG_SUBS2:-0}        # Shoal only: CHANNELS2 × BIG_SUBS2 (the issue's 2000; 0 = skip)
AGENTS=${AGENTS:-2}              # load processes for fan-out
DURATION=${DURATION:-10s}        # fan-out windows
SHORT=${SHORT:-5s}               # rtt and churn windows
LAT_RATES=${LAT_RATES:-25 50 100 200} # extra fixed publish rates (1 channel × SUBS) for a latency sweep; each server runs those below its sustained maximum
RTT_CONNS=${RTT_CONNS:-10}
CHURN_CONNS=${CHURN_CONNS:-32}
REFERENCE=${REFERENCE:-1}        # 0 = skip the reference (Shoal only)
PROFILE=${PROFILE:-0}            # 1 = perf-record the Shoal cluster during an extra 1-channel fan-out
GOBENCH=${GOBENCH:-0}            # 1 = also run the packages' Go benchmarks (about 2 minutes)
RUN_TIMEOUT=${RUN_TIMEOUT:-300}  # seconds, per bench command
COMMIT=${COMMIT:-}               # what the report says BIN was built from (default: this checkout's HEAD, marked if it has local changes)
GOSRC=${GOSRC:-$root}            # the source tree GOBENCH tests (e.g. an export of one commit)
ONLY=${ONLY:-}                   # run only these labels (e.g. "conns-max fanout-1x"); for checks, not for the report

# WORK=DIR keeps the results in DIR (never deleted) and adds to what an
# earlier run left there: `WORK=DIR ONLY=conns-max` redoes one scenario and
# rewrites the report from every result in DIR.
if [ -n "${WORK:-}" ]; then
  work=$WORK KEEP=1
  mkdir -p "$work"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-bench.XXXXXX")
fi
mkdir -p "$work/ref" "$work/shoal"
report=$work/benchreport
started=$(date +%s)
ref_pid="" shoal_pid="" perf_pid=""

log() { echo "[$(date -u +%T)] $*" >&2; }

# stop PID: SIGTERM to its process group (each server is started with
# setsid, so the group is exactly its tree), up to 20 s, then SIGKILL.
stop() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  [ -n "$perf_pid" ] && { kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true; }
  stop "$ref_pid"
  stop "$shoal_pid"
  if [ "${KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then
    log "results kept in $work"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

(cd "$root" && go build -o "$report" ./scripts/benchreport)
freeport() { "$report" freeport "${1:-1}"; }
get() { "$report" get "$1" "$2" 2>/dev/null || echo 0; }

# want LABEL: whether ONLY (space-separated labels; empty = all) selects it.
want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]] || [[ $1 == profile-* ]]; }

# run SIDE LABEL ARGS...: one `shoal bench` scenario, JSON to SIDE/LABEL.json,
# the exact command to SIDE/LABEL.cmd. A failed run leaves no .json (the
# report shows "not run") and does not stop the others.
run() {
  local side=$1 label=$2; shift 2
  want "$label" || return 0
  local args=("$@" --json --quiet)
  rm -f "$work/$side/$label.json"
  echo "$bin bench ${args[*]}" | sed "s#^$root/##" >"$work/$side/$label.cmd"
  log "$side $label: shoal bench ${args[*]}"
  if timeout -k 10 "$RUN_TIMEOUT" "$bin" bench "${args[@]}" >"$work/$side/$label.out" 2>"$work/$side/$label.err"; then
    mv "$work/$side/$label.out" "$work/$side/$label.json"
    log "  $(summary "$work/$side/$label.json")"
  else
    log "  FAILED: $(tail -n 3 "$work/$side/$label.err" | tr '\n' ' ')"
  fi
}

# run_mem PIDS SIDE LABEL ARGS...: run with memwatch over the comma-separated PIDS.
run_mem() {
  local pids=$1 side=$2 label=$3
  want "$label" || return 0
  rm -f "$work/$side/$label.mem"
  memwatch "$work/$side/$label.mem" ${pids//,/ } &
  local w=$!
  run "${@:2}"
  kill "$w" 2>/dev/null || true
  wait "$w" 2>/dev/null || true
}

summary() {
  local f=$1
  case $(basename "$f") in
    conns*) echo "connected $(get "$f" connected), $(get "$f" conns_per_s) conns/s, $(get "$f" server_rss_per_conn_kib) KiB/conn";;
    *fanout*|latency*|profile-*) echo "$(get "$f" deliveries_per_s) deliveries/s, lost $(get "$f" lost), order $(get "$f" order_violations), p99 $(get "$f" latency_p99_ms) ms";;
    rtt*) echo "$(get "$f" round_trips_per_s) round trips/s";;
    churn*) echo "$(get "$f" cycles_per_s) cycles/s, failed $(get "$f" failed)";;
  esac
}

sustained() { # publishes/s of a 1-channel fan-out result that were delivered in its window
  awk -v d="$(get "$1" deliveries_per_s)" -v s="$(get "$1" params.subscribers)" 'BEGIN { if (s > 0) print int(d / s); else print 0 }'
}
# memwatch OUT PID...: until killed, samples the summed Pss, private memory
# (Private_Clean + Private_Dirty) and Rss of the PIDs from
# /proc/PID/smaps_rollup twice a second and keeps the peak of each in OUT.
# Summed RSS counts the pages the processes share (Shoal's six processes
# map the same binary) once per process; PSS splits them.
memwatch() {
  local out=$1; shift
  local pss=0 priv=0 rss=0
  while :; do
    read -r p q r < <(for pid in "$@"; do cat "/proc/$pid/smaps_rollup" 2>/dev/null; done |
      awk '$1 == "Pss:" { p += $2 } $1 ~ /^Private_(Clean|Dirty):$/ { q += $2 } $1 == "Rss:" { r += $2 } END { print p + 0, q + 0, r + 0 }')
    p=${p:-0} q=${q:-0} r=${r:-0}
    [ "$p" -gt "$pss" ] && pss=$p
    [ "$q" -gt "$priv" ] && priv=$q
    [ "$r" -gt "$rss" ] && rss=$r
    printf 'pss_peak_kib: %s\nprivate_peak_kib: %s\nrss_peak_kib: %s\n' "$pss" "$priv" "$rss" >"$out.tmp" && mv "$out.tmp" "$out"
    sleep 0.5
  done
}

half() { awk -v r="$1" 'BEGIN { h = int(r / 2); if (h < 1) h = 1; print h }'; }
ceil_div() { echo $(( ($1 + $2 - 1) / $2 )); }

# The scenarios shared by both servers. URL, and the way the server's
# processes are found (--pid or --admin), come as arguments.
scenarios() {
  local side=$1 conns2=$2 pids=$3; shift 3
  local src=(--sources "$SOURCES" --source-base "$SOURCE_BASE")
  run_mem "$pids" "$side" conns-10k conns "$@" --conns "$CONNS1" --agents "$CONN_AGENTS" --concurrency "$CONN_CONCURRENCY" --hold "$HOLD" "${src[@]}"
  run_mem "$pids" "$side" conns-20k conns "$@" --conns "$conns2" --agents "$CONN_AGENTS" --concurrency "$CONN_CONCURRENCY" --hold "$HOLD" "${src[@]}"
  run "$side" fanout-1x fanout "$@" --channels 1 --subs "$SUBS" --publishers 1 --payload 100 --duration "$DURATION" --agents "$AGENTS" "${src[@]}"
  run "$side" fanout-100x fanout "$@" --channels "$CHANNELS2" --subs "$SUBS2" --publishers "$PUBS2" --payload 100 --duration "$DURATION" --agents "$AGENTS" "${src[@]}"
  # The maximum rate is the sustained one: publishes/s that reached every
  # subscriber within the window (deliveries/s ÷ subscribers). Publishes
  # beyond that only queue up (the ack does not wait for delivery).
  local max; max=$(sustained "$work/$side/fanout-1x.json")
  if [ "$max" -gt 1 ]; then
    run "$side" latency-half fanout "$@" --channels 1 --subs "$SUBS" --publishers 1 --payload 100 --duration "$DURATION" --agents "$AGENTS" --rate "$(half "$max")" "${src[@]}"
  fi
  local r
  for r in $LAT_RATES; do
    [ "$r" -lt "$max" ] || continue
    run "$side" "latency-r$r" fanout "$@" --channels 1 --subs "$SUBS" --publishers 1 --payload 100 --duration "$SHORT" --agents "$AGENTS" --rate "$r" "${src[@]}"
  done
  run "$side" rtt rtt "$@" --conns "$RTT_CONNS" --window 1 --duration "$SHORT"
  run "$side" churn churn "$@" --conns "$CHURN_CONNS" --duration "$SHORT" "${src[@]}"
}

# ---- the reference ---------------------------------------------------------
ref_wanted() { # does ONLY select a scenario the reference runs?
  [ -z "$ONLY" ] && return 0
  local l
  for l in $ONLY; do
    case $l in conns-max|conns-wss|fanout-100x-big|latency-same) ;; *) return 0;; esac
  done
  return 1
}
if [ "$REFERENCE" = 1 ] && ref_wanted; then
  command -v node >/dev/null || { echo "bench.sh: node is needed for the reference (REFERENCE=0 skips it)" >&2; exit 1; }
  if [ ! -d "$root/test/reference/node_modules/socketcluster-server" ]; then
    log "installing socketcluster-server into test/reference"
    npm ci --prefix "$root/test/reference" --no-audit --no-fund --loglevel=error
  fi
  port=$(freeport)
  setsid node "$root/test/reference/server.js" --port "$port" --host 127.0.0.1 >"$work/ref.log" 2>&1 </dev/null &
  ref_pid=$!
  for _ in $(seq 150); do
    grep -q '^listening' "$work/ref.log" && break
    kill -0 "$ref_pid" 2>/dev/null || { cat "$work/ref.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q '^listening' "$work/ref.log" || { echo "bench.sh: the reference server did not start" >&2; exit 1; }
  ref_node_pid=$(awk '/^listening/ { print $4 }' "$work/ref.log")
  log "reference: node pid $ref_node_pid on port $port"
  scenarios ref "$REF_CONNS2" "$ref_node_pid" --url "ws://127.0.0.1:$port/socketcluster/" --pid "$ref_node_pid"
  stop "$ref_pid"; ref_pid=""
fi

# ---- Shoal -------------------------------------------------------------------
# start_shoal NAME WORKERS TLS(0/1): a cluster in its own session, storage in
# the work dir; sets shoal_pid, url, wss, admin.
start_shoal() {
  local try
  for try in 1 2 3; do
    start_shoal_once "$@" && return 0
    log "shoal run ($1) failed to start (try $try): $(grep -v 'ready  pid' "$work/$1/run.log" | head -n 2 | tr '\n' ' ')"
    stop "$shoal_pid"; shoal_pid=""
  done
  echo "bench.sh: shoal run did not start; see $work/$1/run.log" >&2
  exit 1
}

start_shoal_once() {
  local name=$1 workers=$2 tls=$3
  local dir=$work/$name
  rm -rf "$dir"; mkdir -p "$dir"
  local public admin_port gossip
  public=$(freeport); admin_port=$(freeport); gossip=$(freeport 3)
  {
    echo "cluster: {workers: $workers, brokers: 2, balancers: 1, gossip: \"127.0.0.1:$gossip\"}"
    echo "listen:"
    echo "  public: \"127.0.0.1:$public\""
    echo "  admin: \"127.0.0.1:$admin_port\""
    if [ "$tls" = 1 ]; then echo "  tls: {listen: \"127.0.0.1:$(freeport)\", auto: true}"; fi
    echo "storage: {dir: \"$dir/data\"}"
    echo "log: {level: warn}"
  } >"$dir/shoal.yaml"
  # No SHOAL_* variable of this environment may leak into the cluster: they
  # are config overrides.
  : >"$dir/run.log"
  setsid env $(env | awk -F= '/^SHOAL_/ { printf "-u %s ", $1 }') "$bin" run -c "$dir/shoal.yaml" >"$dir/run.log" 2>&1 </dev/null &
  shoal_pid=$!
  for _ in $(seq 600); do
    grep -q '^shoal is running' "$dir/run.log" && break
    kill -0 "$shoal_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  grep -q '^shoal is running' "$dir/run.log" || return 1
  url="ws://127.0.0.1:$public/socketcluster/"
  wss=$(awk '$1 == "tls" { print $2 }' "$dir/run.log")
  admin="http://127.0.0.1:$admin_port"
  log "shoal ($name): $(grep -c ' ready  pid ' "$dir/run.log") children, supervisor pid $shoal_pid, $url"
}

proc_name() { # PID → its name in the current cluster (supervisor, worker-1, …)
  if [ "$1" = "$shoal_pid" ]; then echo supervisor; return; fi
  awk -v p="$1" '/ ready  pid / && $4 == p { print $1; f = 1 } END { if (!f) print "other" }' "$work/cluster/run.log"
}

server_pids() { # the supervisor and every child of the current cluster, comma-separated
  { echo "$shoal_pid"; awk '/ ready  pid / { print $4 }' "$work/$1/run.log"; } | paste -sd, -
}

# profile_fanout NAME [ARGS]: the 1-channel fan-out again (ARGS added),
# with perf recording every process of the cluster; appends a summary to
# profile.txt: samples per process, Go vs kernel, hottest functions.
profile_fanout() {
  local name=$1; shift
  local secs pids
  secs=$(awk -v d="$DURATION" 'BEGIN { sub(/s$/, "", d); print int(d) + 3 }')
  pids=$(server_pids cluster)
  ( sleep 1; exec perf record -q -F 999 -g -p "$pids" -o "$work/perf-$name.data" -- sleep "$secs" ) >"$work/perf-$name.log" 2>&1 &
  perf_pid=$!
  run shoal "profile-$name" fanout --url "$url" --admin "$admin" --channels 1 --subs "$SUBS" --publishers 1 --payload 100 \
    --duration "$DURATION" --agents "$AGENTS" --sources "$SOURCES" --source-base "$SOURCE_BASE" "$@"
  wait "$perf_pid" 2>/dev/null || true; perf_pid=""
  local data=$work/perf-$name.data
  [ -s "$data" ] || return 0
  ( # a report pipeline cut short by head must not stop the run
    set +e +o pipefail
    echo "######## $name: $(summary "$work/shoal/profile-$name.json")"
    echo "# $(cat "$work/shoal/profile-$name.cmd")"
    echo "# server CPU $(get "$work/shoal/profile-$name.json" server_cpu_cores) cores, bench CPU $(get "$work/shoal/profile-$name.json" tool_cpu_cores) cores"
    echo "# perf record -F 999 -g -p <supervisor, balancer, workers, brokers> -- sleep $secs"
    echo
    echo "## Samples per process, and the share of each in the kernel (perf script -G -F pid,ip,dso)"
    perf script -i "$data" -G -F pid,ip,dso 2>/dev/null |
      awk '{ n[$1]++; t++; if ($0 ~ /kernel\.kallsyms/) k[$1]++ } END { for (p in n) printf "%d %d %.1f %.1f\n", n[p], p, 100 * n[p] / t, 100 * k[p] / n[p] }' |
      sort -rn | while read -r n p pct kern; do
        printf '  %-12s %6s%% of samples (%s), in the kernel: %s%%\n' "$(proc_name "$p")" "$pct" "$n" "$kern"
      done
    for p in $(awk '/ ready  pid / && ($1 == "worker-1" || $1 ~ /^broker-/) { print $4 }' "$work/cluster/run.log"); do
      echo
      echo "## $(proc_name "$p"): hottest functions, self time, % of that process (perf report --pid $p --no-children --sort dso,sym --percentage relative)"
      perf report -i "$data" --pid "$p" --no-children --sort dso,sym --stdio -g none --percentage relative --percent-limit 1.5 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n 18
    done
    w1=$(awk '/ ready  pid / && $1 == "worker-1" { print $4 }' "$work/cluster/run.log")
    echo
    echo "## worker-1: Go functions including callees (perf report --pid $w1 --children --sort sym --percentage relative)"
    perf report -i "$data" --pid "$w1" --children --sort sym --stdio -g none --percentage relative --percent-limit 5 2>/dev/null |
      grep -v '^#' | grep -v '^$' | grep '\[\.\]' | grep -v 'goexit\|mstart\|systemstack\|Syscall.abi0' | head -n 24
    echo
  ) >>"$work/profile.txt"
  rm -f "$data"
}

main_wanted() { # does the main cluster have anything to run?
  [ -z "$ONLY" ] || [ "$PROFILE" = 1 ] && return 0
  local l
  for l in $ONLY; do
    case $l in conns-max|conns-wss|fanout-100x-big) ;; *) return 0;; esac
  done
  return 1
}
if main_wanted; then
  start_shoal cluster auto 1
  scenarios shoal "$CONNS2" "$(server_pids cluster)" --url "$url" --admin "$admin"
  rmax=$(sustained "$work/ref/fanout-1x.json")
  if [ "$rmax" -gt 1 ]; then
    cp "$work/ref/latency-half.json" "$work/ref/latency-same.json" 2>/dev/null || true
    cp "$work/ref/latency-half.cmd" "$work/ref/latency-same.cmd" 2>/dev/null || true
    run shoal latency-same fanout --url "$url" --admin "$admin" --channels 1 --subs "$SUBS" --publishers 1 --payload 100 \
      --duration "$DURATION" --agents "$AGENTS" --rate "$(half "$rmax")" --sources "$SOURCES" --source-base "$SOURCE_BASE"
  fi

  if [ "$PROFILE" = 1 ]; then
    if command -v perf >/dev/null; then
      : >"$work/profile.txt"
      profile_fanout max
      smax=$(sustained "$work/shoal/fanout-1x.json")
      if [ "$smax" -gt 1 ]; then profile_fanout paced --rate "$(half "$smax")"; fi
    else
      log "PROFILE=1 but perf is not installed (apt-get install -y linux-perf): skipped"
    fi
  fi
  stop "$shoal_pid"; shoal_pid=""
fi

# Idle wss:// memory on a fresh cluster: after the fan-out scenarios a
# worker can still hold the heap its send queues grew to (Go returns it to
# the OS only slowly), which would be counted as TLS memory.
if [ "$WSS_CONNS" -gt 0 ] && want conns-wss; then
  start_shoal cluster-wss auto 1
  if [ -n "$wss" ]; then
    run_mem "$(server_pids cluster-wss)" shoal conns-wss conns --url "$wss" --admin "$admin" --conns "$WSS_CONNS" --agents "$CONN_AGENTS" --concurrency "$CONN_CONCURRENCY" --hold "$HOLD" \
      --sources "$SOURCES" --source-base "$SOURCE_BASE"
  fi
  stop "$shoal_pid"; shoal_pid=""
fi
if [ "$MAX_CONNS" -gt 0 ] && want conns-max; then
  start_shoal cluster-max "$(ceil_div "$MAX_CONNS" 17000)" 0
  run_mem "$(server_pids cluster-max)" shoal conns-max conns --url "$url" --admin "$admin" --conns "$MAX_CONNS" --agents "$(ceil_div "$MAX_CONNS" 15000)" \
    --hold "$HOLD" --sources "$SOURCES" --source-base "$SOURCE_BASE"
  stop "$shoal_pid"; shoal_pid=""
fi
if [ "$BIG_SUBS2" -gt 0 ] && want fanout-100x-big; then
  big=$((CHANNELS2 * BIG_SUBS2 + PUBS2))
  start_shoal cluster-big "$(ceil_div "$big" 17000)" 0
  run shoal fanout-100x-big fanout --url "$url" --admin "$admin" --channels "$CHANNELS2" --subs "$BIG_SUBS2" --publishers "$PUBS2" \
    --payload 100 --duration "$DURATION" --agents "$(ceil_div "$big" 15000)" --sources "$SOURCES" --source-base "$SOURCE_BASE"
  stop "$shoal_pid"; shoal_pid=""
fi

if [ "$GOBENCH" = 1 ]; then
  gopkgs="./proto/sc ./worker ./worker/netpoll ./broker ./brokerclient ./handoff ./middleware"
  echo "go test -run '^\$' -bench . -benchmem $gopkgs" >"$work/gobench.cmd"
  log "go benchmarks: $(cat "$work/gobench.cmd")"
  (cd "$GOSRC" && timeout -k 10 600 go test -run '^$' -bench . -benchmem $gopkgs) >"$work/gobench.txt" 2>&1 ||
    log "  go benchmarks failed (output kept in the report)"
fi

# ---- the report --------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC') (run took $(( $(date +%s) - started )) s)"
  echo "CPU: $(nproc) × $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
  echo "memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "kernel: $(uname -sr)"
  echo "open files per process: $(ulimit -Sn) (soft), $(ulimit -Hn) (hard)"
  echo "Go: $(go version 2>/dev/null | awk '{ print $3 }') (the binary: $(go version "$bin" 2>/dev/null | awk '{ print $2 }'))"
  echo "Node: $(node --version 2>/dev/null || echo none)"
  echo "socketcluster-server: $(awk -F'"' '/"version"/ { print $4; exit }' "$root/test/reference/node_modules/socketcluster-server/package.json" 2>/dev/null)"
  if [ -z "$COMMIT" ]; then
    COMMIT="commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "unknown (not a git checkout)")"
    if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then
      COMMIT="$COMMIT (the checkout had uncommitted changes)"
    fi
  fi
  echo "Shoal: $COMMIT"
  echo "Shoal cluster: workers auto ($(nproc)), brokers 2, balancers 1, GOMAXPROCS 1 per worker (the default)"
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$work/machine.txt"
for v in CONNS1 CONNS2 REF_CONNS2 CONN_AGENTS CONN_CONCURRENCY SOURCES SOURCE_BASE HOLD WSS_CONNS MAX_CONNS SUBS CHANNELS2 SUBS2 PUBS2 BIG_SUBS2 AGENTS DURATION SHORT LAT_RATES RTT_CONNS CHURN_CONNS PROFILE GOBENCH; do
  echo "$v: ${!v}"
done >"$work/sizes.txt"
mkdir -p "$(dirname "$out")"
"$report" report -dir "$work" -o "$out"
log "wrote $out ($(( $(date +%s) - started )) s)"
