#!/usr/bin/env bash
# WAN benchmark (issue 17): a store behind a link with round-trip latency and a bandwidth cap. One
# S3 server (s3s-fs, as in the tests, on 127.0.0.1) sits behind bench/wanlink.py, a userspace proxy
# that delays, paces and counts every HTTP request by kind; ours and the anchors (rclone crypt over
# S3, restic over S3) all go through it. Setup steps (a first backup before a no-change one) go
# straight to the server; only the measured runs cross the link.
#
#   bench/wan.sh                                  # scenarios 1-4, 40 ms RTT, 50 Mbit/s up, 200 down
#   bench/wan.sh --rtt 40,150 --scenarios 1,2     # also the far case
#   bench/wan.sh --scenarios 4 --big-gib 1 --drop # the big file, then again with a 10 s link drop
#   bench/wan.sh --scenarios 1 --azurite          # our tool against Azurite behind the same link
#
# Scenarios: 1 first backup of the scale-S library (anchors: rclone copy to a crypt remote, restic
# backup), 2 no-change backup of N small files (anchor: restic), 3 restore of scenario 1's library
# (anchors: rclone copy back, restic restore; needs 1 in the same run), 4 one big file (multipart).
# Options: --rtt LIST (ms, default 40; each RTT runs every scenario, but 4 only at the first),
# --up MBIT (50), --down MBIT (200), --scenarios LIST (1,2,3,4), --reps N (1), --scale S (0.3),
# --small-files N (100000), --big-gib G (4), --drop (scenario 4: a second run whose link drops
# for --drop-secs S (10) halfway, --drop-mode stall|reset (stall); --drop-only: only that run),
# --azurite (scenario 1 against Azurite too; --azurite-only: only that), --concurrency N (our
# [storage] concurrency; default: the tool's), --no-anchors (only ours), --work DIR (default
# $WAN_WORK or /var/tmp/wan-bench; one run at a time per folder: a run empties DIR/s3), --keep
# (keep the stores), --append (add to an earlier run's rows in the same folder).
# Needs: cargo, PostgreSQL server binaries, GNU time, python3, restic and rclone (installed with
# apt-get when missing and root). Raw rows: $WORK/wan.tsv; per run the proxy's counts
# $WORK/runs/NAME.json; the summary table: $WORK/wan-summary.md (and stdout).
set -euo pipefail

RTTS=40 UP=50 DOWN=200 SCENARIOS=1,2,3,4 REPS=1 SCALE=0.3 SMALL_FILES=100000 BIG_GIB=4
DROP=0 DROP_ONLY=0 DROP_SECS=10 DROP_MODE=stall AZURITE=0 AZ_ONLY=0 KEEP=0 APPEND=0 CONC="" ANCHORS=1
WORK=${WAN_WORK:-/var/tmp/wan-bench}
while [ $# -gt 0 ]; do
  case "$1" in
    --rtt) RTTS=$2; shift 2 ;;
    --up) UP=$2; shift 2 ;;
    --down) DOWN=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    --small-files) SMALL_FILES=$2; shift 2 ;;
    --big-gib) BIG_GIB=$2; shift 2 ;;
    --drop) DROP=1; shift ;;
    --drop-only) DROP=1; DROP_ONLY=1; shift ;;
    --drop-secs) DROP_SECS=$2; shift 2 ;;
    --drop-mode) DROP_MODE=$2; shift 2 ;;
    --azurite) AZURITE=1; shift ;;
    --azurite-only) AZURITE=1; AZ_ONLY=1; shift ;;
    --concurrency) CONC=$2; shift 2 ;;
    --no-anchors) ANCHORS=0; shift ;;
    --work) WORK=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --append) APPEND=1; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
