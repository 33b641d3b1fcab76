//! Sample data for tests and for the `demo` command: a throwaway PostgreSQL cluster
//! ([`PgCluster`]), an Immich-like database on it ([`create_immich_like_db`]) and an Immich
//! `UPLOAD_LOCATION` folder with awkward files in it ([`create_sample_library`]).
//!
//! Everything here is deterministic: the same arguments give the same rows and the same bytes,
//! so a test can back the data up, restore it elsewhere and compare. The database and the folder
//! agree with each other: asset `n`'s `originalPath` is `/data/` + [`asset_original_path`]`(n)`,
//! and the sample folder holds the files of assets `1..=`[`SAMPLE_ASSET_FILES`] (of all of them
//! with [`create_sample_library_for`]).
//!
//! The database's SQL lives in `src/demo/sql/` (`schema.sql`, then one file per group of rows:
//! `users.sql`, `assets.sql`, `exif.sql`, `albums.sql`, `metadata.sql`, `places.sql`), included at
//! build time; [`create_immich_like_db`] fills in the asset count and the user ids.
//!
//! Nothing here needs a network or a container: the cluster is made with the host's `initdb` and
//! listens on 127.0.0.1 only. When the process runs as root, the server tools run as the
//! `postgres` OS user, because `initdb` refuses to run as root.
//!
//! Failures are [`Error`]s: [`Error::Database`] for the cluster, its tools and the SQL they run,
//! [`Error::Io`] for a local path, [`Error::Other`] for the rest; each message says what was being
//! done and on which path, database or command.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use crate::db::cluster::find_pg_bin_dir;
use crate::db::cluster::{
    check_output, context, set_mode, shell_quote, tail, ServerTools, PG_BIN_ENV,
};
use crate::error::{Error, IoContext, Result};

/// The address every cluster listens on.
pub(crate) const PG_HOST: &str = "127.0.0.1";
/// The cluster's superuser (trust auth, no password).
pub(crate) const PG_SUPERUSER: &str = "postgres";
pub use crate::immich::{GENERATED_FOLDERS, MARKER_FILE, ORIGINAL_FOLDERS};
/// The sample library holds the original files of assets `1..=SAMPLE_ASSET_FILES`.
pub const SAMPLE_ASSET_FILES: usize = 12;
/// Owner (storage label `admin`) of most sample assets.
pub const ADMIN_ID: &str = "5b6d2a3e-0c1f-4a8e-9d3b-7e2f1a0c9b01";
/// Owner (storage label `zoe`) of assets whose number ends in 0.
pub(crate) const ZOE_ID: &str = "5b6d2a3e-0c1f-4a8e-9d3b-7e2f1a0c9b02";
/// Owner (no storage label: upload/ layout) of assets whose number ends in 5.
pub(crate) const KENJI_ID: &str = "5b6d2a3e-0c1f-4a8e-9d3b-7e2f1a0c9b03";

/// How long [`PgCluster::start`] waits for the server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
const READY_POLL: Duration = Duration::from_millis(25);
/// Starts tried on a fresh port when another process took the port first.
const START_ATTEMPTS: u32 = 3;
/// Environment variables that would steer the client tools away from this cluster.
const PG_CLIENT_ENV: [&str; 14] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGTZ",
    "PGDATESTYLE",
    "PGTARGETSESSIONATTRS",
];
/// The earliest mtime in the sample library (2021-01-01T00:00:00Z); each entry gets a later one.
const SAMPLE_MTIME_BASE: i64 = 1_609_459_200;

/// A throwaway PostgreSQL cluster made with initdb, listening on `127.0.0.1:<free port>` with trust
/// auth, superuser `postgres`. Stopped (`pg_ctl stop -m immediate`) and its directory removed on Drop.
pub struct PgCluster {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Directory of the server and client binaries used for this cluster.
    pub bin_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    /// initdb and pg_ctl of `bin_dir`, run as the server user.
    tools: ServerTools,
    running: bool,
    /// Removed when the cluster is dropped (after `Drop::drop` stopped the server).
    _dir: TempDir,
}

