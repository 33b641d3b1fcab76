//! Restore: store → decrypt → decompress → sink, onto a fresh install, from the config and the
//! identity alone.
//!
//! The orchestration lives here; [`database`] is the database half (checks, the dump checked and
//! replayed, row counts), [`files`] the files half (the target surveyed, files put back, damaged
//! ones listed), [`state`] the progress kept in the target so that a restore can be run again.
//! [`selective`] restores a selection (globs, or the Immich criteria [`select`] reads out of the
//! snapshot's dump) into any folder, files only.
//!
//! Order: take the shared store lock (a prune cannot delete what is being read); pick the newest
//! snapshot this repository's backup machine signed ([`crate::repo::trust`]); then, before anything is
//! written, side by side: the target database is fresh (or was restored from this very snapshot by
//! an interrupted run), the target folders hold nothing that is not the snapshot's, every content
//! object exists with a plausible size (one listing), and the dump verifies and holds nothing
//! `pg_dumpall` would not write; and no other client is connected to the databases the dump
//! re-creates. Then the dump is replayed while the files are put back; a file whose object is
//! damaged is listed, the others are all restored. Immich's folder markers are made whatever
//! happened before.

pub mod database;
pub mod dumpcheck;
pub mod files;
mod owner;
pub mod select;
pub mod selective;
pub mod state;
pub mod target;
pub mod view;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::config::LockConfig;
use crate::crypto::Identities;
use crate::db::Database;
use crate::error::{Error, Result};
use crate::format::{ContentId, Manifest, Object};
use crate::progress::Progress;
use crate::repo::lock::{Lock, LockKind};
use crate::repo::snapshots;
use crate::repo::trust::{self, Trust};
use crate::repo::{Reader, Repository};
use crate::restore::target::Target;
use crate::restore::view::View;

pub use database::{
    classify_psql_errors, is_benign_psql_error, RowCheck, SEARCH_PATH_FIX, SEARCH_PATH_LINE,
};
pub use files::{restored_mode, Damaged, FileSink};

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
    /// The store lock to take (shared); `None` with `--no-lock` (a read-only store).
    pub lock: Option<LockConfig>,
    /// Where the snapshot's external libraries go, by container path (`[immich]
    /// external_libraries` of the restoring machine); a library not named here goes back to the
    /// host path it was backed up from.
    pub external_targets: BTreeMap<String, PathBuf>,
    /// Leave owners alone (`--no-owner`); by default, running as root, each restored file, folder
    /// and symlink gets the uid and gid the snapshot records.
    pub no_owner: bool,
}

impl RestoreOptions {
    /// Restore `snapshot` into `target`, believing what `trust` says; the defaults otherwise.
    pub fn new(snapshot: &str, target: PathBuf, trust: Trust) -> RestoreOptions {
        RestoreOptions {
            snapshot: snapshot.to_string(),
            dry_run: false,
            target,
            concurrency: 8,
            progress: Progress::hidden(),
            trust,
            keep_special_modes: false,
            lock: Some(LockConfig::default()),
            external_targets: BTreeMap::new(),
            no_owner: false,
        }
    }
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
    /// The snapshot's external libraries and the folders they were restored to.
    pub external_targets: Vec<ExternalTarget>,
    pub database: String,
    pub server_version: String,
    /// The database was restored from this snapshot by an earlier, interrupted run; it was
    /// checked (row counts) and left as it was.
    pub database_resumed: bool,
    pub files: u64,
    pub bytes: u64,
    pub files_restored: u64,
    pub files_already_present: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files that could not be restored: their content object is damaged or missing. Everything
    /// else was restored; the exit code is 4.
    pub damaged: Vec<Damaged>,
    /// psql errors that a `pg_dumpall --clean` replay always produces (documented in the README).
    pub benign_psql_errors: Vec<String>,
    pub row_checks: Vec<RowCheck>,
    pub rows_match: bool,
    /// What could not be done but did not stop the restore (a marker behind a symlink).
    pub warnings: Vec<String>,
    pub duration_secs: f64,
}

/// An external library of the snapshot and where a restore puts it.
#[derive(Debug, Clone, Serialize)]
pub struct ExternalTarget {
    pub container_path: String,
    pub target: String,
}