has() { case ",$SCENARIOS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------
need=()
for t in restic:restic rclone:rclone python3:python3; do command -v "${t%%:*}" >/dev/null || need+=("${t#*:}"); done
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${need[*]}"
    apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${need[@]}" >/dev/null; }
  else
    echo "missing ${need[*]}: apt-get install them" >&2; exit 1
  fi
fi

log "building (release)"
(cd "$REPO" && cargo build --release --quiet --bin immich-backup --example bench_gen --example s3_server)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
IB=${IMMICH_BACKUP_BIN:-$TARGET_DIR/release/immich-backup}
GEN=$TARGET_DIR/release/examples/bench_gen
S3SRV=$TARGET_DIR/release/examples/s3_server

mkdir -p "$WORK/runs"
WORK=$(cd "$WORK" && pwd)
chmod 755 "$WORK"
RESULTS=$WORK/wan.tsv
[ "$APPEND" = 1 ] || : > "$RESULTS"
# The store is plain http on 127.0.0.1: a CA bundle in the environment only breaks rclone's S3 client.
unset AWS_CA_BUNDLE
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$WORK/restic-cache RCLONE_CONFIG=$WORK/rclone.conf

# --- background processes: the database clusters, the S3 server, the link -----------------------
PIDS=() FDS=() LINK_PID=""
cleanup() {
  [ -n "$LINK_PID" ] && kill "$LINK_PID" 2>/dev/null
  for fd in "${FDS[@]:-}"; do [ -n "$fd" ] && eval "exec $fd>&-" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
# start_db NAME GEN-ARGS…: a bench_gen database that lives until this script exits; sets NAME_PORT.
start_db() {
  local name=$1; shift
  local env=$WORK/$name.env fifo=$WORK/$name.fifo fd
  rm -f "$env" "$fifo"; mkfifo "$fifo"
  "$GEN" db --base "$WORK" --env "$env" "$@" <"$fifo" 2>"$WORK/$name.log" &
  PIDS+=($!)
  exec {fd}>"$fifo"; FDS+=("$fd")
  while [ ! -e "$env" ]; do
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/$name.log" >&2; exit 1; }
    sleep 0.5
  done
  # shellcheck disable=SC1090
  . "$env"
  eval "${name}_PORT=$PGPORT"
  PG_BIN_DIR=$PG_BIN
  rm -f "$fifo"
}
# The S3 server: its files under $WORK/s3, alive while this script runs (it ends when stdin closes).
rm -rf "$WORK/s3"; mkdir -p "$WORK/s3"
fifo=$WORK/s3.fifo; rm -f "$fifo"; mkfifo "$fifo"
TMPDIR=$WORK/s3 "$S3SRV" bench <"$fifo" >"$WORK/s3.out" 2>"$WORK/s3.log" &
PIDS+=($!)
exec {s3fd}>"$fifo"; FDS+=("$s3fd"); rm -f "$fifo"
while [ "$(wc -l <"$WORK/s3.out")" -lt 3 ]; do sleep 0.2; done
S3_DIRECT=$(sed -n 1p "$WORK/s3.out")
read -r AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY < <(sed -n 2p "$WORK/s3.out")
S3_ROOT=$(sed -n 3p "$WORK/s3.out")
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
LPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
S3_LINK=http://127.0.0.1:$LPORT
log "S3 server $S3_DIRECT (files in $S3_ROOT); the link listens on $S3_LINK"

# link_up NAME RTT [wanlink options…]: a fresh link (fresh counters) in front of $LINK_TARGET.
LINK_TARGET=${S3_DIRECT#http://}
link_up() {
  local name=$1 rtt=$2; shift 2
  rm -f "$WORK/runs/$name.json"
  python3 "$REPO/bench/wanlink.py" --listen "127.0.0.1:$LPORT" --target "$LINK_TARGET" \
    --rtt-ms "$rtt" --up-mbit "$UP" --down-mbit "$DOWN" --stats "$WORK/runs/$name.json" "$@" \
    2>>"$WORK/wanlink.log" &
  LINK_PID=$!
  while ! python3 -c "import socket; socket.create_connection(('127.0.0.1', $LPORT), 1)" 2>/dev/null; do sleep 0.1; done
}
link_down() { kill -TERM "$LINK_PID"; wait "$LINK_PID" 2>/dev/null || true; LINK_PID=""; }

# --- measuring ---------------------------------------------------------------------------------
# measure SCENARIO RTT TOOL NAME CMD [wanlink options…]: run CMD across a fresh link under GNU time;
# append one row to wan.tsv: scenario, rtt, tool, name, wall s, cpu s, peak RSS KiB (the proxy's
# counts are in runs/NAME.json, the command's stdout in runs/NAME.out).
measure() {
  local scenario=$1 rtt=$2 tool=$3 name=$4 cmd=$5 rc=0 t0 t1; shift 5
  link_up "$name" "$rtt" "$@"
  sync
  t0=$(date +%s%N)
  /usr/bin/time -f '%U %S %M' -o "$WORK/time.out" bash -c "$cmd" >"$WORK/runs/$name.out" 2>"$WORK/runs/$name.err" || rc=$?
  t1=$(date +%s%N)
  link_down
  if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then
    echo "FAILED ($rc): $cmd" >&2; tail -20 "$WORK/runs/$name.err" >&2; exit 1
  fi
  local user sys rss wall cpu
  read -r user sys rss < <(tail -1 "$WORK/time.out")
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')
  cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$rtt" "$tool" "$name" "$wall" "$cpu" "$rss" >>"$RESULTS"
  python3 - "$WORK/runs/$name.json" "$wall" "$tool" <<'PY' >&2
import json, sys
s = json.load(open(sys.argv[1]))
print(f"   {sys.argv[3]:<28} wall {float(sys.argv[2]):7.1f} s  up {s['bytes_up']/1e6:8.1f} MB  down {s['bytes_down']/1e6:8.1f} MB  requests {s['requests_total']} {s['requests']}")
PY
}

# --- keys, configs -----------------------------------------------------------------------------
ID=$WORK/identity.txt SIGN=$WORK/identity.signing.key
[ -e "$ID" ] || "$IB" keygen -o "$ID" --signing-key "$SIGN" >/dev/null
RCPT=$(sed -n 's/^# public key: //p' "$ID")
# config NAME UPLOAD_LOCATION PG_PORT ENDPOINT PREFIX: $WORK/NAME.toml for s3://bench/PREFIX.
config() {
  cat >"$WORK/$1.toml" <<TOML
[immich]
upload_location = "$2"
[database]
mode = "local"
host = "127.0.0.1"
port = $3
bin_dir = "$PG_BIN_DIR"
[storage]
url = "s3://bench/$5"
endpoint = "$4"
allow_http = true
region = "us-east-1"
access_key_id = "$AWS_ACCESS_KEY_ID"
${CONC:+concurrency = $CONC}
[encryption]
recipients = ["$RCPT"]
identity_file = "$ID"
signing_key_file = "$SIGN"
[backup]
cache_dir = "$WORK/$1-cache"
on_missing_original = "ignore"
TOML
}
ours() { echo "'$IB' --no-progress -c '$WORK/$1.toml' ${*:2}"; }
OURS="immich-backup${CONC:+ (concurrency $CONC)}"
ours_ok() { local rc=0; bash -c "$(ours "$@")" >/dev/null 2>"$WORK/setup.err" || rc=$?; [ $rc -eq 0 ] || [ $rc -eq 3 ] || { cat "$WORK/setup.err" >&2; exit 1; }; }
drop_prefix() { rm -rf "${S3_ROOT:?}/bench/$1"; }

OBSCURED=$(rclone obscure bench)
cat >"$RCLONE_CONFIG" <<CONF
[link]
type = s3
provider = Other
access_key_id = $AWS_ACCESS_KEY_ID
secret_access_key = $AWS_SECRET_ACCESS_KEY
endpoint = $S3_LINK
region = us-east-1
# The crypt remote obfuscates file names rather than encrypting them: s3s-fs keeps each object's
# metadata in a file named after the base64 of its key, so keys over ~170 bytes (rclone's encrypted
# names of the library's paths) fail with 500. The contents are encrypted all the same.
[linkcrypt]
type = crypt
remote = link:bench/rclone
password = $OBSCURED
password2 = $OBSCURED
filename_encryption = obfuscate
CONF
RCLONE_FILTER="--filter '+ /library/**' --filter '+ /upload/**' --filter '+ /profile/**' --filter '- **'"

gen_once() { local dir=$1; shift; if [ ! -e "$dir.done" ]; then rm -rf "$dir"; "$GEN" "$@" "$dir" >&2; touch "$dir.done"; fi; }

start_db small --assets 200
log "database ready on port $small_PORT"
IFS=, read -r -a RTT_LIST <<<"$RTTS"

# --- link check: does the proxy reach the configured rates? -------------------------------------
if [ "$APPEND" = 0 ]; then
  mkdir -p "$S3_ROOT/bench/linkcheck"
  head -c $((64 << 20)) /dev/urandom >"$S3_ROOT/bench/linkcheck/64MiB"
  log "link check: 64 MiB down and up through the link at ${RTT_LIST[0]} ms"
  measure "0 link check" "${RTT_LIST[0]}" "rclone cat 64 MiB (down)" linkcheck-down \
    "rclone cat link:bench/linkcheck/64MiB > /dev/null"
  measure "0 link check" "${RTT_LIST[0]}" "rclone rcat 64 MiB (up)" linkcheck-up \
    "head -c $((64 << 20)) /dev/urandom | rclone rcat --s3-upload-cutoff 100M link:bench/linkcheck/up"
  drop_prefix linkcheck
fi

for RTT in "${RTT_LIST[@]}"; do
  # --- 1: first backup, and 3: restore ---------------------------------------------------------
  if has 1 || has 3; then
    UL=$WORK/library-$SCALE
    gen_once "$UL" library --scale "$SCALE"
    log "scenario 1 at $RTT ms: first backup of $(du -sc --apparent-size -BM "$UL"/library "$UL"/upload "$UL"/profile | tail -1 | cut -f1)"
    for rep in $(seq "$REPS"); do
      P=ib1-$RTT-$rep
      drop_prefix "$P"; rm -rf "$WORK/s1-cache"
      config s1 "$UL" "$small_PORT" "$S3_LINK" "$P"
      config s1direct "$UL" "$small_PORT" "$S3_DIRECT" "$P"
      [ "$AZ_ONLY" = 0 ] || continue
      ours_ok s1direct init
      rm -rf "$WORK/s1-cache"
      measure "1 first backup" "$RTT" "$OURS" "s1-ours$CONC-$RTT-$rep" "$(ours s1 backup --json)"
      [ "$ANCHORS" = 1 ] || continue
      drop_prefix rclone
      measure "1 first backup" "$RTT" "rclone copy (crypt)" "s1-rclone-$RTT-$rep" \
        "rclone copy $RCLONE_FILTER '$UL' linkcrypt:"
      drop_prefix "restic-$RTT"
      restic -q -r "s3:$S3_DIRECT/bench/restic-$RTT" init >/dev/null
      measure "1 first backup" "$RTT" "restic backup" "s1-restic-$RTT-$rep" \
        "cd '$UL' && restic -q -r 's3:$S3_LINK/bench/restic-$RTT' backup library upload profile"
    done
  fi
  if has 3; then
    [ -n "${restore_PORT:-}" ] || start_db restore --assets 10
    config s3r "$WORK/restored" "$restore_PORT" "$S3_LINK" "ib1-$RTT-$REPS"
    log "scenario 3 at $RTT ms: restore"
    for rep in $(seq "$REPS"); do
      rm -rf "$WORK/restored" "$WORK/s3r-cache"
      "$PG_BIN_DIR/psql" -X -q -h 127.0.0.1 -p "$restore_PORT" -U postgres -d postgres \
        -c 'DROP DATABASE IF EXISTS immich' >/dev/null
      measure "3 restore" "$RTT" "$OURS restore" "s3-ours$CONC-$RTT-$rep" \
        "$(ours s3r restore latest --target "'$WORK/restored'")"
      diff -r "$UL/library" "$WORK/restored/library" >/dev/null || { echo "restored files differ!" >&2; exit 1; }
      rm -rf "$WORK/restored"
      [ "$ANCHORS" = 1 ] || continue
      measure "3 restore" "$RTT" "rclone copy (crypt) back" "s3-rclone-$RTT-$rep" \
        "rclone copy linkcrypt: '$WORK/restored'"
      rm -rf "$WORK/restored"
      measure "3 restore" "$RTT" "restic restore" "s3-restic-$RTT-$rep" \
        "restic -q -r 's3:$S3_LINK/bench/restic-$RTT' restore latest --target '$WORK/restored'"
      rm -rf "$WORK/restored"
    done
  fi
  if has 1 && [ "$AZURITE" = 1 ]; then
    AZ=${AZURITE_BLOB:-$REPO/.ci/node_modules/.bin/azurite-blob}
    APORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mkdir -p "$WORK/azurite"
    (cd "$WORK/azurite" && exec "$AZ" --blobHost 127.0.0.1 --blobPort "$APORT" --inMemoryPersistence \
      --disableTelemetry --silent --skipApiVersionCheck) >/dev/null 2>&1 &
    AZ_PID=$!
    python3 "$REPO/bench/wan_azure.py" create-container "$APORT" bench
    for rep in $(seq "$REPS"); do
      P=az-$RTT-$rep
      for c in s1az s1azdirect; do
        ep=$([ $c = s1az ] && echo "http://127.0.0.1:$LPORT/devstoreaccount1" || echo "http://127.0.0.1:$APORT/devstoreaccount1")
        config $c "$UL" "$small_PORT" "$ep" "$P"
        sed -i -e "s#^url = .*#url = \"az://bench/$P\"#" -e '/^region/d' -e 's#^access_key_id = .*#account_name = "devstoreaccount1"#' "$WORK/$c.toml"
      done
      IMMICH_BACKUP__STORAGE__ACCOUNT_KEY=$(python3 "$REPO/bench/wan_azure.py" key) ours_ok s1azdirect init
      rm -rf "$WORK/s1az-cache"
      LINK_TARGET=127.0.0.1:$APORT
      measure "1 first backup (Azurite)" "$RTT" "$OURS" "s1az-ours$CONC-$RTT-$rep" \
        "IMMICH_BACKUP__STORAGE__ACCOUNT_KEY='$(python3 "$REPO/bench/wan_azure.py" key)' $(ours s1az backup --json)"
      LINK_TARGET=${S3_DIRECT#http://}
    done
    kill "$AZ_PID"; wait "$AZ_PID" 2>/dev/null || true
  fi
  [ "$KEEP" = 1 ] || { drop_prefix "ib1-$RTT-$REPS"; drop_prefix rclone; drop_prefix "restic-$RTT"; for r in $(seq "$REPS"); do drop_prefix "ib1-$RTT-$r"; done; }

  # --- 2: no-change backup of many small files -------------------------------------------------
  if has 2; then
    SM=$WORK/small-$SMALL_FILES
    gen_once "$SM" small --files "$SMALL_FILES"
    P=ib2-$RTT
    drop_prefix "$P"; rm -rf "$WORK/s2-cache"
    config s2 "$SM" "$small_PORT" "$S3_LINK" "$P"
    config s2direct "$SM" "$small_PORT" "$S3_DIRECT" "$P"
    sed -i "s#s2direct-cache#s2-cache#" "$WORK/s2direct.toml"
    log "scenario 2 at $RTT ms: no-change backup of $SMALL_FILES small files (first backups straight to the server)"
    ours_ok s2direct init
    ours_ok s2direct backup
    drop_prefix "restic2-$RTT"
    [ "$ANCHORS" = 0 ] || restic -q -r "s3:$S3_DIRECT/bench/restic2-$RTT" init >/dev/null
    [ "$ANCHORS" = 0 ] || (cd "$SM" && restic -q -r "s3:$S3_DIRECT/bench/restic2-$RTT" backup library upload profile >/dev/null)
    for rep in $(seq "$REPS"); do
      measure "2 no-change backup" "$RTT" "$OURS" "s2-ours$CONC-$RTT-$rep" "$(ours s2 backup --json)"
      [ "$ANCHORS" = 1 ] || continue
      measure "2 no-change backup" "$RTT" "restic backup (2nd)" "s2-restic-$RTT-$rep" \
        "cd '$SM' && restic -q -r 's3:$S3_LINK/bench/restic2-$RTT' backup library upload profile"
    done
    [ "$KEEP" = 1 ] || { drop_prefix "$P"; drop_prefix "restic2-$RTT"; }
  fi
done

# --- 4: one big file (multipart), and the same with the link dropping -------------------------
if has 4; then
  RTT=${RTT_LIST[0]}
  BIG=$WORK/big-$BIG_GIB
  gen_once "$BIG" big --gib "$BIG_GIB"
  log "scenario 4 at $RTT ms: one $BIG_GIB GiB file"
  for rep in $(seq "$REPS"); do
    [ "$DROP_ONLY" = 0 ] || break
    P=ib4-$rep; drop_prefix "$P"; rm -rf "$WORK/s4-cache"
    config s4 "$BIG" "$small_PORT" "$S3_LINK" "$P"
    config s4direct "$BIG" "$small_PORT" "$S3_DIRECT" "$P"
    ours_ok s4direct init; rm -rf "$WORK/s4-cache"
    measure "4 big file" "$RTT" "$OURS" "s4-ours$CONC-$rep" "$(ours s4 backup --json)"
    drop_prefix "$P"
  done
  if [ "$DROP" = 1 ]; then
    P=ib4-drop; drop_prefix "$P"; rm -rf "$WORK/s4-cache"
    config s4 "$BIG" "$small_PORT" "$S3_LINK" "$P"
    config s4direct "$BIG" "$small_PORT" "$S3_DIRECT" "$P"
    ours_ok s4direct init; rm -rf "$WORK/s4-cache"
    half=$(( (BIG_GIB << 30) / 2 ))
    log "scenario 4 again: the link drops for $DROP_SECS s ($DROP_MODE) after $((half >> 20)) MiB went up"
    measure "4 big file, link drop" "$RTT" "$OURS" "s4-drop$CONC" "$(ours s4 backup --json)" \
      --drop-at-up-bytes "$half" --drop-secs "$DROP_SECS" --drop-mode "$DROP_MODE"
    drop_prefix "$P"
  fi
fi

python3 "$REPO/bench/wan_summary.py" "$WORK" --up "$UP" --down "$DOWN" | tee "$WORK/wan-summary.md"
