//! Backup: database first, then files (Immich's documented order), then the snapshot's records, and
//! last the manifest that makes the snapshot visible.
//!
//! source → compress → encrypt → store, through the repository's [`Writer`]: [`dump`] streams
//! `pg_dumpall` into the store; [`walk`] lists the originals in a stable order, the metadata
//! [`cache`] skips what did not change, [`dedupe`] what the store holds, and [`upload`] stores the
//! rest, several files at once ([`early`] starts on them while the dump starts); the file list, the
//! plaintext refs and the new cache are written as the results arrive, in walk order. Where both
//! meet, before the commit, `consistency` compares the files the dump's asset rows name with the
//! file list.

pub mod cache;
pub(crate) mod consistency;
pub mod dedupe;
pub mod dump;
pub mod early;
mod record;
pub mod upload;
pub mod walk;

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use flate2::write::GzEncoder;
use flate2::Compression;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{Config, OnMissingOriginal, OnUnreadable};
use crate::crypto::sign::SigningKey;
use crate::crypto::Recipients;
use crate::db::{self, Database};
use crate::error::{Error, Result};
use crate::format::{
    self, Consistency, ContentId, DatabaseInfo, Entry, EntryKind, Manifest, Object, ObjectRef,
    Skipped, Summary, Totals,
};
use crate::immich::exclude::Excludes;
use crate::immich::paths::{external_folder, PathMap};
use crate::progress::Progress;
use crate::repo::lock::{Lock, LockKind};
use crate::repo::snapshots;
use crate::repo::{Repository, SealedWriter, Writer};
use crate::store::local::{self, Owner, Verdict};
use crate::store::ObjectWriter;
use cache::{CacheReader, CacheWriter};
use dedupe::{Known, Repair};
use dump::HashingWriter;
use upload::{FileStorer, StoreFileError, Stored, Workers};
use walk::{Found, Walked};

/// What a backup did, for the summary line and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub snapshot: String,
    pub store: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files whose content was uploaded.
    pub files_new: u64,
    /// Files read whose content the store already had.
    pub files_deduplicated: u64,
    /// Files skipped by the metadata cache (not read).
    pub files_unchanged: u64,
    /// Files (new or deduplicated) read while the dump was still starting, and unchanged since.
    pub files_read_ahead: u64,
    /// Paths `[immich] exclude` left out (a folder counts once, its contents are not walked).
    pub excluded: u64,
    pub bytes_total: u64,
    pub bytes_read: u64,
    /// Bytes written to the store for file contents (after encryption).
    pub bytes_stored: u64,
    pub dump_sql_bytes: u64,
    pub dump_stored_bytes: u64,
    pub skipped: Vec<Skipped>,
    pub duration_secs: f64,
    pub row_counts: std::collections::BTreeMap<String, u64>,
    /// The snapshot is signed (a signing key is configured).
    pub signed: bool,
    /// `--repair`: damaged content objects stored again (`data/…` keys).
    pub repaired: Vec<String>,
    /// `--repair`: named damaged objects whose content no file has any more.
    pub not_repaired: Vec<String>,
    /// The database compared with the snapshot's files (with example paths).
    pub consistency: Consistency,
    /// The snapshot is partial (exit code 3): files could not be read, or files the database names
    /// are missing and `[backup] on_missing_original` is `warn`.
    pub partial: bool,
    /// The requests this backup sent to a cloud store, by kind, and the bytes (none for a folder
    /// store): what a provider bills.
    pub requests: crate::store::meter::TrafficCounts,
}

/// How a backup runs, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// `--repair`: replace stored content objects that are damaged (named here, from a restore's or
    /// a check's report; or stored with a size no age file of the file can have) while a file with
    /// that content still exists.
    pub repair: Option<HashSet<ContentId>>,
}

/// Run one backup into `store`.
pub async fn run(
    cfg: &Config,
    db: &dyn Database,
    repo: &Repository,
    recipients: Recipients,
    progress: Progress,
) -> Result<BackupReport> {
    run_with(
        cfg,
        db,
        repo,
        recipients,
        progress,
        BackupOptions::default(),
    )
    .await
}

