//! Restore: store → decrypt → decompress → sink, onto a fresh install, from the config and the
//! identity alone.
//!
//! Nothing is written until every check has passed: the snapshot decrypts, the target database holds
//! no tables, the target server can take the dump, the target folders hold nothing that differs from the
//! snapshot, and the dump object verifies against the manifest. Files are written as unnamed files
//! (or under a hidden temporary name), verified against their content address, and only then given
//! their name, so an interrupted restore leaves nothing that looks restored; running it again
//! resumes (identical files are kept).

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flate2::read::GzDecoder;
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

use crate::collect::walk_order;
use crate::crypto::{read_error, Identities};
use crate::db::{self, Database, ReplayRun};
use crate::directio::{self, DirectWriter, NewFiles};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::snapshot::{self, ContentId, Entry, EntryKind, Manifest};
use crate::store::Store;
use crate::trust::{self, Trust};

/// The folders Immich expects under UPLOAD_LOCATION, each with a `.immich` marker.
pub const IMMICH_FOLDERS: [&str; 6] = [
    "library",
    "upload",
    "profile",
    "thumbs",
    "encoded-video",
    "backups",
];

/// What to restore and how.
pub struct RestoreOptions {
    /// `latest`, an id, or a unique id prefix.
    pub snapshot: String,
    /// Check everything, print the plan, write nothing.
    pub dry_run: bool,
    /// Where the files go (UPLOAD_LOCATION of the new install).
    pub target: PathBuf,
    pub concurrency: usize,
    pub progress: Progress,
    /// Which snapshots to believe (signed by a trusted key, or unsigned with `--allow-unsigned`).
    pub trust: Trust,
    /// Restore setuid, setgid and sticky bits as recorded (`--keep-special-modes`); by default
    /// modes are masked to the permission bits, which is all Immich needs.
    pub keep_special_modes: bool,
}

/// One table's rows: in the snapshot, and in the restored database.
#[derive(Debug, Clone, Serialize)]
pub struct RowCheck {
    pub table: String,
    pub expected: Option<u64>,
    pub actual: Option<u64>,
}

/// What restore did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Serialize, Default)]
pub struct RestoreReport {
    pub snapshot: String,
    /// The verification key of the snapshot's trusted signature; `None`: unsigned (`--allow-unsigned`).
    pub signed_by: Option<String>,
    pub dry_run: bool,
    pub snapshot_time: String,
    pub source_host: String,
    pub target: String,
    pub database: String,
    pub server_version: String,
    pub files: u64,
    pub bytes: u64,
    pub files_restored: u64,
    pub files_already_present: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// psql errors that a `pg_dumpall --clean` replay always produces (documented in the README).
    pub benign_psql_errors: Vec<String>,
    pub row_checks: Vec<RowCheck>,
    pub rows_match: bool,
    pub duration_secs: f64,
}

/// Read and decrypt a snapshot's manifest, without checking its signature (tests and tools; a
/// restore goes through [`crate::trust`]).
pub async fn read_manifest(store: &Store, identities: &Identities, id: &str) -> Result<Manifest> {
    let key = snapshot::snapshot_key(id, snapshot::MANIFEST_OBJECT);
    let sealed = store.get_bytes(&key).await?;
    let mut plain = Vec::new();
    identities
        .decrypt(&sealed[..], &key)?
        .read_to_end(&mut plain)
        .map_err(|e| read_error(&key, e))?;
    serde_json::from_slice(&plain).map_err(|e| Error::Corrupt {
        object: key,
        message: e.to_string(),
    })
}

/// What restore does about a running Immich server container (Docker mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerPolicy {
    /// Refuse while it runs.
    #[default]
    Refuse,
    /// Stop it before anything is written and start it again at the end (`--stop-server`).
    StopAndRestart,
}

/// Run a restore; refuses while the Immich server container runs.
pub async fn run(
    db: &dyn Database,
    store: &Store,
    identities: Arc<Identities>,
    opts: RestoreOptions,
) -> Result<RestoreReport> {
    run_with(db, store, identities, opts, ServerPolicy::Refuse).await
}