impl PgCluster {
    /// initdb + start in a fresh temp dir under `base` (or `std::env::temp_dir()` when None).
    ///
    /// As root, `initdb` and `pg_ctl` run as the `postgres` OS user on a directory it owns; `base`
    /// must then be traversable by that user. Waits until `pg_isready` accepts connections.
    pub fn start(base: Option<&Path>) -> Result<PgCluster> {
        Self::start_with_ports(base, free_port)
    }

    /// [`PgCluster::start`] with the ports to try coming from `pick_port`.
    fn start_with_ports(
        base: Option<&Path>,
        pick_port: impl FnMut() -> Result<u16>,
    ) -> Result<PgCluster> {
        let bin_dir = find_pg_bin_dir().ok_or_else(|| {
            Error::Database(format!(
                "no PostgreSQL server binaries found (set {PG_BIN_ENV})"
            ))
        })?;
        let tools = ServerTools::new(
            bin_dir.clone(),
            &["initdb", "pg_ctl", "pg_isready", "psql", "pg_dump"],
        )?;
        let dir = tools.make_dir(base, "immich-backup-pg-")?;
        let root = dir.path().join("pg");
        let mut cluster = PgCluster {
            port: 0,
            bin_dir,
            data_dir: root.join("data"),
            log_path: root.join("postgres.log"),
            socket_dir: root,
            tools,
            running: false,
            _dir: dir,
        };
        cluster.initdb()?;
        cluster.launch(pick_port)?;
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Run SQL through `psql -X -q -v ON_ERROR_STOP=1 -At` against `db`; return its stdout.
    ///
    /// The SQL goes in on stdin, so it may hold several statements and psql meta-commands.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let mut cmd = self.client_command("psql");
        cmd.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-d",
            db,
            "-f",
            "-",
        ]);
        let out = run_with_input(cmd, sql.as_bytes())
            .map_err(|e| context(e, format!("running psql on database {db:?}")))?;
        check_output(&out, "psql")
            .map_err(|e| context(e, format!("SQL on database {db:?} failed")))?;
        String::from_utf8(out.stdout)
            .map_err(|e| Error::Database(format!("psql printed text that is not UTF-8: {e}")))
    }

    /// A canonical, comparable dump of one database: `pg_dump --no-owner --no-privileges <db>`
    /// with the lines that vary between clusters removed (see [`canonicalize_dump`]).
    pub fn canonical_dump(&self, db: &str) -> Result<String> {
        let mut cmd = self.client_command("pg_dump");
        cmd.args(["--no-owner", "--no-privileges", "-d", db]);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Database(format!("running pg_dump on database {db:?}: {e}")))?;
        check_output(&out, "pg_dump")
            .map_err(|e| context(e, format!("dumping database {db:?}")))?;
        let text = String::from_utf8(out.stdout)
            .map_err(|e| Error::Database(format!("pg_dump printed text that is not UTF-8: {e}")))?;
        Ok(canonicalize_dump(&text))
    }

    /// Stop the server (`pg_ctl stop -m immediate`). Does nothing when it is already stopped.
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        self.tools.stop(&self.data_dir)
    }

    /// The host to connect to (`127.0.0.1`).
    pub fn host(&self) -> &'static str {
        PG_HOST
    }

    /// The superuser to connect as (`postgres`, no password).
    pub fn user(&self) -> &'static str {
        PG_SUPERUSER
    }

    /// A `postgresql://` URL for database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://{PG_SUPERUSER}@{PG_HOST}:{}/{db}", self.port)
    }

    /// The cluster's data directory (removed on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// True between a successful start and [`PgCluster::stop`].
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// A command for client tool `tool` (psql, pg_dump, pg_dumpall, ...) from [`Self::bin_dir`],
    /// already given `-h 127.0.0.1 -p <port> -U postgres`, with `PG*` variables that could point it
    /// elsewhere removed and `PGCLIENTENCODING=UTF8`.
    pub fn client_command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(tool));
        for var in PG_CLIENT_ENV {
            cmd.env_remove(var);
        }
        cmd.env("PGCLIENTENCODING", "UTF8")
            .env("PGCONNECT_TIMEOUT", "10");
        cmd.args([
            "-h",
            PG_HOST,
            "-p",
            &self.port.to_string(),
            "-U",
            PG_SUPERUSER,
        ]);
        cmd
    }

    fn initdb(&self) -> Result<()> {
        self.tools.initdb(&self.data_dir, PG_SUPERUSER)
    }

    /// `pg_ctl start` on a port from `pick_port`; tries again on the next port when a parallel
    /// process took it between our probe and the server's bind.
    fn launch(&mut self, mut pick_port: impl FnMut() -> Result<u16>) -> Result<()> {
        let mut attempt = 1;
        loop {
            self.port = pick_port()?;
            let _ = fs::remove_file(&self.log_path);
            match self.pg_ctl_start() {
                Ok(()) => {
                    self.running = true;
                    return Ok(());
                }
                Err(e) if attempt < START_ATTEMPTS && self.log_says_port_taken() => {
                    tracing::debug!("port {} was taken, retrying: {e:#}", self.port);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let server_opts = format!(
            "-p {} -k {} -c listen_addresses={PG_HOST} -c fsync=off -c full_page_writes=off \
             -c synchronous_commit=off -c timezone=UTC -c log_timezone=UTC",
            self.port,
            shell_quote(&self.socket_dir)?
        );
        self.tools
            .start(&self.data_dir, &self.log_path, &server_opts, READY_TIMEOUT)
            .map_err(|e| {
                let what = format!(
                    "starting PostgreSQL on port {}: {}",
                    self.port,
                    self.log_tail()
                );
                context(e, what)
            })
    }

    fn log_says_port_taken(&self) -> bool {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        log.contains("Address already in use")
            || log.contains("could not create any TCP/IP sockets")
    }

    /// Poll `pg_isready` until the server accepts connections, for at most [`READY_TIMEOUT`].
    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut cmd = self.client_command("pg_isready");
            cmd.args(["-d", "postgres", "-t", "2"]);
            let out = cmd
                .stdin(Stdio::null())
                .output()
                .map_err(|e| Error::Database(format!("running pg_isready: {e}")))?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Database(format!(
                    "PostgreSQL on port {} did not accept connections within {:?}: {}",
                    self.port,
                    READY_TIMEOUT,
                    self.log_tail()
                )));
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// The end of the server log, for error messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        format!(
            "server log {}: {}",
            self.log_path.display(),
            tail(&log, 2000)
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(
                "could not stop PostgreSQL cluster on port {}: {e:#}",
                self.port
            );
        }
    }
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("running", &self.running)
            .finish()
    }
}

