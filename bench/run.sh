#!/usr/bin/env bash
# immich-backup benchmarks: each scenario runs our tool and its anchor on the same data, in the same
# run, alternating the order, --reps times; the summary reports medians and ratios (ours ÷ anchor).
#
#   bench/run.sh                       # scenarios 1-4 at scale 0.3 (a few minutes on 2 cores)
#   bench/run.sh --scale 1 --reps 5    # the full size: 1.5 GB library, ≈ 700 MB dump
#   bench/run.sh --scenarios 5         # peak RSS: one 4 GiB file and 1,000,000 small files
#   bench/run.sh --scenarios 2 --small-files 100000 --reps 5
#   bench/run.sh --scenarios 6         # check --read-data of the scenario-1 library's store
#
# Options: --scale S, --reps N, --scenarios LIST (1,2,3,4,5,6), --work DIR (data and stores; default
# $BENCH_WORK or /var/tmp/immich-backup-bench), --small-files N (scenario 2, default 100000),
# --big-gib G and --huge-files N (scenario 5, defaults 4 and 1000000), --keep (keep stores).
# Needs: cargo, PostgreSQL server binaries, GNU time; installs age, restic, borg, hyperfine and time
# with apt-get when they are missing and it can. IMMICH_BACKUP_BIN=path measures another build;
# BASELINE_BIN=path also measures an older build in scenarios 1-4, for before/after numbers. Writes raw numbers to $WORK/results.tsv and the
# summary table to $WORK/summary.md (and prints it).
set -euo pipefail

SCALE=0.3 REPS=3 SCENARIOS=1,2,3,4 SMALL_FILES=100000 BIG_GIB=4 HUGE_FILES=1000000 KEEP=0
WORK=${BENCH_WORK:-/var/tmp/immich-backup-bench}
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --small-files) SMALL_FILES=$2; shift 2 ;;
    --big-gib) BIG_GIB=$2; shift 2 ;;
    --huge-files) HUGE_FILES=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