/// Run one backup into `store`, with `opts`.
pub async fn run_with(
    cfg: &Config,
    db: &dyn Database,
    repo: &Repository,
    recipients: Recipients,
    progress: Progress,
    opts: BackupOptions,
) -> Result<BackupReport> {
    let started = Instant::now();
    let traffic = repo.store().traffic();
    let root = cfg.immich.upload_location.clone();
    check_upload_location(cfg, &root, &cfg.immich.folders)?;
    let signing = signing_keys(cfg, &recipients)?;
    let marker = snapshots::open_or_init(repo).await?;
    if signing.is_empty() {
        require_legacy(repo).await?;
    }
    let seal_to = crate::repo::keys::for_backup(repo, &marker, recipients, &signing).await?;
    check_key_rollback(cfg, &marker.id, seal_to.key.as_deref())?;
    let writer = repo.sealing_writer(seal_to, signing);
    // A shared lock from before the content listing until after the manifest: prune (exclusive)
    // never deletes content this backup has seen and may reference.
    let lock = Lock::acquire(repo, LockKind::Shared, "backup", &cfg.lock).await?;
    let result = tokio::select! {
        r = run_locked(cfg, db, &writer, progress, started, marker, &lock, opts) => r,
        e = lock.lost() => Err(e),
    };
    lock.release().await;
    result.map(|mut report| {
        report.requests = repo.store().traffic().since(&traffic);
        report
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_locked(
    cfg: &Config,
    db: &dyn Database,
    writer: &Writer,
    progress: Progress,
    started: Instant,
    marker: format::RepoMarker,
    lock: &Lock,
    opts: BackupOptions,
) -> Result<BackupReport> {
    let root = cfg.immich.upload_location.clone();
    let repair = match opts.repair {
        Some(named) => Some(Arc::new(prepare_repair(writer, named).await?)),
        None => None,
    };
    let repo = writer.repo();
    let key = writer.content_key();
    let time = Utc::now();
    let id = format::new_snapshot_id(time);
    tracing::info!(snapshot = %id, store = repo.url(), database = db.describe(), "backup started");

    // Content a killed run left staged, then this run's staging (local stores).
    recover_staging(repo, cfg).await?;
    repo.begin_staging().await?;

    let cache_path = cache::cache_file(&cfg.cache_dir(), &marker.id, &key, &root);
    let run = Run {
        cfg,
        db,
        writer,
        key,
        id: &id,
        cache_path: &cache_path,
        progress: &progress,
        repair: repair.as_ref(),
    };
    let (dumped, facts, files) = dump_then_files(run).await?;
    progress.finish();
    let consistency = check_consistency(dumped.paths, files.paths, excludes(cfg)?).await?;

    let summary = Summary {
        id: id.clone(),
        time,
        host: crate::host::hostname(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        files: files.counts.totals.files,
        bytes: files.counts.totals.bytes,
        bytes_added: files.counts.bytes_stored,
        repository_key: writer.repository_key().map(str::to_string),
        dump_bytes: dumped.object.size,
        skipped: files.counts.skipped.len() as u64,
        consistency: Some(consistency.counts_only()),
    };
    let manifest = Manifest {
        format: format::MANIFEST_FORMAT,
        id: id.clone(),
        time,
        host: summary.host.clone(),
        tool_version: summary.tool_version.clone(),
        content_key: hex::encode(key),
        repository_key: summary.repository_key.clone(),
        upload_location: root.display().to_string(),
        folders: cfg.immich.folders.clone(),
        database: DatabaseInfo {
            mode: format!("{:?}", cfg.database.mode).to_lowercase(),
            database: cfg.database.database.clone(),
            username: cfg.database.username.clone(),
            server_version: facts.version,
            server_version_num: facts.version_num,
            extensions: facts.extensions,
            row_counts: dumped.row_counts.clone(),
            image: facts.image,
        },
        dump: dumped.object.clone(),
        files: files.list.clone(),
        totals: files.counts.totals.clone(),
        skipped: files.counts.skipped.clone(),
        external_libraries: external_libraries(cfg),
        consistency: Some(consistency.clone()),
    };
    tracing::debug!(files = files.counts.totals.files, "files stored");
    let (repaired, not_repaired) = repair.map(|r| r.outcome()).unwrap_or_default();
    for m in &not_repaired {
        tracing::warn!(object = %m.key(), "not repaired: no file of this backup has this content any more; the snapshots that use it cannot restore that file");
    }
    lock.confirm().await?;
    // Everything the manifest references must be durable, and the content visible, first.
    let published = repo.publish().await?;
    tracing::debug!(published, "content published");
    writer
        .commit(&summary, &manifest, &files.refs_sha256)
        .await?;
    files.cache.commit()?;
    if let Some(r) = &files.record {
        record::save(&r.path, &r.basis, &r.known.all_ids());
    }
    let partial = tell_consistency(cfg, &consistency) || !files.counts.skipped.is_empty();

    let report = BackupReport {
        snapshot: id,
        store: repo.url().to_string(),
        files: files.counts.totals.files,
        dirs: files.counts.totals.dirs,
        symlinks: files.counts.totals.symlinks,
        files_new: files.counts.files_new,
        files_deduplicated: files.counts.files_dedup,
        files_unchanged: files.counts.files_unchanged,
        files_read_ahead: files.counts.files_read_ahead,
        excluded: files.counts.excluded,
        bytes_total: files.counts.totals.bytes,
        bytes_read: files.counts.bytes_read,
        bytes_stored: files.counts.bytes_stored,
        dump_sql_bytes: dumped.sql_bytes,
        dump_stored_bytes: dumped.object.size,
        skipped: files.counts.skipped,
        duration_secs: started.elapsed().as_secs_f64(),
        row_counts: dumped.row_counts,
        signed: writer.signs(),
        repaired: repaired.iter().map(ContentId::key).collect(),
        not_repaired: not_repaired.iter().map(ContentId::key).collect(),
        consistency,
        partial,
        requests: Default::default(),
    };
    tracing::info!(snapshot = %report.snapshot, files = report.files, new = report.files_new, "backup complete");
    Ok(report)
}

/// What one backup run works with.
#[derive(Clone, Copy)]
struct Run<'a> {
    cfg: &'a Config,
    db: &'a dyn Database,
    writer: &'a Writer,
    key: [u8; 32],
    id: &'a str,
    cache_path: &'a std::path::Path,
    progress: &'a Progress,
    repair: Option<&'a Arc<Repair>>,
}

/// The database server's facts the manifest records.
struct ServerFacts {
    version: String,
    version_num: i64,
    extensions: Vec<format::Extension>,
    image: Option<String>,
}

/// Database first: the snapshot's walk starts only once the dump holds its snapshot of the Immich
/// database (Immich's documented order: every asset the dump knows has its file walked after);
/// until then files are read ahead (early.rs). The dump then goes on beside the files. The server's
/// facts are asked beside the dump in one query, which is also the check that a local server
/// answers: its error, if any, is the one told.
async fn dump_then_files(run: Run<'_>) -> Result<(dump::DumpOutcome, ServerFacts, FilesDone)> {
    let Run {
        cfg, db, writer, ..
    } = run;
    if db.ready_waits() {
        db.wait_ready().await?;
    }
    run.progress.phase("database", None);
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
    let files_started = Arc::new(AtomicBool::new(false));
    let (p, files_on) = (run.progress.clone(), files_started.clone());
    let events = dump::DumpEvents {
        on_bytes: move |n| {
            if !files_on.load(Ordering::Relaxed) {
                p.inc(n)
            }
        },
        snapshot_taken: taken_tx,
    };
    let files_fut = async {
        // A repair has listed the store already, sizes and all.
        let (known, basis) = match run.repair {
            Some(r) => (
                Known::new(r.stored_ids(), writer.repo()).with_repair(Some(r.clone())),
                None,
            ),
            None => known_content(writer.repo(), run.cache_path).await?,
        };
        let known = Arc::new(known);
        let record = basis.map(|basis| RecordSave {
            path: record::path_beside(run.cache_path),
            basis,
            known: known.clone(),
        });
        let storer = Arc::new(FileStorer {
            writer: writer.clone(),
            key: run.key,
            known,
            buffers: Default::default(),
        });
        let remote = writer.repo().store().is_remote();
        let workers = Arc::new(Workers::new(cfg.storage.concurrency, remote));
        let ahead = early::start(
            (walk::tops(cfg), excludes(cfg)?),
            run.cache_path.to_path_buf(),
            storer.clone(),
            workers.clone(),
            cfg.storage.concurrency * WINDOW_PER_WORKER,
        );
        // Sent once the dump is inside the Immich database; dropped when the dump ended (or failed)
        // without saying so: either way the files may go now.
        let _ = taken_rx.await;
        let early = ahead.stop().await;
        files_started.store(true, Ordering::Relaxed);
        tracing::debug!("the dump holds its snapshot of the Immich database; walking the files");
        let mut done = store_files(run, storer, workers, early).await?;
        done.record = record;
        Ok(done)
    };
    let facts = server_facts(db, &cfg.database.database);
    let work = async { tokio::try_join!(dump_database(run, events), files_fut) };
    tokio::pin!(facts, work);
    tokio::select! {
        facts = &mut facts => {
            let facts = facts?; // a failed check stops everything at once
            let (dumped, files) = work.await?;
            Ok((dumped, facts, files))
        }
        done = &mut work => {
            // An unreachable database is best told by the check, whatever the dump said.
            let facts = facts.await?;
            let (dumped, files) = done?;
            Ok((dumped, facts, files))
        }
    }
}

/// The dump, streamed to the store.
async fn dump_database<F: Fn(u64) + Send + 'static>(
    run: Run<'_>,
    events: dump::DumpEvents<F>,
) -> Result<dump::DumpOutcome> {
    let paths = consistency::DbPaths::new(path_map(run.cfg));
    let counter = dump::RowCounter::new(&run.cfg.database.database, Some(paths));
    let dumped = dump::dump_to_store(
        run.db,
        run.writer,
        &Object::Dump(run.id.to_string()),
        counter,
        run.cfg.backup.compression_level,
        events,
    )
    .await?;
    tracing::info!(
        sql_bytes = dumped.sql_bytes,
        stored = dumped.object.size,
        tables = dumped.row_counts.len(),
        "database dumped"
    );
    Ok(dumped)
}

/// The backed-up external libraries, as the manifest records them.
fn external_libraries(cfg: &Config) -> Vec<format::ExternalLibrary> {
    let libraries = cfg.immich.external_libraries.iter();
    libraries
        .filter_map(|l| {
            Some(format::ExternalLibrary {
                container_path: l.container_path.clone(),
                host_path: l.host_path.display().to_string(),
                folder: external_folder(&l.container_path)?,
            })
        })
        .collect()
}

/// `[immich] exclude`, compiled (checked when the config was loaded; a config built in code is
/// checked here).
fn excludes(cfg: &Config) -> Result<Excludes> {
    cfg.immich
        .excludes()
        .map_err(|e| Error::Config(format!("[immich] exclude: {e}")))
}

/// How Immich's container paths map into this install's snapshots.
fn path_map(cfg: &Config) -> PathMap {
    let external = cfg.immich.external_libraries.iter();
    PathMap::new(
        &cfg.immich.media_location,
        external.map(|l| l.container_path.as_str()),
    )
}

/// Compare the dump's paths with the file list (a second or so for a million-asset library: on a
/// blocking thread).
async fn check_consistency(
    db: Option<consistency::DbPaths>,
    files: consistency::FilePaths,
    excludes: Excludes,
) -> Result<Consistency> {
    tokio::task::spawn_blocking(move || consistency::compare(db, &files, &excludes))
        .await
        .map_err(|e| Error::Other(format!("consistency check: {e}")))
}

/// Log the consistency verdict; returns whether it makes the snapshot partial (missing files, or
/// files the database names that `[immich] exclude` left out, and `[backup] on_missing_original =
/// "warn"`).
fn tell_consistency(cfg: &Config, c: &Consistency) -> bool {
    if c.verdict == format::Verdict::Unchecked {
        tracing::warn!(
            "consistency not checked: {}",
            c.note.as_deref().unwrap_or("")
        );
    }
    if c.external_assets > 0 {
        tracing::warn!(
            assets = c.external_assets,
            import_paths = ?c.external_import_paths,
            first = ?c.external_examples.first(),
            "assets outside UPLOAD_LOCATION (external libraries, or [immich] media_location not set) are NOT in this snapshot; back them up with [immich] external_libraries"
        );
    }
    let warn = cfg.backup.on_missing_original == OnMissingOriginal::Warn;
    if c.excluded > 0 {
        let what = format!(
            "{} file(s) the database names are left out by [immich] exclude; a restore would lack them (narrow the patterns)",
            c.excluded
        );
        let first = &c.excluded_examples[..c.excluded_examples.len().min(3)];
        if warn {
            tracing::warn!(excluded = c.excluded, first = ?first, "{what}");
        } else {
            tracing::info!(excluded = c.excluded, first = ?first, "{what} ([backup] on_missing_original = \"ignore\")");
        }
    }
    if c.missing() == 0 {
        if c.excluded == 0 {
            tracing::info!(
                assets = c.assets,
                orphans = c.orphans,
                "consistency: every file the database names is in the snapshot"
            );
        }
        return c.excluded > 0 && warn;
    }
    let first = c.missing_examples.first().map(String::as_str).unwrap_or("");
    let what = "file(s) the database names are NOT in this snapshot (deleted or moved outside Immich?); a restore would lack them";
    if warn {
        tracing::warn!(
            originals = c.missing_originals,
            sidecars = c.missing_sidecars,
            first,
            "{what}"
        );
    } else {
        tracing::info!(
            originals = c.missing_originals,
            sidecars = c.missing_sidecars,
            first,
            "{what} ([backup] on_missing_original = \"ignore\")"
        );
    }
    warn
}

async fn server_facts(db: &dyn Database, database: &str) -> Result<ServerFacts> {
    let ((version, version_num), extensions) = db::server_facts(db, database).await?;
    Ok(ServerFacts {
        version,
        version_num,
        extensions,
        image: db.image().await,
    })
}

fn check_upload_location(cfg: &Config, root: &std::path::Path, folders: &[String]) -> Result<()> {
    if !root.is_dir() {
        return Err(Error::Config(format!(
            "{} is not a folder; set it to the host path of Immich's UPLOAD_LOCATION",
            cfg.describe_path("[immich] upload_location", root)
        )));
    }
    if !folders.iter().any(|f| root.join(f).is_dir()) {
        return Err(Error::Config(format!(
            "{} holds none of the folders {folders:?}; is [immich] upload_location Immich's UPLOAD_LOCATION?",
            root.display()
        )));
    }
    Ok(())
}

/// Without a signing key a backup goes on only in a store written before snapshots were signed
/// (immich-backup 0.1: complete snapshots, none signed), where restores trust unsigned snapshots
/// anyway. A new store, or one whose snapshots are signed, gets signed snapshots or none: an
/// unsigned one could not be told from a forged one.
async fn require_legacy(repo: &Repository) -> Result<()> {
    let folders = snapshots::list_folders(repo).await?;
    let complete: Vec<_> = folders.values().filter(|f| f.complete).collect();
    let how = "set [encryption] signing_key_file to the signing key `immich-backup keygen` wrote beside the identity (or make it where the identity is kept: `immich-backup signing-key --identity FILE -o signing.key`)";
    if complete.is_empty() {
        return Err(Error::Config(format!(
            "no signing key: this repository's snapshots must be signed, so that a restore can tell them from forged ones; {how}"
        )));
    }
    if complete.iter().any(|f| f.signed) {
        return Err(Error::Config(format!(
            "no signing key, but this repository's snapshots are signed: an unsigned one would not be trusted by a restore; {how}"
        )));
    }
    Ok(())
}

/// The newest repository key this machine sealed to is remembered beside its metadata cache. A
/// store whose newest key is older than that had a key folder deleted: the backup stops rather
/// than go quietly back to a key it may have been rotated away from (after a leaked identity).
fn check_key_rollback(cfg: &Config, repo_id: &str, key: Option<&str>) -> Result<()> {
    let Some(key) = key else {
        return Ok(());
    };
    let file = cfg.cache_dir().join(repo_id).join("repository-key");
    if let Ok(seen) = std::fs::read_to_string(&file) {
        let seen = seen.trim();
        if seen > key {
            return Err(Error::Corrupt {
                object: format!("keys/{seen}/"),
                message: format!(
                    "this machine sealed snapshots to this repository key, but the store's newest key is now the older keys/{key}/: a key folder was deleted from the store. Find out why before backing up; then make a new key with `immich-backup key rotate` (or, if the store was put back from an older copy on purpose, delete {})",
                    file.display()
                ),
            });
        }
    }
    let write = std::fs::create_dir_all(file.parent().expect("a folder"))
        .and_then(|()| std::fs::write(&file, format!("{key}\n")));
    if let Err(e) = write {
        tracing::warn!(file = %file.display(), error = %e, "cannot remember the repository key in the cache folder");
    }
    Ok(())
}

/// The configured signing keys; without one (a 0.1 store, see [`require_legacy`]) snapshots are
/// unsigned, and every backup says so.
fn signing_keys(cfg: &Config, recipients: &Recipients) -> Result<Vec<SigningKey>> {
    let (keys, made_for) = cfg.encryption.signing_keys()?;
    if keys.is_empty() {
        tracing::warn!("no signing key: this snapshot is NOT signed (a restore trusts it only while no snapshot in the store is signed, or with --allow-unsigned). Make the key where the identity is kept (`immich-backup signing-key --identity FILE -o signing.key`) and set [encryption] signing_key_file");
    }
    for r in &made_for {
        if !recipients.canonical().contains(r) {
            tracing::warn!(recipient = %r, "the signing key was made for a recipient that is not in [encryption] recipients: a restore with that recipient's identity will not trust these snapshots");
        }
    }
    Ok(keys)
}

/// Staging folders of other runs in a local store: a run that died on this host since the last
/// boot is adopted (its objects published), one whose bytes cannot be trusted is removed.
async fn recover_staging(repo: &Repository, cfg: &Config) -> Result<()> {
    let others = repo.other_staging().await?;
    if others.is_empty() {
        return Ok(());
    }
    let locks = crate::repo::lock::list(repo, cfg.lock.stale()).await?;
    let me = Owner::this_process();
    for (name, owner, fresh) in others {
        let host_live = owner.as_ref().is_some_and(|o| {
            locks
                .iter()
                .any(|l| l.stale.is_none() && l.info.as_ref().is_some_and(|i| i.host == o.host))
        });
        match local::verdict(owner.as_ref(), &me, host_live, fresh) {
            Verdict::Leave => {}
            Verdict::Adopt => {
                let n = repo.adopt_staging(&name).await?;
                // A run that failed before it uploaded anything leaves nothing worth a word.
                if n > 0 {
                    tracing::info!(staging = %name, objects = n, "reused the uploads of an interrupted backup");
                } else {
                    tracing::debug!(staging = %name, "an interrupted backup's staging folder, with no uploads");
                }
            }
            Verdict::Discard => {
                repo.discard_staging(&name).await?;
                tracing::info!(staging = %name, "removed the staged uploads of a backup interrupted by a restart (they may not have reached the disk)");
            }
        }
    }
    Ok(())
}

/// What `--repair` works from: the objects named damaged, every stored object's size, and the
/// age header length of an object written to these recipients.
async fn prepare_repair(writer: &Writer, named: HashSet<ContentId>) -> Result<Repair> {
    let sizes: Vec<(ContentId, u64)> = writer.repo().content_sizes().try_collect().await?;
    let header = writer.header_len()?;
    tracing::info!(
        named = named.len(),
        objects = sizes.len(),
        "repair: checking the stored objects of this backup's files"
    );
    Ok(Repair::new(named, sizes, header))
}

/// Every content address in the store.
/// The content the store holds: from this machine's record of it ([`record`]) on a store across a
/// network while no prune ran since it was listed, else from a listing of `data/` (recorded after
/// the backup; a folder store is always listed, which reads only folder names).
async fn known_content(
    repo: &Repository,
    cache_path: &std::path::Path,
) -> Result<(Known, Option<record::Basis>)> {
    if !repo.store().is_remote() {
        return Ok((list_content(repo).await?, None));
    }
    let now = record::Basis::now(repo).await?;
    if let Some((basis, ids)) = record::load(&record::path_beside(cache_path), &now) {
        tracing::debug!(
            objects = ids.len(),
            "stored content as recorded (no prune since it was listed)"
        );
        return Ok((Known::new(ids, repo), Some(basis)));
    }
    Ok((list_content(repo).await?, Some(now)))
}

async fn list_content(repo: &Repository) -> Result<Known> {
    let ids: Vec<ContentId> = repo.content_ids().await?;
    tracing::debug!(objects = ids.len(), "listed stored content");
    Ok(Known::new(ids, repo))
}

/// The files phase's result.
struct FilesDone {
    list: ObjectRef,
    refs_sha256: String,
    cache: CacheWriter,
    counts: Counts,
    /// The file list's paths, for the consistency check.
    paths: consistency::FilePaths,
    /// What to record of the stored content once the snapshot is committed ([`record`]).
    record: Option<RecordSave>,
}

/// The record of stored content to write after the commit: where, on what basis, and the content.
struct RecordSave {
    path: std::path::PathBuf,
    basis: record::Basis,
    known: Arc<Known>,
}

/// One walked item after its content is handled.
enum Outcome {
    Entry {
        entry: Entry,
        found: Box<Found>,
        stored: Option<Stored>,
        /// Its content was read ahead of the dump's snapshot.
        ahead: bool,
    },
    Skipped(Skipped),
    /// Left out by `[immich] exclude`.
    Excluded,
}

impl Outcome {
    /// `found`, with content `id` that `stored` says how it got.
    fn stored(found: Found, id: ContentId, stored: Stored, ahead: bool) -> Outcome {
        let mut entry = found.entry.clone();
        entry.content = Some(id);
        Outcome::Entry {
            entry,
            found: Box::new(found),
            stored: Some(stored),
            ahead,
        }
    }
}

async fn process(
    item: Walked,
    cached: Option<ContentId>,
    early: Option<early::Pending>,
    storer: Arc<FileStorer>,
    workers: Arc<Workers>,
) -> Result<Outcome> {
    let found = match item {
        Walked::Unreadable { path, error } => return Ok(Outcome::Skipped(Skipped { path, error })),
        Walked::Excluded { .. } => return Ok(Outcome::Excluded),
        Walked::Found(f) => f,
    };
    if found.entry.kind != EntryKind::File {
        return Ok(Outcome::Entry {
            entry: found.entry.clone(),
            found: Box::new(found),
            stored: None,
            ahead: false,
        });
    }
    if let Some(id) = &cached {
        storer.known.check_size(id, found.entry.size);
    }
    if let Some(id) = cached.filter(|id| storer.known.contains(id)) {
        return Ok(Outcome::stored(found, id, Stored::Unchanged, false));
    }
    if let Some(early) = early {
        // Read before the dump's snapshot, and unchanged since (early.rs).
        if let Ok(Some((id, stored))) = early.await {
            return Ok(Outcome::stored(found, id, stored, true));
        }
    }
    let (found, res) = storer.store_on_worker(found, &workers, ()).await?;
    match res {
        Ok((id, stored)) => Ok(Outcome::stored(found, id, stored, false)),
        Err(StoreFileError::Source(error)) => Ok(Outcome::Skipped(Skipped {
            path: found.entry.path.clone(),
            error,
        })),
        Err(StoreFileError::Store(e)) => Err(e),
    }
}

/// The snapshot's walk: every file is taken from the metadata cache, from what was read ahead
/// (`early`), or read and stored now.
async fn store_files(
    run: Run<'_>,
    storer: Arc<FileStorer>,
    workers: Arc<Workers>,
    mut early: early::Early,
) -> Result<FilesDone> {
    let Run {
        cfg,
        id,
        writer,
        cache_path,
        progress,
        ..
    } = run;
    progress.phase("files", Some(0));
    let tops = walk::tops(cfg);
    if progress.is_visible() {
        spawn_scanner(tops.clone(), progress.clone());
    }
    let (tx, mut rx) = mpsc::channel::<Vec<Walked>>(8);
    let excluded = excludes(cfg)?;
    tokio::task::spawn_blocking(move || walk::walk(&tops, &excluded, tx));

    let mut cache = CacheReader::open(cache_path);
    // `concurrency` files are read and stored at once; results are taken in walk order from a
    // wider window, so one large video does not stall the workers behind it.
    let items =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).flat_map(futures::stream::iter);
    let mut outcomes = items
        .map(|item| {
            let (cached, ahead) = match &item {
                Walked::Found(f) if f.entry.kind == EntryKind::File => {
                    (cache.lookup(f), early.take(f))
                }
                _ => (None, None),
            };
            process(item, cached, ahead, storer.clone(), workers.clone())
        })
        .buffered(cfg.storage.concurrency * WINDOW_PER_WORKER);

    let mut list = ListWriter::start(writer, id, cache_path)?;
    let mut done = Counts::default();
    let mut paths = consistency::FilePaths::default();
    while let Some(outcome) = outcomes.next().await {
        match outcome? {
            Outcome::Skipped(s) => {
                if cfg.backup.on_unreadable == OnUnreadable::Fail {
                    return Err(Error::Other(format!(
                        "cannot back up {}: {}; fix or remove it, or set [backup] on_unreadable = \"warn\"",
                        s.path, s.error
                    )));
                }
                tracing::warn!(path = %s.path, error = %s.error, "skipped unreadable file");
                done.skipped.push(s);
            }
            Outcome::Excluded => done.excluded += 1,
            Outcome::Entry {
                entry,
                found,
                stored,
                ahead,
            } => {
                done.files_read_ahead += u64::from(ahead);
                tally(&mut done, &entry, stored, progress);
                paths.push(&entry);
                list.push(entry, found).await?;
            }
        }
    }
    drop(outcomes);
    // Nothing may still be written for the read-ahead when the content is published.
    early.finish().await;
    let Lists {
        files: list,
        refs_sha256,
        cache,
    } = list.finish().await?;
    Ok(FilesDone {
        list,
        refs_sha256,
        cache,
        counts: done,
        paths,
        record: None,
    })
}

/// Files walked ahead of the oldest one still being stored, per worker.
const WINDOW_PER_WORKER: usize = 16;

/// Running totals of the files phase.
#[derive(Default)]
struct Counts {
    totals: Totals,
    skipped: Vec<Skipped>,
    files_new: u64,
    files_dedup: u64,
    files_unchanged: u64,
    files_read_ahead: u64,
    /// Paths `[immich] exclude` left out.
    excluded: u64,
    bytes_read: u64,
    bytes_stored: u64,
}

fn tally(done: &mut Counts, entry: &Entry, stored: Option<Stored>, progress: &Progress) {
    match entry.kind {
        EntryKind::Dir => done.totals.dirs += 1,
        EntryKind::Symlink => done.totals.symlinks += 1,
        EntryKind::File => {
            done.totals.files += 1;
            done.totals.bytes += entry.size;
            if progress.is_visible() {
                progress.inc(entry.size);
                progress.message(format!("{} files", done.totals.files));
            }
        }
    }
    match stored {
        Some(Stored::Unchanged) => done.files_unchanged += 1,
        Some(Stored::Deduplicated { read }) => {
            done.files_dedup += 1;
            done.bytes_read += read;
        }
        Some(Stored::Uploaded { read, stored }) => {
            done.files_new += 1;
            done.bytes_read += read;
            done.bytes_stored += stored;
        }
        None => {}
    }
}

/// Counts the bytes to back up in the background, so the bar has a total and an ETA.
fn spawn_scanner(tops: Vec<walk::Top>, progress: Progress) {
    tokio::task::spawn_blocking(move || {
        for top in tops {
            for e in walkdir::WalkDir::new(&top.path)
                .follow_links(false)
                .into_iter()
                .flatten()
            {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        progress.add_total(m.len());
                    }
                }
            }
        }
    });
}