/// A port on 127.0.0.1 that nothing listened on a moment ago.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind((PG_HOST, 0))
        .map_err(|e| Error::Other(format!("binding {PG_HOST}:0: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("reading the address bound on {PG_HOST}: {e}")))?;
    Ok(addr.port())
}

/// Run `cmd` with `input` on its stdin (written from another thread, so a chatty child cannot
/// deadlock us) and collect its output.
fn run_with_input(mut cmd: Command, input: &[u8]) -> Result<Output> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_owned();
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Database(format!("starting {program:?}: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Database(format!("{program:?} has no stdin")))?;
    let (written, output) = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input));
        let output = child.wait_with_output();
        (writer.join(), output)
    });
    let output = output.map_err(|e| Error::Database(format!("waiting for {program:?}: {e}")))?;
    match written {
        // A child that failed may close stdin early: its own error says more than EPIPE.
        Ok(Err(e)) if output.status.success() => Err(Error::Database(format!(
            "writing the stdin of {program:?}: {e}"
        ))),
        Err(_) => Err(Error::Database(format!(
            "the thread writing the stdin of {program:?} panicked"
        ))),
        _ => Ok(output),
    }
}

/// Make a plain-text dump comparable across clusters: drop the `\restrict` / `\unrestrict` lines
/// (a random key per dump since PostgreSQL 15.14) and the `-- Started on` / `-- Completed on`
/// timestamp comments, and sort the rows inside each `COPY ... FROM stdin;` block (a table's rows
/// have no order; a restore may store them in another one).
pub fn canonicalize_dump(dump: &str) -> String {
    let mut out = String::with_capacity(dump.len());
    let mut rows: Option<Vec<&str>> = None;
    for line in dump.lines() {
        if let Some(block) = rows.as_mut() {
            if line == "\\." {
                block.sort_unstable();
                push_lines(&mut out, block);
                out.push_str("\\.\n");
                rows = None;
            } else {
                block.push(line);
            }
            continue;
        }
        if is_varying_line(line) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.starts_with("COPY ") && line.ends_with(" FROM stdin;") {
            rows = Some(Vec::new());
        }
    }
    if let Some(block) = rows {
        push_lines(&mut out, &block);
    }
    out
}