/// One external library's target: its part of the file list, its folder, and the folder opened
/// (`None`: it does not exist yet).
struct Place {
    view: View,
    path: PathBuf,
    target: Option<Arc<Target>>,
}

/// The snapshot's external libraries' targets, opened (not created). A recorded host path is used
/// only from a signed snapshot: an unsigned manifest could name any folder, so then each library
/// must have its target in `opts.external_targets`. No target may be inside another.
fn external_places(manifest: &Manifest, opts: &RestoreOptions, signed: bool) -> Result<Vec<Place>> {
    let mut taken = vec![opts.target.clone()];
    let mut out = Vec::new();
    for (view, path) in view::external_targets(manifest, &opts.external_targets) {
        let library = &manifest.external_libraries[out.len()];
        if !signed && !opts.external_targets.contains_key(&library.container_path) {
            return Err(Error::Config(format!(
                "snapshot {} is not signed and holds the external library {} (recorded at {}); an unsigned manifest could name any folder, so give its target in [immich] external_libraries (container_path = {:?}, host_path = …)",
                manifest.id, library.container_path, library.host_path, library.container_path
            )));
        }
        if let Some(other) = taken
            .iter()
            .find(|t| path.starts_with(t) || t.starts_with(&path))
        {
            return Err(Error::Config(format!(
                "the external library {} would be restored to {}, inside (or around) {}; give it a folder of its own in [immich] external_libraries",
                library.container_path,
                path.display(),
                other.display()
            )));
        }
        taken.push(path.clone());
        let target = Target::open(&path, false)?.map(Arc::new);
        out.push(Place { view, path, target });
    }
    Ok(out)
}

/// Survey every target: UPLOAD_LOCATION's first, then the external libraries'.
async fn survey_all(
    reader: &Reader,
    manifest: &Manifest,
    key: &[u8; 32],
    main: (&View, Option<&Arc<Target>>),
    externals: &[Place],
) -> Result<Vec<files::Survey>> {
    let stored = Arc::new(files::Stored::list(reader.repo(), manifest).await?);
    let mut out = vec![files::survey(reader, manifest, key, main, stored.clone()).await?];
    for p in externals {
        let place = (&p.view, p.target.as_ref());
        out.push(files::survey(reader, manifest, key, place, stored.clone()).await?);
    }
    Ok(out)
}

/// Restore every target's files (UPLOAD_LOCATION's, then each external library's), creating the
/// external targets that do not exist yet.
async fn restore_all(
    reader: &Reader,
    manifest: &Manifest,
    key: [u8; 32],
    opts: &RestoreOptions,
    main: (&View, &Arc<Target>),
    externals: Vec<Place>,
    surveys: &[files::Survey],
) -> Result<files::FilesDone> {
    let mut done = files::restore_files(reader, manifest, key, opts, main, &surveys[0]).await?;
    for (p, survey) in externals.into_iter().zip(&surveys[1..]) {
        let target = match p.target {
            Some(t) => t,
            None => Arc::new(Target::open(&p.path, true)?.expect("created")),
        };
        let more =
            files::restore_files(reader, manifest, key, opts, (&p.view, &target), survey).await?;
        done.restored += more.restored;
        done.damaged.extend(more.damaged);
        done.owners.foreign += more.owners.foreign;
        done.owners.failed += more.owners.failed;
        done.owners.first_error = done.owners.first_error.or(more.owners.first_error);
    }
    Ok(done)
}

/// Read and decrypt a snapshot's manifest, without checking its signature (tests and tools; a
/// restore goes through [`crate::repo::trust`]).
pub async fn read_manifest(reader: &Reader, id: &str) -> Result<Manifest> {
    reader.open_json(&Object::Manifest(id.to_string())).await
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
    repo: &Repository,
    identities: Arc<Identities>,
    opts: RestoreOptions,
) -> Result<RestoreReport> {
    run_with(db, repo, identities, opts, ServerPolicy::Refuse).await
}