/// Run a restore as Immich's docs orchestrate it: the server container must not run (or, with
/// [`ServerPolicy::StopAndRestart`], is stopped first and started again at the end). When the
/// restore fails after it began writing, the server is left stopped: the install needs recreating.
pub async fn run_with(
    db: &dyn Database,
    store: &Store,
    identities: Arc<Identities>,
    opts: RestoreOptions,
    server: ServerPolicy,
) -> Result<RestoreReport> {
    let stopped = match db.running_server().await? {
        None => None,
        Some(name) if server == ServerPolicy::Refuse => {
            return Err(Error::NotFresh {
                reason: format!("the Immich server container {name} is running; it would migrate and write to the database while the dump is replayed"),
                remedy: format!("Stop it first (`docker stop {name}`), or pass --stop-server to have restore stop it and start it again at the end"),
            });
        }
        Some(name) if opts.dry_run => {
            tracing::info!(server = %name, "dry run: the server container would be stopped");
            None
        }
        Some(name) => {
            tracing::info!(server = %name, "stopping the Immich server container");
            db.set_server_running(false).await?;
            Some(name)
        }
    };
    let mut writing = false;
    let result = restore(db, store, identities, opts, &mut writing).await;
    let Some(name) = stopped else {
        return result;
    };
    if result.is_err() && writing {
        tracing::warn!(server = %name, "the restore failed after it began writing, so the Immich server container stays stopped; recreate the database and restore again, or start it with `docker start {name}`");
        return result;
    }
    tracing::info!(server = %name, "starting the Immich server container again");
    match (db.set_server_running(true).await, result) {
        (Ok(()), r) => r,
        (Err(e), Ok(_)) => Err(Error::Docker(format!(
            "the restore finished, but starting {name} again failed ({e}); start it with `docker start {name}`"
        ))),
        (Err(e), Err(first)) => {
            tracing::warn!("could not start {name} again: {e}");
            Err(first)
        }
    }
}