fn is_varying_line(line: &str) -> bool {
    line.starts_with("\\restrict ")
        || line.starts_with("\\unrestrict ")
        || line.starts_with("-- Started on ")
        || line.starts_with("-- Completed on ")
}

fn push_lines(out: &mut String, lines: &[&str]) {
    for line in lines {
        out.push_str(line);
        out.push('\n');
    }
}

/// Double-quote an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Build an Immich-like database named `db` (it must not exist yet) on the cluster.
///
/// It has Immich's extensions (uuid-ossp, cube, earthdistance, pg_trgm, unaccent), tables named as
/// in Immich ("user", asset, asset_exif, album, album_asset, kysely_migrations,
/// kysely_migrations_lock, system_metadata, version_history, geodata_places) with foreign keys,
/// uuid keys, enums, jsonb, bytea, arrays, unicode text, a trigger, an identity sequence,
/// `ll_to_earth_public` with its gist index, and a gist index on earthdistance's own
/// `ll_to_earth` (as Immich had before `ll_to_earth_public`): restoring a `pg_dumpall` of this
/// database fails with `type "earth" does not exist` unless the documented search_path fix is
/// applied. `asset_count` assets, one exif row each, 3 users, 4 albums. Deterministic.
pub fn create_immich_like_db(cluster: &PgCluster, db: &str, asset_count: usize) -> Result<()> {
    let create = format!(
        "CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0;",
        quote_ident(db)
    );
    cluster
        .psql("postgres", &create)
        .map_err(|e| context(e, format!("creating database {db:?}")))?;
    cluster
        .psql(db, SCHEMA_SQL)
        .map_err(|e| context(e, format!("creating the schema of {db:?}")))?;
    cluster
        .psql(db, &data_sql(asset_count))
        .map_err(|e| context(e, format!("filling {db:?} with {asset_count} assets")))?;
    Ok(())
}

/// Where asset `n` (1-based) of [`create_immich_like_db`] lives, relative to `UPLOAD_LOCATION`;
/// its `originalPath` is `/data/` followed by this. Assets ending in 0 belong to `zoe`, in 5 to
/// `kenji` (upload/ layout), the rest to `admin`; every 20th from 7 on is a video; assets
/// 1-1000 are from 2024, 1001-2000 from 2023, and so on.
pub fn asset_original_path(n: usize) -> String {
    let video = n % 20 == 7;
    let ext = if video { "mp4" } else { "jpg" };
    let year = 2024 - (n.max(1) - 1) / 1000;
    match n % 10 {
        5 => format!(
            "upload/{KENJI_ID}/{:02x}/{:02x}/{n:08}.{ext}",
            n % 256,
            (n / 256) % 256
        ),
        0 => format!("library/zoe/{year}/IMG_{n:04}.{ext}"),
        _ if video => format!("library/admin/{year}/VID_{n:04}.{ext}"),
        _ => format!("library/admin/{year}/IMG_{n:04}.{ext}"),
    }
}