/// Run a restore as Immich's docs orchestrate it: the server container must not run (or, with
/// [`ServerPolicy::StopAndRestart`], is stopped first and started again at the end). When the
/// restore fails after it began writing, the server is left stopped: the install needs recreating.
pub async fn run_with(
    db: &dyn Database,
    repo: &Repository,
    identities: Arc<Identities>,
    opts: RestoreOptions,
    server: ServerPolicy,
) -> Result<RestoreReport> {
    let reader = repo.unlock(identities).await?;
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
    let result = locked(db, &reader, opts, &mut writing).await;
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

/// The restore under the store's shared lock (unless `--no-lock`).
async fn locked(
    db: &dyn Database,
    reader: &Reader,
    opts: RestoreOptions,
    writing: &mut bool,
) -> Result<RestoreReport> {
    let repo = reader.repo();
    snapshots::require_marker(repo).await?;
    let Some(cfg) = opts.lock.clone() else {
        tracing::warn!("--no-lock: restoring without the store lock; a prune running meanwhile could delete what this restore still has to read");
        return restore(db, reader, opts, writing).await;
    };
    let lock = Lock::acquire(repo, LockKind::Shared, "restore", &cfg)
        .await
        .map_err(|e| match e {
            Error::Storage { url, message } => Error::Storage {
                url,
                message: format!("cannot take the store lock ({message}); with read-only access to the store, pass --no-lock"),
            },
            other => other,
        })?;
    let result = tokio::select! {
        r = restore(db, reader, opts, writing) => r,
        e = lock.lost() => Err(e),
    };
    lock.release().await;
    result
}

async fn restore(
    db: &dyn Database,
    reader: &Reader,
    opts: RestoreOptions,
    writing: &mut bool,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let repo = reader.repo();
    let opened = trust::resolve(reader, &opts.trust, &opts.snapshot).await?;
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
    // Opened, not created: nothing is written until every check has passed.
    let target = Target::open(&opts.target, false)?.map(Arc::new);
    let main_view = View::upload_location(&manifest);
    let externals = external_places(&manifest, &opts, report.signed_by.is_some())?;
    report.external_targets = externals
        .iter()
        .zip(&manifest.external_libraries)
        .map(|(p, l)| ExternalTarget {
            container_path: l.container_path.clone(),
            target: p.path.display().to_string(),
        })
        .collect();
    let earlier = target.as_deref().and_then(state::read);
    let resumed = earlier
        .as_ref()
        .is_some_and(|s| s.snapshot == id && s.database == state::DatabaseStep::Replayed);

    // Checks, side by side, before anything is written; the database's verdict is told first.
    if db.ready_waits() {
        db.wait_ready().await?;
    }
    // (version, and for a resumed restore the row checks it made)
    let database_check = async {
        if resumed {
            resumed_database(db, &manifest)
                .await
                .map(|(v, rows)| (v, Some(rows)))
        } else {
            let checked = database::check_target(db, &manifest).await;
            explain_interrupted(checked, earlier.as_ref(), &id).map(|v| (v, None))
        }
    };
    let main = (&main_view, target.as_ref());
    let files_check = survey_all(reader, &manifest, &key, main, &externals);
    let dump_check = async {
        if resumed {
            Ok(None)
        } else {
            database::verify_dump(reader, &manifest).await.map(Some)
        }
    };
    let (version, surveys, facts) = tokio::join!(database_check, files_check, dump_check);
    let (version, resumed_rows) = version?;
    report.server_version = version;
    let mut surveys = surveys?;
    let facts = facts?;
    if let Some(facts) = &facts {
        database::check_no_sessions(db, &manifest, facts).await?;
    }
    report.files_already_present = surveys.iter().map(|s| s.present.len() as u64).sum();
    report.database_resumed = resumed;
    let damaged: Vec<Damaged> = surveys
        .iter_mut()
        .flat_map(|s| std::mem::take(&mut s.damaged))
        .collect();
    if !damaged.is_empty() {
        tracing::warn!(
            files = damaged.len(),
            "some content objects are missing or damaged; every other file will be restored"
        );
    }
    if opts.dry_run {
        report.damaged = with_sharing(repo, damaged).await?;
        report.duration_secs = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let target = match target {
        Some(t) => t,
        None => Arc::new(Target::open(&opts.target, true)?.expect("created")),
    };

    // The database and the files, side by side (psql works while the files are decrypted). Both
    // run to the end even when one fails, so neither is cut off half-way.
    *writing = true;
    opts.progress.phase(
        "restoring",
        Some(if resumed { 0 } else { manifest.dump.size } + manifest.totals.bytes),
    );
    let database = async {
        if let Some(rows) = resumed_rows {
            return Ok((Vec::new(), rows));
        }
        state::write(&target, &id, state::DatabaseStep::Replaying)?;
        let benign = database::replay(db, reader, &manifest, &opts.progress).await?;
        // The rows are counted as soon as the dump is in, while files may still be written.
        let rows = database::compare_rows(db, &manifest).await?;
        if rows.iter().all(|r| r.expected == r.actual) {
            state::write(&target, &id, state::DatabaseStep::Replayed)?;
        }
        Ok::<_, Error>((benign, rows))
    };
    let main = (&main_view, &target);
    let files = restore_all(reader, &manifest, key, &opts, main, externals, &surveys);
    let (replayed, restored) = tokio::join!(database, files);
    // Immich's folders and markers, whatever happened above: Immich does not start without them.
    let folders = restored.as_ref().map(|r| &r.folders[..]).unwrap_or(&[]);
    report.warnings = files::make_markers(&target, folders, !opts.no_owner);
    let (benign, row_checks) = replayed?;
    let restored = restored?;
    restored.owners.tell();
    opts.progress.finish();
    report.benign_psql_errors = benign;
    report.files_restored = restored.restored;
    report.damaged = with_sharing(repo, restored.damaged).await?;
    report.row_checks = row_checks;
    report.rows_match = report.row_checks.iter().all(|r| r.expected == r.actual);
    if report.rows_match && report.damaged.is_empty() {
        state::remove(&target)?;
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// An earlier run restored this snapshot's database: it must still hold exactly the snapshot's
/// rows. Returns the server's version and the row checks.
async fn resumed_database(
    db: &dyn Database,
    manifest: &Manifest,
) -> Result<(String, Vec<RowCheck>)> {
    let rows = database::compare_rows(db, manifest).await?;
    if let Some(bad) = rows.iter().find(|r| r.expected != r.actual) {
        return Err(Error::NotFresh {
            reason: format!(
                "an earlier restore of this snapshot replayed the database, but it has changed since (table {}: {:?} rows, the snapshot has {:?})",
                bad.table, bad.actual, bad.expected
            ),
            remedy: "Recreate the database (the files already restored are kept) and restore again".into(),
        });
    }
    tracing::info!(
        "the database was restored from this snapshot by an earlier run; finishing the files"
    );
    let survey = crate::db::survey(db, &manifest.database.database).await?;
    Ok((survey.version, rows))
}

/// A database that is not fresh because an earlier restore was interrupted while replaying it:
/// say so.
fn explain_interrupted(
    checked: Result<String>,
    earlier: Option<&state::State>,
    id: &str,
) -> Result<String> {
    match (checked, earlier) {
        (Err(Error::NotFresh { reason, .. }), Some(s)) if s.database == state::DatabaseStep::Replaying => {
            Err(Error::NotFresh {
                reason: format!(
                    "{reason}; an earlier restore of snapshot {} stopped while it replayed the dump, so the database is half-restored",
                    s.snapshot
                ),
                remedy: format!(
                    "Recreate the database (Immich's default DB_DATA_LOCATION is a bind mount that `docker compose down -v` keeps: `docker compose down`, remove that folder, ./postgres by default, `docker compose create`, start only the database) and run the restore of {id} again: the files already restored are kept"
                ),
            })
        }
        (r, _) => r,
    }
}

/// Fill in which other snapshots share each damaged object.
async fn with_sharing(repo: &Repository, mut damaged: Vec<Damaged>) -> Result<Vec<Damaged>> {
    let ids: HashSet<ContentId> = damaged
        .iter()
        .filter_map(|d| ContentId::from_key(&d.object))
        .collect();
    let shared = files::shared_by(repo, &ids).await?;
    for d in &mut damaged {
        if let Some(s) = ContentId::from_key(&d.object).and_then(|c| shared.get(&c)) {
            d.also_in = s.clone();
        }
    }
    damaged.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(damaged)
}

pub(crate) fn parse_key(manifest: &Manifest) -> Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(&manifest.content_key, &mut key).map_err(|e| Error::Corrupt {
        object: Object::Manifest(manifest.id.clone()).key(),
        message: format!("bad content key: {e}"),
    })?;
    Ok(key)
}
