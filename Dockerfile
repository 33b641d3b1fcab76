# immich-backup as a sidecar of the Immich compose stack: `immich-backup run` (the agent).
#
#   docker build -t immich-backup .
#
# Build stage: the release binary. Dependencies are built in their own layer, so a source change
# does not rebuild them.
FROM rust:1.95-slim-trixie AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && strip target/release/immich-backup

# Runtime stage: Debian slim with CA certificates (cloud stores, pings), curl (for [hooks] that call
# Immich's API) and the PostgreSQL 17 client tools (pg_dumpall/psql for [database] mode = "local";
# they dump and restore servers 9.2–17, so every Immich Postgres image).
FROM debian:trixie-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl postgresql-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /cache /config
COPY --from=build /src/target/release/immich-backup /usr/local/bin/immich-backup
COPY config.example.toml /usr/share/doc/immich-backup/config.example.toml
ENV IMMICH_BACKUP_CONFIG=/config/immich-backup.toml \
    IMMICH_BACKUP__BACKUP__CACHE_DIR=/cache \
    IMMICH_BACKUP_LOG=immich_backup=info
VOLUME ["/cache"]
EXPOSE 2284
# Healthy when the agent's /healthz answers 200 (needs [agent] listen, e.g. ":2284").
HEALTHCHECK --interval=1m --timeout=10s --start-period=30s CMD ["immich-backup", "health"]
# It runs as root, like the rest of Immich's stack: it must read everything under UPLOAD_LOCATION
# (mounted read-only), write to a local store folder, and reach the Docker socket in docker mode.
# Set `user:` in compose to run it as an account that has exactly those rights.
ENTRYPOINT ["/usr/bin/tini", "--", "immich-backup"]
CMD ["run"]