/// Extensions, functions, enums, tables, indexes and the trigger, in one transaction.
const SCHEMA_SQL: &str = include_str!("sql/schema.sql");

/// The rows: users, assets, exif, albums, Immich's bookkeeping tables, places.
fn data_sql(asset_count: usize) -> String {
    let body = [
        USERS_SQL,
        ASSETS_SQL,
        EXIF_SQL,
        ALBUMS_SQL,
        METADATA_SQL,
        PLACES_SQL,
    ]
    .concat();
    format!("BEGIN;\n{body}COMMIT;\n")
        .replace("@N@", &asset_count.to_string())
        .replace("@ADMIN@", ADMIN_ID)
        .replace("@ZOE@", ZOE_ID)
        .replace("@KENJI@", KENJI_ID)
}

// The rows, in the order `data_sql` runs them; `@N@`, `@ADMIN@`, `@ZOE@` and `@KENJI@` are
// placeholders it fills in.
const USERS_SQL: &str = include_str!("sql/users.sql");

/// Keep the path expression in step with [`asset_original_path`].
const ASSETS_SQL: &str = include_str!("sql/assets.sql");

const EXIF_SQL: &str = include_str!("sql/exif.sql");

const ALBUMS_SQL: &str = include_str!("sql/albums.sql");

const METADATA_SQL: &str = include_str!("sql/metadata.sql");

const PLACES_SQL: &str = include_str!("sql/places.sql");

/// What [`create_sample_library`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SampleLibrary {
    /// Regular files in all six folders (markers included; symlinks not).
    pub files: usize,
    /// Bytes in those files.
    pub bytes: u64,
    /// Regular files under the original folders (library, upload, profile): what a backup takes.
    pub original_files: usize,
    /// Bytes in those files.
    pub original_bytes: u64,
    /// Symbolic links (all under library/).
    pub symlinks: usize,
}

/// Write a sample `UPLOAD_LOCATION` at `root` (created if missing; should be empty).
///
/// - `library/`, `upload/`, `profile/` (originals) and `thumbs/`, `encoded-video/`, `backups/`
///   (generated, with content a backup must skip), each with its `.immich` marker;
/// - the files of assets `1..=`[`SAMPLE_ASSET_FILES`] at [`asset_original_path`];
/// - `library/admin/Été 2024/café ☕.jpg`, a zero-byte file, files of 200 KiB, 1.3 MiB and 9 MiB
///   of incompressible bytes, two files with the same content, a relative symlink
///   (`library/admin/2024/latest.jpg` -> `IMG_0001.jpg`), a 0600 file (the admin's avatar) and a
///   0755 one (`library/admin/2024/IMG_0003.jpg`);
/// - distinct past mtimes (whole seconds from 2021 on) on every file, link and folder.
///
/// Deterministic: the same call writes the same names, bytes, modes and mtimes.
pub fn create_sample_library(root: &Path) -> Result<SampleLibrary> {
    create_sample_library_for(root, SAMPLE_ASSET_FILES)
}

/// [`create_sample_library`], plus the original files of assets `SAMPLE_ASSET_FILES + 1..=assets`:
/// then every asset row of [`create_immich_like_db`]`(…, assets)` has its file in the library, as
/// in a real Immich, and a backup finds nothing missing.
pub fn create_sample_library_for(root: &Path, assets: usize) -> Result<SampleLibrary> {
    let mut w = LibraryWriter::new(root)?;
    write_sample(&mut w)?;
    for n in SAMPLE_ASSET_FILES + 1..=assets {
        w.file(&asset_original_path(n), &asset_file_bytes(n), 0o644)?;
    }
    w.finish()
}

fn write_sample(w: &mut LibraryWriter) -> Result<()> {
    for folder in ORIGINAL_FOLDERS.iter().chain(GENERATED_FOLDERS.iter()) {
        w.file(
            &format!("{folder}/{MARKER_FILE}"),
            marker_text(folder).as_bytes(),
            0o644,
        )?;
    }
    write_asset_files(w)?;
    write_odd_files(w)?;
    write_generated_files(w)
}