has() { case ",$SCENARIOS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------
need=()
for t in age:age restic:restic borg:borgbackup hyperfine:hyperfine; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${need[*]}"
    apt-get install -y -q "${need[@]}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null 2>&1; } ||
      echo "could not install ${need[*]}; the scenarios that need them are skipped" >&2
  else
    echo "missing ${need[*]} (apt-get install them); the scenarios that need them are skipped" >&2
  fi
fi
[ -x /usr/bin/time ] || { echo "GNU time (/usr/bin/time) is required" >&2; exit 1; }
command -v age >/dev/null || { echo "age is required for the anchors" >&2; exit 1; }

log "building (release)"
(cd "$REPO" && cargo build --release --quiet --bin immich-backup --example bench_gen)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
IB=${IMMICH_BACKUP_BIN:-$TARGET_DIR/release/immich-backup}   # IMMICH_BACKUP_BIN: measure another build
BASE=${BASELINE_BIN:-}   # BASELINE_BIN: also measure this build, as "baseline build", beside ours
GEN=$TARGET_DIR/release/examples/bench_gen

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
chmod 755 "$WORK"   # the postgres user must reach the clusters' folders
RESULTS=$WORK/results.tsv
: > "$RESULTS"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_BASE_DIR=$WORK/borg-home RESTIC_CACHE_DIR=$WORK/restic-cache

# --- measuring ---------------------------------------------------------------------------------
# measure SCENARIO TOOL ROLE CMD: run CMD under GNU time after `sync`, append one TSV row
# (scenario, tool, role, wall s, cpu s, peak RSS KiB). ROLE is `ours`, `anchor` or `other`.
measure() {
  local scenario=$1 tool=$2 role=$3 cmd=$4 out=$WORK/time.out t0 t1 rc=0
  sync
  t0=$(date +%s%N)
  /usr/bin/time -f '%U %S %M' -o "$out" bash -c "$cmd" >"$WORK/last.log" 2>&1 || rc=$?
  t1=$(date +%s%N)
  if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then
    echo "FAILED ($rc): $cmd" >&2; tail -20 "$WORK/last.log" >&2; exit 1
  fi
  read -r user sys rss < <(tail -1 "$out")
  local wall cpu
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')
  cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$tool" "$role" "$wall" "$cpu" "$rss" >>"$RESULTS"
  printf '   %-28s %-34s wall %7.2fs  cpu %7.2fs  rss %7.1f MiB\n' "$scenario" "$tool" "$wall" "$cpu" \
    "$(awk -v r="$rss" 'BEGIN{print r/1024}')" >&2
}

# --- databases ---------------------------------------------------------------------------------
PIDS=()
cleanup() {
  for fd in "${DBFDS[@]:-}"; do [ -n "$fd" ] && eval "exec $fd>&-" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  delete_trash
}
DBFDS=()
trap cleanup EXIT
# start_db NAME GEN-ARGS…: a bench_gen database that lives until this script exits; sets NAME_PORT.
start_db() {
  local name=$1; shift
  local env=$WORK/$name.env fifo=$WORK/$name.fifo fd
  rm -f "$env" "$fifo"; mkfifo "$fifo"
  "$GEN" db --base "$WORK" --env "$env" "$@" <"$fifo" 2>"$WORK/$name.log" &
  PIDS+=($!)
  exec {fd}>"$fifo"; DBFDS+=("$fd")
  while [ ! -e "$env" ]; do
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/$name.log" >&2; exit 1; }
    sleep 0.5
  done
  # shellcheck disable=SC1090
  . "$env"
  eval "${name}_PORT=$PGPORT"
  PG_BIN_DIR=$PG_BIN
  rm -f "$fifo"
  log "database $name ready on port $PGPORT ($(tail -1 "$WORK/$name.log"))"
}

# --- keys and configs --------------------------------------------------------------------------
ID=$WORK/identity.txt
SIGN=$WORK/identity.signing.key   # the backup machine's signing key, made from the identity
[ -e "$ID" ] || "$IB" keygen -o "$ID" --signing-key "$SIGN" >/dev/null
[ -e "$SIGN" ] || "$IB" signing-key --identity "$ID" -o "$SIGN" >/dev/null
RCPT=$(sed -n 's/^# public key: //p' "$ID")

# config NAME UPLOAD_LOCATION PORT: write $WORK/NAME.toml for a store at $WORK/NAME-store.
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
url = "file://$WORK/$1-store"
[encryption]
recipients = ["$RCPT"]
identity_file = "$ID"
[backup]
cache_dir = "$WORK/$1-cache"
TOML
}
# Deleting thousands of files just before a measurement slows the file creations that follow: ext4
# without a journal (the file system RESULTS.md was measured on) checks, one by one, the inodes freed
# in the last minute when it allocates new ones, and for six minutes where their inode table block is
# dirty again, as new files in the same block make it. A store of 1,600 objects written after a large
# deletion spent half its time in the inode allocator. So what a measurement replaces goes to a trash
# folder, emptied when the run ends (or sooner when the disk runs short), and a scenario that follows
# a large deletion (this run's or a previous run's) waits until the freed inodes have aged.
TRASHED=0
trash() { for d in "$@"; do [ -e "$d" ] && { mkdir -p "$WORK/trash"; TRASHED=$((TRASHED + 1)); mv "$d" "$WORK/trash/$TRASHED"; }; done; return 0; }
DELETED=$WORK/.deleted   # its mtime: when this script last deleted many files
SETTLE_SECS=370
delete_trash() { if [ -e "$WORK/trash" ]; then rm -rf "$WORK/trash"; touch "$DELETED"; fi; }
empty_trash() { # only when the disk runs short (under 30 GB free)
  local free_kb; free_kb=$(df -Pk "$WORK" | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((30 * 1024 * 1024)) ]; then delete_trash; fi
}
settle_deletes() { # wait until SETTLE_SECS after the last large deletion, with the inode tables written
  [ -e "$DELETED" ] || return 0
  sync
  local left=$(( $(stat -c %Y "$DELETED") + SETTLE_SECS - $(date +%s) ))
  if [ "$left" -gt 0 ]; then log "waiting ${left} s for freed inodes to age (see the comment in bench/run.sh)"; sleep "$left"; fi
}
fresh_store() { trash "$WORK/$1-store" "$WORK/$1-cache"; mkdir -p "$WORK/$1-store"; "$IB" -c "$WORK/$1.toml" init >/dev/null; }
# Ours signs its snapshots (the key through the environment, so that the same config files also
# suit a baseline build older than signing).
ours() { echo "IMMICH_BACKUP__ENCRYPTION__SIGNING_KEY_FILE='$SIGN' '$IB' --no-progress -c '$WORK/$1.toml' ${*:2}"; }
# Run ours outside a measurement: exit 3 is fine (a partial snapshot: the benchmark databases name
# assets the generated libraries do not hold, and the consistency check says so).
ours_ok() { local rc=0; bash -c "$(ours "$@")" >/dev/null 2>&1 || rc=$?; [ $rc -eq 0 ] || [ $rc -eq 3 ]; }
# A baseline build that signs (it has the signing-key command) gets the key too.
BASE_ENV=""
if [ -n "$BASE" ] && "$BASE" signing-key --help >/dev/null 2>&1; then
  BASE_ENV="IMMICH_BACKUP__ENCRYPTION__SIGNING_KEY_FILE='$SIGN' "