enum ListItem {
    Entries(Vec<(Entry, Box<Found>)>),
    Done,
}

/// Bytes gathered before each call into a gzip encoder.
const GZ_INPUT_BUFFER: usize = 64 * 1024;

/// Entries sent to the list writer at once.
const LIST_BATCH: usize = 256;

/// Writes the file list, the refs and the new cache on a blocking thread, in walk order.
struct ListWriter {
    tx: mpsc::Sender<ListItem>,
    pending: Vec<(Entry, Box<Found>)>,
    handle: tokio::task::JoinHandle<Result<Lists>>,
}

impl ListWriter {
    fn start(writer: &Writer, id: &str, cache_path: &std::path::Path) -> Result<ListWriter> {
        let cache = CacheWriter::create(cache_path)?;
        let (tx, rx) = mpsc::channel(16);
        let (writer, id) = (writer.clone(), id.to_string());
        let handle = tokio::task::spawn_blocking(move || {
            let files = writer.sealed_writer(&Object::Files(id.clone()))?;
            let refs = writer.repo().plain_writer(&Object::Refs(id))?;
            write_lists(rx, files, refs, cache)
        });
        Ok(ListWriter {
            tx,
            pending: Vec::with_capacity(LIST_BATCH),
            handle,
        })
    }

    async fn send(&self, item: ListItem) -> Result<()> {
        if self.tx.send(item).await.is_err() {
            return Err(Error::Other("file list writer stopped".into()));
        }
        Ok(())
    }