/// Add one photo of `size` pseudo-random bytes (seeded by `seed`) at `rel` under `root`,
/// creating its folders and replacing a file already there; returns its path.
pub fn add_photo(root: &Path, rel: &str, size: usize, seed: u64) -> Result<PathBuf> {
    let path = root.join(checked_relative(rel)?);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).at(parent)?;
    }
    fs::write(&path, photo_bytes(seed, size)).at(&path)?;
    Ok(path)
}

/// Pseudo-random, incompressible bytes that start like a JPEG (when `len` >= 4).
pub fn photo_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = pseudo_random_bytes(seed, len);
    let header = [0xFF, 0xD8, 0xFF, 0xE0];
    let n = header.len().min(len);
    bytes[..n].copy_from_slice(&header[..n]);
    bytes
}

/// `len` bytes of SplitMix64 output from `seed`: fixed forever, whatever crate versions change.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The content of asset `n`'s original file in the sample library (3 to 23 KB).
pub fn asset_file_bytes(n: usize) -> Vec<u8> {
    photo_bytes(n as u64, 3_000 + (n * 7_919) % 20_000)
}

fn marker_text(folder: &str) -> String {
    format!("immich storage folder: {folder}\n")
}

fn write_asset_files(w: &mut LibraryWriter) -> Result<()> {
    for n in 1..=SAMPLE_ASSET_FILES {
        let mode = if n == 3 { 0o755 } else { 0o644 };
        w.file(&asset_original_path(n), &asset_file_bytes(n), mode)?;
    }
    Ok(())
}

fn write_odd_files(w: &mut LibraryWriter) -> Result<()> {
    w.file(
        "library/admin/Été 2024/café ☕.jpg",
        &photo_bytes(101, 40 * 1024),
        0o644,
    )?;
    w.file("library/admin/2024/empty.jpg", b"", 0o644)?;
    w.file(
        "library/admin/2023/PANO_0001.jpg",
        &photo_bytes(102, 200 * 1024),
        0o644,
    )?;
    w.file(
        "library/admin/2023/VID_0002.mp4",
        &pseudo_random_bytes(103, 1_363_149),
        0o644,
    )?;
    w.file(
        "library/admin/2022/VID_0003.mov",
        &pseudo_random_bytes(104, 9 << 20),
        0o644,
    )?;
    // Same bytes as asset 1, at another path.
    w.file(
        "library/zoe/shared with zoë/IMG_0001.jpg",
        &asset_file_bytes(1),
        0o644,
    )?;
    w.symlink("library/admin/2024/latest.jpg", "IMG_0001.jpg")?;
    let avatar = format!("profile/{ADMIN_ID}/avatar.jpg");
    w.file(&avatar, &photo_bytes(105, 5_000), 0o600)?;
    w.file(
        &format!("upload/{KENJI_ID}/.hidden notes.txt"),
        "メモ: 休暇\n".as_bytes(),
        0o644,
    )
}

fn write_generated_files(w: &mut LibraryWriter) -> Result<()> {
    for n in 1..=4u64 {
        let id = format!("{ADMIN_ID}/00/{n:02}/asset-{n}");
        w.file(
            &format!("thumbs/{id}-thumbnail.webp"),
            &pseudo_random_bytes(200 + n, 3_000),
            0o644,
        )?;
        w.file(
            &format!("thumbs/{id}-preview.jpeg"),
            &photo_bytes(300 + n, 30_000),
            0o644,
        )?;
    }
    let video = format!("encoded-video/{ADMIN_ID}/00/07/asset-7.mp4");
    w.file(&video, &pseudo_random_bytes(400, 100 * 1024), 0o644)?;
    let mut dump = vec![0x1f, 0x8b, 0x08, 0x00];
    dump.extend(pseudo_random_bytes(500, 20_000));
    w.file(
        "backups/immich-db-backup-20250601T020000-v1.135.3-pg15.18.sql.gz",
        &dump,
        0o644,
    )
}

