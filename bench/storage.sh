#!/usr/bin/env bash
# Storage benchmark: back up the same sample Immich library to a local folder store and to a local
# S3 server (s3s-fs, SigV4, http on 127.0.0.1), first run and unchanged re-run, next to a plain
# `tar | age` of the same originals; prints seconds, MiB/s and peak memory of each.
#
#   bash bench/storage.sh [SIZE_MB=512] [CONCURRENCY=8]
#
# Needs the PostgreSQL server binaries (as for `immich-backup demo`), `age` and GNU `time`
# (installed from Debian when missing and running as root). Builds in release mode into $CARGO_TARGET_DIR (default
# target/). Everything it makes lives in a temporary folder that is removed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MB=${1:-512}
CONCURRENCY=${2:-8}

# age for the reference pipeline, GNU time for peak memory.
if ! command -v age >/dev/null || [[ ! -x /usr/bin/time ]]; then
    if [[ $(id -u) -eq 0 ]]; then
        echo "bench: installing age and time from Debian" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq age time </dev/null
    else
        echo "bench: needs age and GNU time (apt-get install age time)" >&2
        exit 1
    fi
fi

echo "bench: building (release)" >&2
cargo build --release --quiet --bin immich-backup --example bench_storage
TARGET=${CARGO_TARGET_DIR:-target}
exec "$TARGET/release/examples/bench_storage" "$TARGET/release/immich-backup" "$SIZE_MB" "$CONCURRENCY"