async fn restore(
    db: &dyn Database,
    store: &Store,
    identities: Arc<Identities>,
    opts: RestoreOptions,
    writing: &mut bool,
) -> Result<RestoreReport> {
    let started = Instant::now();
    snapshot::require_marker(store).await?;
    let opened = trust::resolve(store, &identities, &opts.trust, &opts.snapshot).await?;
    let (id, manifest) = (opened.id, opened.manifest);
    let key = parse_key(&manifest)?;
    let mut report = RestoreReport {
        snapshot: id.clone(),
        signed_by: opened.signed_by.map(|k| k.to_string()),
        dry_run: opts.dry_run,
        snapshot_time: manifest.time.to_rfc3339(),
        source_host: manifest.host.clone(),
        target: opts.target.display().to_string(),
        database: manifest.database.database.clone(),
        files: manifest.totals.files,
        bytes: manifest.totals.bytes,
        dirs: manifest.totals.dirs,
        symlinks: manifest.totals.symlinks,
        ..Default::default()
    };
    tracing::info!(snapshot = %id, target = %opts.target.display(), database = db.describe(), "restore: checking the target");

    // Checks, side by side, before anything is written; the database's verdict is told first.
    if db.ready_waits() {
        db.wait_ready().await?;
    }
    let (version, present, dump_ok) = tokio::join!(
        check_database(db, &manifest),
        check_files(store, &identities, &manifest, &key, &opts.target),
        verify_dump(store, &identities, &manifest)
    );
    report.server_version = version?;
    let present = present?;
    dump_ok?;
    report.files_already_present = present.len() as u64;
    if opts.dry_run {
        report.duration_secs = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    // The database and the files, side by side (psql works while the files are decrypted). Both
    // run to the end even when one fails, so neither is cut off half-way.
    *writing = true;
    opts.progress.phase(
        "restoring",
        Some(manifest.dump.size + manifest.totals.bytes),
    );
    // The rows are counted as soon as the dump is in, while files may still be written.
    let database = async {
        let benign = replay_dump(db, store, &identities, &manifest, &opts.progress).await?;
        Ok::<_, Error>((benign, compare_rows(db, &manifest).await?))
    };
    let (replayed, restored) = tokio::join!(
        database,
        restore_files(store, identities.clone(), &manifest, key, &opts, present)
    );
    let (benign, row_checks) = replayed?;
    report.benign_psql_errors = benign;
    report.files_restored = restored?;
    create_immich_folders(&opts.target)?;
    opts.progress.finish();

    report.row_checks = row_checks;
    report.rows_match = report.row_checks.iter().all(|r| r.expected == r.actual);
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

fn parse_key(manifest: &Manifest) -> Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(&manifest.content_key, &mut key).map_err(|e| Error::Corrupt {
        object: snapshot::snapshot_key(&manifest.id, snapshot::MANIFEST_OBJECT),
        message: format!("bad content key: {e}"),
    })?;
    Ok(key)
}

/// The target database must hold no tables, and the server must be able to take the dump. For a
/// local server this is also the check that it answers.
async fn check_database(db: &dyn Database, manifest: &Manifest) -> Result<String> {
    let name = &manifest.database.database;
    let survey = db::survey(db, name).await?;
    let tables = if survey.database_exists {
        db::existing_tables(db, name).await?
    } else {
        Vec::new()
    };
    if !tables.is_empty() {
        let shown: Vec<&str> = tables.iter().take(6).map(String::as_str).collect();
        return Err(Error::NotFresh {
            reason: format!("database {name} already holds {} tables ({}{})", tables.len(), shown.join(", "), if tables.len() > 6 { ", …" } else { "" }),
            remedy: "Restore only into a fresh install: stop Immich, recreate its database (e.g. `docker compose down -v`, then `docker compose create` and start only the database), and run restore again".into(),
        });
    }
    let (version, num) = (survey.version, survey.version_num);
    let (want, have) = (manifest.database.server_version_num / 10000, num / 10000);
    if have < want {
        return Err(Error::Database(format!(
            "the target server is PostgreSQL {version} but the snapshot comes from {}; use a Postgres image of major version {want} or newer",
            manifest.database.server_version
        )));
    }
    let available: HashSet<String> = survey.available_extensions.into_iter().collect();
    if let Some(missing) = manifest
        .database
        .extensions
        .iter()
        .find(|e| !available.contains(&e.name))
    {
        let taken_with = manifest
            .database
            .image
            .as_deref()
            .map(|i| format!("the image the snapshot was taken with, {i}, or on "))
            .unwrap_or_default();
        return Err(Error::Database(format!(
            "the target server lacks extension {} (version {} in the snapshot), so the dump cannot be replayed; nothing was written. Run the target database on {taken_with}Immich's Postgres image, which has it (ghcr.io/immich-app/postgres:{want}-vectorchord0.4.3-pgvectors0.2.0, as Immich's docker-compose.yml names it)",
            missing.name,
            missing.version,
            want = want.max(14),
        )));
    }
    Ok(version)
}

/// A snapshot path made safe: relative, plain components, first one an originals folder.
fn safe_path(target: &Path, manifest: &Manifest, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    let ok = !rel.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && p.components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .is_some_and(|f| manifest.folders.iter().any(|m| m == f));
    if !ok {
        return Err(Error::Corrupt {
            object: snapshot::snapshot_key(&manifest.id, snapshot::FILES_OBJECT),
            message: format!(
                "unsafe path {rel:?} in the file list; refusing to write outside the target"
            ),
        });
    }
    Ok(target.join(p))
}

/// Stream the decrypted file list through `f`, in order. Runs on a blocking thread.
fn for_each_entry(
    reader: impl Read,
    identities: &Identities,
    manifest: &Manifest,
    mut f: impl FnMut(Entry) -> Result<()>,
) -> Result<()> {
    let key = &manifest.files.key;
    let hashing = HashingReader::new(identities.decrypt_pinned(
        reader,
        key,
        manifest.files.header_mac.as_deref(),
    )?);
    let mut gz = BufReader::new(GzDecoder::new(hashing));
    let mut line = String::new();
    loop {
        line.clear();
        if gz.read_line(&mut line).map_err(|e| read_error(key, e))? == 0 {
            break;
        }
        let entry: Entry = serde_json::from_str(&line).map_err(|e| Error::Corrupt {
            object: key.clone(),
            message: e.to_string(),
        })?;
        f(entry)?;
    }
    let hashing = gz.into_inner().into_inner();
    if hashing.finish() != manifest.files.sha256 {
        return Err(Error::Corrupt {
            object: key.clone(),
            message: "does not match the manifest's SHA-256".into(),
        });
    }
    Ok(())
}

/// Walk the file list on a blocking thread, calling `f` for each entry.
async fn scan_list<T: Send + 'static>(
    store: &Store,
    identities: &Arc<Identities>,
    manifest: &Manifest,
    state: T,
    f: impl FnMut(&mut T, Entry) -> Result<()> + Send + 'static,
) -> Result<T> {
    let reader = store.reader(&manifest.files.key).await?;
    let identities = identities.clone();
    let manifest = manifest.clone();
    let mut f = f;
    tokio::task::spawn_blocking(move || {
        let mut state = state;
        for_each_entry(reader, &identities, &manifest, |e| f(&mut state, e))?;
        Ok(state)
    })
    .await
    .map_err(|e| Error::Other(format!("file list reader: {e}")))?
}