/// `rel` as a path that stays under the root: relative, no `..`, not empty.
fn checked_relative(rel: &str) -> Result<&Path> {
    let path = Path::new(rel);
    let normal = path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if rel.is_empty() || !normal {
        return Err(Error::Other(format!(
            "{rel:?} is not a relative path below the library root"
        )));
    }
    Ok(path)
}

/// Writes the sample tree, counts what it wrote and gives everything a distinct fixed mtime.
struct LibraryWriter {
    root: PathBuf,
    stats: SampleLibrary,
    /// Files and links in creation order; their mtimes are set by `finish`.
    entries: Vec<PathBuf>,
    dirs: std::collections::BTreeSet<PathBuf>,
}

impl LibraryWriter {
    fn new(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).at(root)?;
        let dirs = Default::default();
        Ok(Self {
            root: root.to_path_buf(),
            stats: SampleLibrary::default(),
            entries: vec![],
            dirs,
        })
    }

    fn file(&mut self, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let path = self.prepare(rel)?;
        fs::write(&path, bytes).at(&path)?;
        set_mode(&path, mode)?;
        self.stats.files += 1;
        self.stats.bytes += bytes.len() as u64;
        if ORIGINAL_FOLDERS
            .iter()
            .any(|f| rel.starts_with(&format!("{f}/")))
        {
            self.stats.original_files += 1;
            self.stats.original_bytes += bytes.len() as u64;
        }
        self.entries.push(path);
        Ok(())
    }

    fn symlink(&mut self, rel: &str, target: &str) -> Result<()> {
        let path = self.prepare(rel)?;
        std::os::unix::fs::symlink(target, &path)
            .map_err(|e| Error::Other(format!("symlink {} -> {target}: {e}", path.display())))?;
        self.stats.symlinks += 1;
        self.entries.push(path);
        Ok(())
    }

    /// Create the parents of `rel` (mode 0755) and return its full path.
    fn prepare(&mut self, rel: &str) -> Result<PathBuf> {
        let rel = checked_relative(rel)?;
        let mut dir = self.root.clone();
        for part in rel.parent().into_iter().flat_map(Path::components) {
            dir.push(part);
            if self.dirs.insert(dir.clone()) {
                fs::create_dir_all(&dir).at(&dir)?;
                set_mode(&dir, 0o755)?;
            }
        }
        Ok(self.root.join(rel))
    }

    /// Set the mtimes (files first, then folders deepest first, so writing a child does not
    /// bump a parent afterwards) and return the counts.
    fn finish(self) -> Result<SampleLibrary> {
        let dirs_deepest_first = self.dirs.iter().rev();
        for (i, path) in self.entries.iter().chain(dirs_deepest_first).enumerate() {
            let when = SAMPLE_MTIME_BASE + i as i64 * 90_061;
            set_mtime_nofollow(path, when)?;
        }
        Ok(self.stats)
    }
}

/// Set atime and mtime of `path` (not of what a symlink points to) to `secs` since the epoch.
fn set_mtime_nofollow(path: &Path, secs: i64) -> Result<()> {
    let c_path = path_to_cstring(path)?;
    let time = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: c_path is a NUL-terminated string and `times` holds the two timespecs utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Other(format!(
            "setting the mtime of {}: {e}",
            path.display()
        )));
    }
    Ok(())
}

fn path_to_cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Other(format!("path contains NUL: {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_moves_on_when_the_port_is_taken() {
        let taken = std::net::TcpListener::bind((PG_HOST, 0)).unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut picks = 0;
        let cluster = PgCluster::start_with_ports(None, || {
            picks += 1;
            if picks == 1 {
                Ok(taken_port)
            } else {
                free_port()
            }
        })
        .unwrap();
        assert_eq!(picks, 2);
        assert_ne!(cluster.port, taken_port);
        assert_eq!(cluster.psql("postgres", "select 42").unwrap(), "42\n");
    }
}