fi
base() { echo "$BASE_ENV'$BASE' --no-progress -c '$WORK/$1.toml' ${*:2}"; }

gen_once() { # gen_once DIR ARGS…: generate data unless DIR/.done says it is there already
  local dir=$1; shift
  if [ ! -e "$dir.done" ]; then rm -rf "$dir"; "$GEN" "$@" "$dir" >&2; touch "$dir.done"; fi
}

if has 1 || has 2 || has 4 || has 5 || has 6; then
  start_db small --assets 200
fi

# --- 1: first backup, and 4: restore ------------------------------------------------------------
if has 1 || has 4 || has 6; then
  UL=$WORK/library-$SCALE
  gen_once "$UL" library --scale "$SCALE"
  config s1 "$UL" "$small_PORT"
fi
if has 1 || has 4; then
  log "scenario 1: first backup of $(du -sc --apparent-size -BM "$UL"/library "$UL"/upload "$UL"/profile | tail -1 | cut -f1) (library upload profile)"
  settle_deletes
  TAR=$WORK/s1.tar.age
  for rep in $(seq "$REPS"); do
    run_anchor() { trash "$TAR"; measure "1 first backup" "tar | age" anchor \
      "tar -cf - -C '$UL' library upload profile | age -r $RCPT > '$TAR'"; }
    run_ours() { fresh_store s1; measure "1 first backup" "immich-backup" ours "$(ours s1 backup)"; }
    if [ $((rep % 2)) = 1 ]; then run_anchor; run_ours; else run_ours; run_anchor; fi
    measure "1 first backup" "tar | age; sync" other \
      "tar -cf - -C '$UL' library upload profile | age -r $RCPT > '$TAR' && sync"
    if [ -n "$BASE" ]; then
      fresh_store s1; measure "1 first backup" "immich-backup (baseline build)" other "$(base s1 backup)"
    fi
    if command -v restic >/dev/null; then
      trash "$WORK/restic1"; restic -q -r "$WORK/restic1" init >/dev/null
      measure "1 first backup" "restic" other "cd '$UL' && restic -q -r '$WORK/restic1' backup library upload profile"
    fi
    if command -v borg >/dev/null; then
      trash "$WORK/borg1"; borg init -e repokey "$WORK/borg1" >/dev/null 2>&1
      measure "1 first backup" "borg" other "cd '$UL' && borg create '$WORK/borg1::s' library upload profile"
    fi
  done
  trash "$WORK/restic1" "$WORK/borg1"; empty_trash
  # Scenario 4 restores the s1 store: leave it as our build writes it (signed), not the baseline's.
  if [ -n "$BASE" ]; then fresh_store s1; ours_ok s1 backup; fi
fi