/// Refuse when the target folders hold anything that differs from the snapshot. Returns the paths that
/// already hold exactly the snapshot's content (an interrupted restore being resumed).
async fn check_files(
    store: &Store,
    identities: &Arc<Identities>,
    manifest: &Manifest,
    key: &[u8; 32],
    target: &Path,
) -> Result<HashSet<String>> {
    let extras = extra_paths(store, identities, manifest, target).await?;
    if let Some(first) = extras.first() {
        return Err(not_fresh_files(format!(
            "{} holds {} path(s) that are not in the snapshot (first: {first})",
            target.display(),
            extras.len()
        )));
    }
    let shown = target.display().to_string();
    let target = target.to_path_buf();
    let key = *key;
    let m = manifest.clone();
    let (present, differing) = scan_list(
        store,
        identities,
        manifest,
        (HashSet::new(), Vec::new()),
        move |(present, differing): &mut (HashSet<String>, Vec<String>), e| {
            let dest = safe_path(&target, &m, &e.path)?;
            match compare_existing(&dest, &e, &key) {
                Existing::Absent => {}
                Existing::Same => {
                    if e.kind == EntryKind::File {
                        present.insert(e.path);
                    }
                }
                Existing::Different => differing.push(e.path),
            }
            Ok(())
        },
    )
    .await?;
    if let Some(first) = differing.first() {
        return Err(not_fresh_files(format!(
            "{shown} already holds {} file(s) that differ from the snapshot (first: {first})",
            differing.len()
        )));
    }
    Ok(present)
}

fn not_fresh_files(reason: String) -> Error {
    Error::NotFresh {
        reason,
        remedy: "Restore into an empty UPLOAD_LOCATION (move the existing files away first); files identical to the snapshot's are kept".into(),
    }
}

enum Existing {
    Absent,
    Same,
    Different,
}

fn compare_existing(dest: &Path, e: &Entry, key: &[u8; 32]) -> Existing {
    let Ok(meta) = std::fs::symlink_metadata(dest) else {
        return Existing::Absent;
    };
    let same = match e.kind {
        EntryKind::Dir => meta.is_dir(),
        EntryKind::Symlink => {
            meta.file_type().is_symlink()
                && std::fs::read_link(dest)
                    .ok()
                    .and_then(|t| t.to_str().map(str::to_string))
                    == e.target
        }
        EntryKind::File => {
            meta.is_file()
                && meta.len() == e.size
                && File::open(dest)
                    .and_then(|mut f| {
                        let mut h = blake3::Hasher::new_keyed(key);
                        io::copy(&mut f, &mut h)?;
                        Ok(ContentId(*h.finalize().as_bytes()))
                    })
                    .ok()
                    == e.content
        }
    };
    if same {
        Existing::Same
    } else {
        Existing::Different
    }
}