    /// Add the next entry (in walk order).
    async fn push(&mut self, entry: Entry, found: Box<Found>) -> Result<()> {
        self.pending.push((entry, found));
        if self.pending.len() >= LIST_BATCH {
            let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(LIST_BATCH));
            self.send(ListItem::Entries(batch)).await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<Lists> {
        let batch = std::mem::take(&mut self.pending);
        self.send(ListItem::Entries(batch)).await?;
        self.send(ListItem::Done).await?;
        self.handle
            .await
            .map_err(|e| Error::Other(format!("file list writer: {e}")))?
    }
}

/// What the list writer wrote: the file list, the SHA-256 of the refs object, the new cache.
struct Lists {
    files: ObjectRef,
    refs_sha256: String,
    cache: CacheWriter,
}

fn write_lists(
    mut rx: mpsc::Receiver<ListItem>,
    sealed: SealedWriter,
    refs: ObjectWriter,
    mut cache: CacheWriter,
) -> Result<Lists> {
    let files_key = sealed.key().to_string();
    let io_err = |e: std::io::Error| crate::repo::write_error(&files_key, e);
    let header_mac = Some(hex::encode(sealed.header_mac()));
    // serde_json and writeln! write in small pieces: buffer them before the compressor.
    let gz = |w| BufWriter::with_capacity(GZ_INPUT_BUFFER, GzEncoder::new(w, Compression::fast()));
    let mut list = gz(HashingWriter::new(sealed));
    let mut refs = BufWriter::with_capacity(
        GZ_INPUT_BUFFER,
        GzEncoder::new(HashingWriter::new(refs), Compression::fast()),
    );
    let mut last_ref: Option<ContentId> = None;
    loop {
        match rx.blocking_recv() {
            Some(ListItem::Entries(batch)) => {
                for (entry, found) in batch {
                    serde_json::to_writer(&mut list, &entry).map_err(|e| io_err(e.into()))?;
                    list.write_all(b"\n").map_err(io_err)?;
                    if let Some(id) = entry.content {
                        if last_ref != Some(id) {
                            writeln!(refs, "{id}").map_err(io_err)?;
                            last_ref = Some(id);
                        }
                        cache.add(&found, id)?;
                    }
                }
            }
            Some(ListItem::Done) => break,
            None => {
                // The backup stopped: abandon both objects and the cache.
                cache.discard();
                return Err(Error::Interrupted);
            }
        }
    }
    let unbuffer = |w: BufWriter<_>| w.into_inner().map_err(|e| io_err(e.into_error()));
    let (sealed, sha256, size) = unbuffer(list)?.finish().map_err(io_err)?.into_parts();
    sealed.finish()?;
    let refs = refs.into_inner().map_err(|e| io_err(e.into_error()))?;
    let (refs, refs_sha256, _) = refs.finish().map_err(io_err)?.into_parts();
    refs.finish()?;
    Ok(Lists {
        files: ObjectRef {
            key: files_key,
            size,
            sha256,
            header_mac,
        },
        refs_sha256,
        cache,
    })
}