if has 4; then
  start_db restore --assets 10
  config s4 "$WORK/restored" "$restore_PORT"
  sed -i "s#url = .*#url = \"file://$WORK/s1-store\"#" "$WORK/s4.toml"
  log "scenario 4: restore of the files of scenario 1"
  settle_deletes
  for rep in $(seq "$REPS"); do
    run_anchor() { trash "$WORK/untarred"; mkdir -p "$WORK/untarred"
      measure "4 file restore" "age -d | tar -x" anchor "age -d -i '$ID' '$TAR' | tar -x -C '$WORK/untarred'"; }
    run_ours() { trash "$WORK/restored"
      "$PG_BIN_DIR/psql" -X -q -h 127.0.0.1 -p "$restore_PORT" -U postgres -d postgres \
        -c 'DROP DATABASE IF EXISTS immich' >/dev/null
      measure "4 file restore" "immich-backup restore" ours "$(ours s4 restore latest --target "'$WORK/restored'")"; }
    if [ $((rep % 2)) = 1 ]; then run_anchor; run_ours; else run_ours; run_anchor; fi
    trash "$WORK/untarred"; mkdir -p "$WORK/untarred"
    measure "4 file restore" "age -d | tar -x; sync" other "age -d -i '$ID' '$TAR' | tar -x -C '$WORK/untarred' && sync"
    if [ -n "$BASE" ]; then
      trash "$WORK/restored"
      "$PG_BIN_DIR/psql" -X -q -h 127.0.0.1 -p "$restore_PORT" -U postgres -d postgres \
        -c 'DROP DATABASE IF EXISTS immich' >/dev/null
      measure "4 file restore" "immich-backup restore (baseline build)" other "$(base s4 restore latest --target "'$WORK/restored'")"
    fi
  done
  diff -r "$UL/library" "$WORK/restored/library" >/dev/null || { echo "restored files differ!" >&2; exit 1; }
  trash "$WORK/restored" "$WORK/untarred"; empty_trash
fi
# --- 6: reading the whole store back (check --read-data) ----------------------------------------
if has 6; then
  TAR=$WORK/s1.tar.age
  [ -e "$TAR" ] || tar -cf - -C "$UL" library upload profile | age -r "$RCPT" > "$TAR"
  [ -d "$WORK/s1-store/snapshots" ] || { fresh_store s1; bash -c "$(ours s1 backup)" >/dev/null 2>&1; }
  if command -v restic >/dev/null && [ ! -d "$WORK/restic6" ]; then
    restic -q -r "$WORK/restic6" init >/dev/null
    (cd "$UL" && restic -q -r "$WORK/restic6" backup library upload profile >/dev/null)
  fi
  log "scenario 6: check --read-data of the store of scenario 1"
  for rep in $(seq "$REPS"); do
    run_anchor() { measure "6 read-data check" "age -d > /dev/null" anchor "age -d -i '$ID' '$TAR' > /dev/null"; }
    run_ours() { measure "6 read-data check" "immich-backup check --read-data" ours "$(ours s1 check --read-data)"; }
    if [ $((rep % 2)) = 1 ]; then run_anchor; run_ours; else run_ours; run_anchor; fi
    if command -v restic >/dev/null; then
      measure "6 read-data check" "restic check --read-data" other "restic -q -r '$WORK/restic6' check --read-data"
    fi
    measure "6 read-data check" "immich-backup check (identity, no read)" other "$(ours s1 check)"
  done
  [ "$KEEP" = 1 ] || trash "$WORK/restic6"
fi
[ "$KEEP" = 1 ] || { trash "$WORK/s1-store" "$WORK/s1-cache" "$WORK/s1.tar.age"; empty_trash; }

# --- 2: no-change backup of many small files ---------------------------------------------------
if has 2; then
  SM=$WORK/small-$SMALL_FILES
  gen_once "$SM" small --files "$SMALL_FILES"
  config s2 "$SM" "$small_PORT"
  log "scenario 2: no-change backup of $SMALL_FILES small files"
  settle_deletes
  fresh_store s2
  ours_ok s2 backup
  if command -v restic >/dev/null; then
    trash "$WORK/restic2"; restic -q -r "$WORK/restic2" init >/dev/null
    (cd "$SM" && restic -q -r "$WORK/restic2" backup library upload profile >/dev/null)
  fi
  for rep in $(seq "$REPS"); do
    run_anchor() { command -v restic >/dev/null || return 0
      measure "2 no-change backup" "restic (2nd backup)" anchor "cd '$SM' && restic -q -r '$WORK/restic2' backup library upload profile"; }
    run_ours() { measure "2 no-change backup" "immich-backup" ours "$(ours s2 backup)"; }
    if [ $((rep % 2)) = 1 ]; then run_anchor; run_ours; else run_ours; run_anchor; fi
    if [ -n "$BASE" ]; then measure "2 no-change backup" "immich-backup (baseline build)" other "$(base s2 backup)"; fi
  done
  [ "$KEEP" = 1 ] || { trash "$WORK/s2-store" "$WORK/restic2"; empty_trash; }