/// Paths under the target's originals folders that the snapshot does not have (merge-join of two
/// sorted walks). Immich's `.immich` markers do not count.
async fn extra_paths(
    store: &Store,
    identities: &Arc<Identities>,
    manifest: &Manifest,
    target: &Path,
) -> Result<Vec<String>> {
    let (tx, mut rx) = mpsc::channel::<String>(1024);
    let root = target.to_path_buf();
    let mut folders = manifest.folders.clone();
    folders.sort();
    tokio::task::spawn_blocking(move || {
        for f in folders {
            for e in walkdir::WalkDir::new(root.join(&f))
                .follow_links(false)
                .sort_by_file_name()
                .into_iter()
                .flatten()
            {
                let rel = e
                    .path()
                    .strip_prefix(&root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if tx.blocking_send(rel).is_err() {
                    return;
                }
            }
        }
    });
    let mut existing = Vec::new();
    // The target walk is usually empty or small; collecting it keeps the merge simple.
    while let Some(p) = rx.recv().await {
        existing.push(p);
    }
    let extras = scan_list(
        store,
        identities,
        manifest,
        (existing, 0usize, Vec::new()),
        |(existing, i, extras): &mut (Vec<String>, usize, Vec<String>), e| {
            while *i < existing.len() && walk_order(&existing[*i], &e.path).is_lt() {
                extras.push(existing[*i].clone());
                *i += 1;
            }
            if *i < existing.len() && existing[*i] == e.path {
                *i += 1;
            }
            Ok(())
        },
    )
    .await?;
    let (existing, i, mut extras) = extras;
    extras.extend(existing[i..].iter().cloned());
    let is_folder_or_marker = |p: &String| {
        let path = Path::new(p);
        path.components().count() == 1
            || (path.file_name().is_some_and(|n| n == ".immich") && path.components().count() == 2)
    };
    extras.retain(|p| !is_folder_or_marker(p));
    Ok(extras)
}

/// Download and decrypt the dump once, checking it against the manifest, before the database is touched.
async fn verify_dump(
    store: &Store,
    identities: &Arc<Identities>,
    manifest: &Manifest,
) -> Result<()> {
    let reader = store.reader(&manifest.dump.key).await?;
    let identities = identities.clone();
    let want = manifest.dump.clone();
    tokio::task::spawn_blocking(move || {
        let mut plain = HashingReader::new(identities.decrypt_pinned(
            reader,
            &want.key,
            want.header_mac.as_deref(),
        )?);
        io::copy(&mut plain, &mut io::sink()).map_err(|e| read_error(&want.key, e))?;
        let (len, sha) = (plain.len, plain.finish());
        if len != want.size || sha != want.sha256 {
            return Err(Error::Corrupt {
                object: want.key.clone(),
                message: "does not match the manifest's size and SHA-256".into(),
            });
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Other(format!("dump check: {e}")))?
}

/// The line Immich's docs rewrite, and what it becomes (fixes `type "earth" does not exist`).
pub const SEARCH_PATH_LINE: &str = "SELECT pg_catalog.set_config('search_path', '', false);";
pub const SEARCH_PATH_FIX: &str =
    "SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);";

/// Errors that replaying `pg_dumpall --clean --if-exists` output into a fresh install always
/// produces, because the restoring role already exists (documented in the README).
pub fn is_benign_psql_error(message: &str, username: &str) -> bool {
    message.contains("current user cannot be dropped")
        || message.contains(&format!("role \"{username}\" already exists"))
        || message.contains("invalid command \\restrict")
        || message.contains("invalid command \\unrestrict")
}

/// Replay the dump through psql; fails on any error that is not a known benign one.
async fn replay_dump(
    db: &dyn Database,
    store: &Store,
    identities: &Arc<Identities>,
    manifest: &Manifest,
    progress: &Progress,
) -> Result<Vec<String>> {
    tracing::info!(database = db.describe(), "replaying the dump");
    let reader = store.reader(&manifest.dump.key).await?;
    let ReplayRun { stdin, done } = db.replay().await?;
    let identities = identities.clone();
    let key = manifest.dump.key.clone();
    let pin = manifest.dump.header_mac.clone();
    let p = progress.clone();
    let feed = tokio::task::spawn_blocking(move || -> Result<()> {
        let plain = identities.decrypt_pinned(reader, &key, pin.as_deref())?;
        let mut sql = BufReader::with_capacity(
            256 * 1024,
            GzDecoder::new(CountingReader {
                inner: plain,
                progress: p,
            }),
        );
        let mut out = io::BufWriter::with_capacity(256 * 1024, SyncIoBridge::new(stdin));
        let mut line = Vec::new();
        loop {
            line.clear();
            if sql
                .read_until(b'\n', &mut line)
                .map_err(|e| read_error(&key, e))?
                == 0
            {
                break;
            }
            let fixed = if line.starts_with(SEARCH_PATH_LINE.as_bytes())
                && line.trim_ascii_end() == SEARCH_PATH_LINE.as_bytes()
            {
                let mut l = SEARCH_PATH_FIX.as_bytes().to_vec();
                l.push(b'\n');
                l
            } else {
                std::mem::take(&mut line)
            };
            if let Err(e) = out.write_all(&fixed) {
                return Err(Error::Database(format!(
                    "psql stopped reading the dump: {e}"
                )));
            }
        }
        out.flush()
            .map_err(|e| Error::Database(format!("psql stopped reading the dump: {e}")))?;
        let mut bridge = out
            .into_inner()
            .map_err(|e| Error::Database(e.to_string()))?;
        bridge
            .shutdown()
            .map_err(|e| Error::Database(e.to_string()))?;
        Ok(())
    });
    let (fed, output) = tokio::join!(feed, done);
    let output = output?;
    let fed = fed.map_err(|e| Error::Other(format!("dump feeder: {e}")))?;
    let (benign, fatal) = classify_psql_errors(&output.stderr, &manifest.database.username);
    fed?;
    if !fatal.is_empty() || !output.success {
        let first = fatal
            .first()
            .cloned()
            .unwrap_or_else(|| output.stderr.trim().to_string());
        return Err(Error::Database(format!(
            "replaying the dump failed with {} error(s); first: {first}. The database is partly restored: recreate it before trying again",
            fatal.len().max(1)
        )));
    }
    Ok(benign)
}

/// Split psql's stderr into benign and fatal error lines.
pub fn classify_psql_errors(stderr: &str, username: &str) -> (Vec<String>, Vec<String>) {
    let mut benign = Vec::new();
    let mut fatal = Vec::new();
    for line in stderr.lines() {
        if !(line.contains("ERROR:") || line.contains("FATAL:") || line.contains("invalid command"))
        {
            continue;
        }
        if is_benign_psql_error(line, username) {
            benign.push(line.to_string());
        } else {
            fatal.push(line.to_string());
        }
    }
    (benign, fatal)
}

/// Restore every file of the list; returns how many were written.
async fn restore_files(
    store: &Store,
    identities: Arc<Identities>,
    manifest: &Manifest,
    key: [u8; 32],
    opts: &RestoreOptions,
    present: HashSet<String>,
) -> Result<u64> {
    let (tx, mut rx) = mpsc::channel::<Entry>(1024);
    let m = manifest.clone();
    let list_reader = store.reader(&manifest.files.key).await?;
    let ids = identities.clone();
    let lister = tokio::task::spawn_blocking(move || {
        for_each_entry(list_reader, &ids, &m, |e| {
            tx.blocking_send(e).map_err(|_| Error::Interrupted)
        })
    });
    let target = opts.target.clone();
    std::fs::create_dir_all(&target).at(&target)?;
    let sink = Arc::new(FileSink::new(&target, opts.keep_special_modes));
    let mut dirs: Vec<(PathBuf, Entry)> = Vec::new();
    let mut links: Vec<(PathBuf, Entry)> = Vec::new();
    let made = Arc::new(std::sync::Mutex::new(HashSet::<PathBuf>::new()));
    let entries = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut restored = 0u64;
    {
        let jobs = entries
            .filter_map(|e| {
                let dest = safe_path(&target, manifest, &e.path);
                let out = match (dest, e.kind) {
                    (Err(err), _) => Some(Err(err)),
                    (Ok(d), EntryKind::Dir) => {
                        dirs.push((d, e));
                        None
                    }
                    (Ok(d), EntryKind::Symlink) => {
                        links.push((d, e));
                        None
                    }
                    (Ok(_), EntryKind::File) if present.contains(&e.path) => None,
                    (Ok(d), EntryKind::File) => Some(Ok((d, e))),
                };
                async move { out }
            })
            .map(|job| {
                let store = store.clone();
                let identities = identities.clone();
                let made = made.clone();
                let target = opts.target.clone();
                let progress = opts.progress.clone();
                let sink = sink.clone();
                async move {
                    let (dest, entry) = job?;
                    let reader = store
                        .reader(
                            &entry
                                .content
                                .ok_or_else(|| Error::Corrupt {
                                    object: "file list".into(),
                                    message: format!("{} has no content address", entry.path),
                                })?
                                .key(),
                        )
                        .await?;
                    tokio::task::spawn_blocking(move || {
                        ensure_parent(&target, &dest, &made)?;
                        restore_file(reader, &identities, &key, &dest, &entry, &sink)?;
                        progress.inc(entry.size);
                        Ok::<_, Error>(())
                    })
                    .await
                    .map_err(|e| Error::Other(format!("restore worker: {e}")))?
                }
            })
            .buffer_unordered(opts.concurrency);
        let mut jobs = std::pin::pin!(jobs);
        while let Some(r) = jobs.next().await {
            r?;
            restored += 1;
        }
    }
    lister
        .await
        .map_err(|e| Error::Other(format!("file list reader: {e}")))??;
    for (dest, e) in &links {
        ensure_parent(&opts.target, dest, &made)?;
        if std::fs::symlink_metadata(dest).is_err() {
            std::os::unix::fs::symlink(e.target.as_deref().unwrap_or_default(), dest).at(dest)?;
        }
    }
    // Deepest folders first, so a read-only folder is finished after its contents.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (dest, e) in &dirs {
        std::fs::create_dir_all(dest).at(dest)?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(sink.mode(e.mode)))
            .at(dest)?;
        set_mtime(dest, e.mtime_ns)?;
    }
    sync_target(&opts.target)?;
    Ok(restored)
}

/// Create the parent folders of `dest` inside `target`, refusing to pass through a symlink.
fn ensure_parent(
    target: &Path,
    dest: &Path,
    made: &std::sync::Mutex<HashSet<PathBuf>>,
) -> Result<()> {
    let parent = dest.parent().expect("entries have a parent");
    if made.lock().expect("not poisoned").contains(parent) {
        return Ok(());
    }
    let rel = parent
        .strip_prefix(target)
        .map_err(|_| Error::Other(format!("{} is outside the target", dest.display())))?;
    let mut at = target.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::Other(format!(
                    "{} is a symlink; refusing to restore through it",
                    at.display()
                )));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::Other(format!("{} is not a folder", at.display()))),
            Err(_) => std::fs::create_dir(&at)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .at(&at)?,
        }
    }
    made.lock()
        .expect("not poisoned")
        .insert(parent.to_path_buf());
    Ok(())
}

/// Where restored files are written: past the page cache where the file system allows, as
/// unnamed files (`O_TMPFILE`) given their name only once verified, or where the file system cannot
/// make those, under a hidden partial name renamed into place (directio.rs).
pub struct FileSink {
    files: NewFiles,
    /// Keep setuid, setgid and sticky bits ([`RestoreOptions::keep_special_modes`]).
    keep_special_modes: bool,
}

/// A file being restored: unnamed, or at its partial name.
enum Partial {
    Unnamed,
    Named(PathBuf),
}

impl FileSink {
    /// A sink for files under `target`.
    pub fn new(target: &Path, keep_special_modes: bool) -> FileSink {
        FileSink {
            files: NewFiles::new(directio::suits(target)),
            keep_special_modes,
        }
    }

    /// The mode to give a restored file or folder recorded with `mode`.
    fn mode(&self, mode: u32) -> u32 {
        restored_mode(mode, self.keep_special_modes)
    }

    /// A new file that will become `dest`, for `len` bytes.
    fn create(&self, dest: &Path, len: u64) -> Result<(DirectWriter, Partial)> {
        let folder = dest.parent().expect("entries have a parent");
        if let Some(w) = self.files.unnamed(folder, 0o600, len).at(dest)? {
            return Ok((w, Partial::Unnamed));
        }
        let name = dest.file_name().expect("a file name").to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.immich-backup-partial"));
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true).mode(0o600);
        let w = self.files.open(&tmp, &options, len).at(&tmp)?;
        Ok((w, Partial::Named(tmp)))
    }

    /// Give the verified file its name `dest`.
    fn publish(file: &File, partial: &Partial, dest: &Path) -> Result<()> {
        match partial {
            Partial::Named(tmp) => std::fs::rename(tmp, dest).at(dest),
            Partial::Unnamed => match crate::localstore::link_fd(file, dest) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Error::Other(format!(
                    "{} appeared while it was being restored; is Immich running? Stop it and restore again",
                    dest.display()
                ))),
                Err(e) => Err(Error::io(dest, e)),
            },
        }
    }
}