fi

# --- 3: database dump --------------------------------------------------------------------------
if has 3; then
  start_db big --scale "$SCALE"
  EMPTY=$WORK/empty-upload-location
  mkdir -p "$EMPTY"/{library,upload,profile}
  config s3 "$EMPTY" "$big_PORT"
  DUMPALL="'$PG_BIN_DIR/pg_dumpall' --clean --if-exists -h 127.0.0.1 -p $big_PORT -U postgres"
  bytes=$(eval "$DUMPALL" | wc -c)
  log "scenario 3: database dump ($((bytes / 1048576)) MiB of pg_dumpall output)"
  settle_deletes
  for rep in $(seq "$REPS"); do
    run_anchor() {
      measure "3 database dump" "pg_dumpall > /dev/null" anchor "$DUMPALL > /dev/null"
      measure "3 database dump" "pg_dumpall | gzip" other "$DUMPALL | gzip > /dev/null"; }
    run_ours() { fresh_store s3; measure "3 database dump" "immich-backup (dump only)" ours "$(ours s3 backup)"; }
    if [ $((rep % 2)) = 1 ]; then run_anchor; run_ours; else run_ours; run_anchor; fi
    if [ -n "$BASE" ]; then
      fresh_store s3; measure "3 database dump" "immich-backup (baseline build)" other "$(base s3 backup)"
    fi
  done
  [ "$KEEP" = 1 ] || trash "$WORK/s3-store"; empty_trash
fi

# --- 5: memory ---------------------------------------------------------------------------------
if has 5; then
  BIG=$WORK/big-$BIG_GIB
  gen_once "$BIG" big --gib "$BIG_GIB"
  config s5a "$BIG" "$small_PORT"
  log "scenario 5: one $BIG_GIB GiB file"
  settle_deletes
  fresh_store s5a
  measure "5 memory, ${BIG_GIB} GiB file" "immich-backup backup" ours "$(ours s5a backup)"
  measure "5 memory, ${BIG_GIB} GiB file" "tar | age" anchor "tar -cf - -C '$BIG' library upload profile | age -r $RCPT > /dev/null"
  start_db restore5 --assets 10
  "$PG_BIN_DIR/psql" -X -q -h 127.0.0.1 -p "$restore5_PORT" -U postgres -d postgres -c 'DROP DATABASE immich' >/dev/null
  config s5r "$WORK/restored5" "$restore5_PORT"
  sed -i "s#url = .*#url = \"file://$WORK/s5a-store\"#" "$WORK/s5r.toml"
  trash "$WORK/restored5"
  measure "5 memory, ${BIG_GIB} GiB file" "immich-backup restore" ours "$(ours s5r restore latest --target "'$WORK/restored5'")"
  trash "$WORK/restored5" "$WORK/s5a-store"

  HUGE=$WORK/small-$HUGE_FILES
  gen_once "$HUGE" small --files "$HUGE_FILES"
  config s5b "$HUGE" "$small_PORT"
  log "scenario 5: $HUGE_FILES small files"
  settle_deletes
  fresh_store s5b
  measure "5 memory, $HUGE_FILES files" "immich-backup backup (first)" ours "$(ours s5b backup)"
  measure "5 memory, $HUGE_FILES files" "immich-backup backup (no change)" ours "$(ours s5b backup)"
  "$PG_BIN_DIR/psql" -X -q -h 127.0.0.1 -p "$restore5_PORT" -U postgres -d postgres -c 'DROP DATABASE IF EXISTS immich' >/dev/null
  config s5c "$WORK/restored5" "$restore5_PORT"
  sed -i "s#url = .*#url = \"file://$WORK/s5b-store\"#" "$WORK/s5c.toml"
  measure "5 memory, $HUGE_FILES files" "immich-backup restore" ours "$(ours s5c restore latest --target "'$WORK/restored5'")"
  trash "$WORK/restored5"
  [ "$KEEP" = 1 ] || trash "$WORK/s5b-store"
fi

python3 "$REPO/bench/summarize.py" "$RESULTS" --scale "$SCALE" --reps "$REPS" | tee "$WORK/summary.md"