thread_local! {
    /// Each restore worker's read buffer (a fresh one per file would fault in new pages).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
}

/// Decrypt one content object into a new file ([`FileSink`]), verify it against its address, and
/// only then give it its name `dest`.
fn restore_file(
    reader: impl Read,
    identities: &Identities,
    key: &[u8; 32],
    dest: &Path,
    entry: &Entry,
    sink: &FileSink,
) -> Result<()> {
    let id = entry.content.expect("checked by the caller");
    let object = id.key();
    let mut plain = identities.decrypt(reader, &object)?;
    let (mut out, partial) = sink.create(dest, entry.size)?;
    let result = (|| {
        let mut hasher = blake3::Hasher::new_keyed(key);
        let mut len = 0u64;
        READ_BUFFER.with_borrow_mut(|buf| loop {
            let n = plain.read(buf).map_err(|e| read_error(&object, e))?;
            if n == 0 {
                return Ok::<_, Error>(());
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).at(dest)?;
            len += n as u64;
        })?;
        let out = out.finish().at(dest)?;
        if len != entry.size || ContentId(*hasher.finalize().as_bytes()) != id {
            return Err(Error::Corrupt {
                object: object.clone(),
                message: format!("content does not match its address (for {})", entry.path),
            });
        }
        // Mode and time through the open file; durability comes from one sync at the end.
        out.set_permissions(std::fs::Permissions::from_mode(sink.mode(entry.mode)))
            .at(dest)?;
        out.set_modified(mtime(entry.mtime_ns)).at(dest)?;
        crate::localstore::start_writeback(&out);
        FileSink::publish(&out, &partial, dest)
    })();
    if let (Err(_), Partial::Named(tmp)) = (&result, &partial) {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// The permission bits a restored entry gets: without `keep_special`, no setuid, setgid or sticky
/// bit (Immich needs none, and a forged or damaged list must not make a setuid file).
pub fn restored_mode(mode: u32, keep_special: bool) -> u32 {
    if keep_special {
        mode & 0o7777
    } else {
        mode & 0o777
    }
}

fn mtime(mtime_ns: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(mtime_ns.max(0) as u64)
}

fn set_mtime(path: &Path, mtime_ns: i64) -> Result<()> {
    let f = File::options().read(true).open(path).at(path)?;
    f.set_modified(mtime(mtime_ns)).at(path)
}

/// Make everything restored under `target` durable: one `syncfs` instead of one `fsync` per file.
fn sync_target(target: &Path) -> Result<()> {
    let dir = File::open(target).at(target)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&dir)) } != 0 {
        return Err(Error::io(target, io::Error::last_os_error()));
    }
    Ok(())
}

/// Create Immich's six folders with their `.immich` markers, so the server starts.
pub fn create_immich_folders(target: &Path) -> Result<()> {
    let stamp = chrono::Utc::now().timestamp_millis().to_string();
    for f in IMMICH_FOLDERS {
        let dir = target.join(f);
        std::fs::create_dir_all(&dir).at(&dir)?;
        let marker = dir.join(".immich");
        if std::fs::symlink_metadata(&marker).is_err() {
            std::fs::write(&marker, &stamp).at(&marker)?;
        }
    }
    Ok(())
}

/// Compare the restored database's rows with the snapshot's counts.
async fn compare_rows(db: &dyn Database, manifest: &Manifest) -> Result<Vec<RowCheck>> {
    let actual = db::row_counts(db, &manifest.database.database).await?;
    let mut tables: BTreeMap<&String, RowCheck> = BTreeMap::new();
    for (t, n) in &manifest.database.row_counts {
        tables.insert(
            t,
            RowCheck {
                table: t.clone(),
                expected: Some(*n),
                actual: None,
            },
        );
    }
    for (t, n) in &actual {
        tables
            .entry(t)
            .or_insert_with(|| RowCheck {
                table: t.clone(),
                expected: None,
                actual: None,
            })
            .actual = Some(*n);
    }
    Ok(tables.into_values().collect())
}

/// Counts bytes for the progress bar.
struct CountingReader<R> {
    inner: R,
    progress: Progress,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }
}

/// SHA-256 and length of what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }
    fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}
