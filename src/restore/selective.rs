//! Restoring a selection: a few files of a snapshot into any folder, without the database.
//!
//! Most restores are not disasters: trash emptied, an album's photos deleted, an upload wiped by a
//! phone app. This run restores the files of a snapshot that `--include`/`--exclude` globs (on
//! snapshot paths, `library/admin/2024/**`) and the Immich-aware criteria ([`super::select`]:
//! user, album, capture time, missing now) select, into `--target`, under their snapshot paths.
//! No database is touched and no fresh install is needed. A file already at its path and
//! identical is kept (so a run can simply be run again to finish); one that differs is left as it
//! is and listed, unless `--overwrite` (the new file is verified before it replaces the old one).
//! Each file is checked against its keyed content address before it gets its name, through the
//! same open-folder writes as a full restore ([`super::files`]): nothing is written outside the
//! target or through a symlink. A damaged content object is named, nothing is written at its path,
//! and every other file is still restored.
//!
//! With Immich criteria, `restored-assets.csv` in the target lists each selected asset (original
//! path, file name, capture time, owner, albums, what was done), for re-uploading through Immich.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use globset::{GlobSet, GlobSetBuilder};
use serde::Serialize;

use super::files::{self, Damaged, FileSink};
use super::select::{self, Asset, Criteria};
use super::target::{Folder, Kind, Target};
use crate::config::LockConfig;
use crate::crypto::Identities;
use crate::error::{Error, Result};
use crate::format::{ContentId, Entry, EntryKind, Manifest};
use crate::progress::Progress;
use crate::repo::lock::{Lock, LockKind};
use crate::repo::snapshots;
use crate::repo::trust::{self, Trust};
use crate::repo::{Reader, Repository};

/// The list of selected assets written into the target.
pub const ASSET_LIST: &str = "restored-assets.csv";

/// What to restore and where.
pub struct SelectOptions {
    /// `latest`, an id, or a unique id prefix.
    pub snapshot: String,
    pub trust: Trust,
    /// The store lock to take (shared); `None` with `--no-lock`.
    pub lock: Option<LockConfig>,
    /// Where the files go (under their snapshot paths). Required, except with `--missing-now`,
    /// whose default is a new folder `./immich-restore-<snapshot>-<YYYYMMDD>`.
    pub target: Option<PathBuf>,
    /// Globs on snapshot paths: a file is selected when it matches one (none: every file).
    pub include: Vec<String>,
    /// Globs on snapshot paths: a file matching one is left out.
    pub exclude: Vec<String>,
    /// Immich criteria, read from the snapshot's dump (`None`: files by globs only).
    pub criteria: Option<Criteria>,
    /// The restoring machine's `[immich] media_location` (how the dump's paths map).
    pub media_location: String,
    /// Where the external libraries are on this machine, by container path (`[immich]
    /// external_libraries`; a library not named is where it was backed up from): where
    /// `--missing-now` looks for their files.
    pub external_hosts: BTreeMap<String, PathBuf>,
    /// Replace files that differ from the snapshot's.
    pub overwrite: bool,
    /// List the selection and what would be done; write nothing.
    pub dry_run: bool,
    pub concurrency: usize,
    pub progress: Progress,
    pub keep_special_modes: bool,
    /// Leave owners alone (`--no-owner`); by default, as root, files get their recorded owners.
    pub no_owner: bool,
}

impl SelectOptions {
    /// Files of `snapshot` into `target` (select them with the other fields); the defaults
    /// otherwise.
    pub fn new(snapshot: &str, target: Option<PathBuf>, trust: Trust) -> SelectOptions {
        SelectOptions {
            snapshot: snapshot.to_string(),
            trust,
            lock: Some(LockConfig::default()),
            target,
            include: Vec::new(),
            exclude: Vec::new(),
            criteria: None,
            media_location: String::new(),
            external_hosts: BTreeMap::new(),
            overwrite: false,
            dry_run: false,
            concurrency: 8,
            progress: Progress::hidden(),
            keep_special_modes: false,
            no_owner: false,
        }
    }
}

/// What happened (or, with `--dry-run`, would happen) to one selected file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Written (dry run: would be).
    Restored,
    /// Already there and identical.
    Present,
    /// A different file (or a folder or symlink) is there: left as it was.
    Refused,
    /// A different file was there and was replaced (`--overwrite`).
    Overwritten,
    /// The content object is damaged or missing: nothing written.
    Damaged,
    /// The asset's original is not in the snapshot.
    NotInSnapshot,
}

/// One selected file.
#[derive(Debug, Clone, Serialize)]
pub struct SelectedFile {
    /// Its path in the snapshot (and under the target).
    pub path: String,
    pub size: u64,
    pub outcome: Outcome,
}

/// What a selective restore did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SelectReport {
    pub snapshot: String,
    pub signed_by: Option<String>,
    pub snapshot_time: String,
    pub source_host: String,
    pub target: String,
    pub dry_run: bool,
    /// Selected files and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Written (dry run: would be).
    pub files_restored: u64,
    pub files_already_present: u64,
    pub files_overwritten: u64,
    /// Files left as they were because a different file (or a folder or symlink) is at their path;
    /// pass `--overwrite` to replace files. Exit code 3.
    pub refused: Vec<String>,
    /// Files not restored: their content object is damaged or missing. Exit code 4.
    pub damaged: Vec<Damaged>,
    /// Every selected file (in file-list order).
    pub selected: Vec<SelectedFile>,
    /// The selected assets (Immich criteria only).
    pub assets: Vec<AssetOutcome>,
    /// Where the asset list was written (Immich criteria, not a dry run).
    pub asset_list: Option<String>,
    pub duration_secs: f64,
}

/// A selected asset and what happened to its original.
#[derive(Debug, Clone, Serialize)]
pub struct AssetOutcome {
    #[serde(flatten)]
    pub asset: Asset,
    pub outcome: Outcome,
}

/// Restore the selection.
pub async fn run(
    repo: &Repository,
    identities: Arc<Identities>,
    opts: SelectOptions,
) -> Result<SelectReport> {
    snapshots::require_marker(repo).await?;
    let reader = repo.unlock(identities).await?;
    match opts.lock.clone() {
        None => {
            tracing::warn!("--no-lock: restoring without the store lock; a prune running meanwhile could delete what this restore still has to read");
            restore(&reader, opts).await
        }
        Some(cfg) => {
            Lock::hold(
                repo,
                LockKind::Shared,
                "restore",
                &cfg,
                restore(&reader, opts),
            )
            .await
        }
    }
}

/// `globs` as one set (a bad one is a usage error naming its flag).
fn glob_set(globs: &[String], flag: &str) -> Result<Option<GlobSet>> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for g in globs {
        // `*` stays within a folder (`**` crosses them), as in restic and gitignore.
        let glob = globset::GlobBuilder::new(g.trim_start_matches('/'))
            .literal_separator(true)
            .build()
            .map_err(|e| Error::Usage(format!("{flag} {g:?}: {e}")))?;
        b.add(glob);
    }
    b.build()
        .map(Some)
        .map_err(|e| Error::Usage(format!("{flag}: {e}")))
}

/// Whether `path` (of a file, or one of its parent folders) is chosen by the globs: a glob that
/// names a folder selects everything under it.
fn chosen(set: &GlobSet, path: &str) -> bool {
    let mut at = path;
    loop {
        if set.is_match(at) {
            return true;
        }
        match at.rsplit_once('/') {
            Some((parent, _)) => at = parent,
            None => return false,
        }
    }
}

/// `--missing-now` looks for the files of the snapshot's external libraries where they are on
/// this machine: the host folders `hosts` names (by container path), else where they were backed up.
fn find_live_externals(
    criteria: &mut Criteria,
    manifest: &Manifest,
    hosts: &BTreeMap<String, PathBuf>,
) {
    if let Some(live) = criteria.missing_now.as_mut() {
        live.externals = super::view::external_targets(manifest, hosts)
            .into_iter()
            .zip(&manifest.external_libraries)
            .map(|((_, host), l)| (l.folder.clone(), host))
            .collect();
    }
}

/// `ls --assets`: the assets of `snapshot` that `criteria` select (as a selective restore would),
/// without restoring anything. Returns the snapshot's id with them.
pub async fn list_assets(
    reader: &Reader,
    trust: &Trust,
    snapshot: &str,
    mut criteria: Criteria,
    media_location: &str,
    external_hosts: &BTreeMap<String, PathBuf>,
) -> Result<(String, Vec<Asset>)> {
    let opened = trust::resolve(reader, trust, snapshot).await?;
    find_live_externals(&mut criteria, &opened.manifest, external_hosts);
    let assets = select::select(reader, &opened.manifest, &criteria, media_location).await?;
    Ok((opened.id, assets))
}

async fn restore(reader: &Reader, opts: SelectOptions) -> Result<SelectReport> {
    let started = Instant::now();
    let opened = trust::resolve(reader, &opts.trust, &opts.snapshot).await?;
    let (id, manifest) = (opened.id, opened.manifest);
    let key = super::parse_key(&manifest)?;
    let include = glob_set(&opts.include, "--include")?;
    let exclude = glob_set(&opts.exclude, "--exclude")?;
    let mut criteria = opts.criteria.clone();
    if let Some(c) = criteria.as_mut() {
        find_live_externals(c, &manifest, &opts.external_hosts);
    }
    let missing_now = criteria.as_ref().and_then(|c| c.missing_now.as_ref());
    let target_path = match (&opts.target, missing_now) {
        (Some(t), _) => t.clone(),
        (None, Some(_)) => PathBuf::from(format!(
            "immich-restore-{id}-{}",
            chrono::Local::now().format("%Y%m%d")
        )),
        (None, None) => {
            return Err(Error::Usage(
                "restoring a selection (--include, --exclude, --user, --album, --album-id, --taken-from/--taken-to) needs --target DIR: any folder, the files go under their snapshot paths (library/…, upload/…); only --missing-now has a default".into(),
            ))
        }
    };
    if let Some(live) = missing_now {
        refuse_live_target(&target_path, live.roots())?;
    }
    let assets = match &criteria {
        Some(c) => Some(select::select(reader, &manifest, c, &opts.media_location).await?),
        None => None,
    };
    // snapshot path → the selected asset whose original it is.
    let wanted: Option<HashMap<String, usize>> = assets.as_ref().map(|a| {
        a.iter()
            .enumerate()
            .filter_map(|(i, a)| Some((a.snapshot_path.clone()?, i)))
            .collect()
    });
    let globs = (include.clone(), exclude.clone());
    tracing::info!(snapshot = %id, target = %target_path.display(), "restoring a selection");
    let picked = files::scan_list(reader, &manifest, None, Vec::new(), move |out, e| {
        let selected = e.kind == EntryKind::File
            && wanted.as_ref().is_none_or(|w| w.contains_key(&e.path))
            && include.as_ref().is_none_or(|s| chosen(s, &e.path))
            && !exclude.as_ref().is_some_and(|s| chosen(s, &e.path));
        if selected {
            out.push(e);
        }
        Ok(())
    })
    .await?;
    let mut report = SelectReport {
        snapshot: id.clone(),
        signed_by: opened.signed_by.map(|k| k.to_string()),
        snapshot_time: manifest.time.to_rfc3339(),
        source_host: manifest.host.clone(),
        target: target_path.display().to_string(),
        dry_run: opts.dry_run,
        files: picked.len() as u64,
        bytes: picked.iter().map(|e| e.size).sum(),
        ..Default::default()
    };
    let target = Target::open(&target_path, !opts.dry_run)?.map(Arc::new);
    opts.progress.phase("restoring", Some(report.bytes));
    let outcomes = put_back(reader, &manifest, key, &opts, target.as_ref(), &picked).await?;
    opts.progress.finish();
    let mut damaged = Vec::new();
    let mut by_path: HashMap<&str, Outcome> = HashMap::new();
    for (e, (outcome, why)) in picked.iter().zip(&outcomes) {
        match outcome {
            Outcome::Restored => report.files_restored += 1,
            Outcome::Present => report.files_already_present += 1,
            Outcome::Overwritten => report.files_overwritten += 1,
            Outcome::Refused => report.refused.push(e.path.clone()),
            Outcome::Damaged => damaged.push(Damaged {
                path: e.path.clone(),
                object: e.content.map(|c| c.key()).unwrap_or_default(),
                reason: why.clone().unwrap_or_default(),
                also_in: Vec::new(),
            }),
            _ => {}
        }
        by_path.insert(&e.path, *outcome);
        report.selected.push(SelectedFile {
            path: e.path.clone(),
            size: e.size,
            outcome: *outcome,
        });
    }
    report.damaged = super::with_sharing(reader.repo(), damaged).await?;
    if let Some(assets) = assets {
        // The assets the globs leave out are not part of the selection.
        let (include, exclude) = globs;
        let kept = move |a: &Asset| {
            a.snapshot_path.as_deref().is_none_or(|p| {
                include.as_ref().is_none_or(|s| chosen(s, p))
                    && !exclude.as_ref().is_some_and(|s| chosen(s, p))
            })
        };
        report.assets = assets
            .into_iter()
            .filter(kept)
            .map(|a| {
                let outcome = a
                    .snapshot_path
                    .as_deref()
                    .and_then(|p| by_path.get(p).copied())
                    .unwrap_or(Outcome::NotInSnapshot);
                AssetOutcome { asset: a, outcome }
            })
            .collect();
        if let Some(t) = target.as_deref().filter(|_| !opts.dry_run) {
            write_asset_list(t, &report.assets)?;
            report.asset_list = Some(t.shown(ASSET_LIST).display().to_string());
        }
    }
    if let Some(t) = target.as_deref().filter(|_| !opts.dry_run) {
        t.sync()?;
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A `--missing-now` restore never goes into the live library (its files would be orphans
/// Immich does not know): refuse a target that is one of its folders or inside one.
fn refuse_live_target<'a>(target: &Path, live: impl Iterator<Item = &'a PathBuf>) -> Result<()> {
    let resolved = |p: &Path| {
        // The target may not exist yet: resolve its nearest existing ancestor.
        let mut at = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut rest = Vec::new();
        loop {
            if let Ok(c) = at.canonicalize() {
                return rest
                    .into_iter()
                    .rev()
                    .fold(c, |acc: PathBuf, n| acc.join(n));
            }
            match (at.file_name().map(|n| n.to_os_string()), at.parent()) {
                (Some(n), Some(parent)) => {
                    rest.push(n);
                    at = parent.to_path_buf();
                }
                _ => return p.to_path_buf(),
            }
        }
    };
    let t = resolved(target);
    for root in live {
        let r = resolved(root);
        if t.starts_with(&r) {
            return Err(Error::Usage(format!(
                "--missing-now restores into a folder of its own, never into the live library: {} is inside {} (UPLOAD_LOCATION or an external library); give another --target, or none for ./immich-restore-<snapshot>-<date>",
                target.display(),
                root.display()
            )));
        }
    }
    Ok(())
}

/// Put the picked files back (a dry run only looks): their outcome, and for a damaged one why.
async fn put_back(
    reader: &Reader,
    manifest: &Manifest,
    key: [u8; 32],
    opts: &SelectOptions,
    target: Option<&Arc<Target>>,
    picked: &[Entry],
) -> Result<Vec<(Outcome, Option<String>)>> {
    let sink = Arc::new(
        FileSink::new(
            target.map_or(Path::new("."), |t| t.path()),
            opts.keep_special_modes,
        )
        .with_owners(!opts.no_owner),
    );
    let list_key = manifest.files.key.clone();
    let jobs = picked.iter().cloned().map(|entry| {
        let target = target.cloned();
        let sink = sink.clone();
        let reader = reader.clone();
        let list_key = list_key.clone();
        let progress = opts.progress.clone();
        let (overwrite, dry_run) = (opts.overwrite, opts.dry_run);
        async move {
            let id = entry.content.ok_or_else(|| Error::Corrupt {
                object: list_key,
                message: format!("{} has no content address", entry.path),
            })?;
            let size = entry.size;
            let result = one_file(&reader, key, target, sink, entry, id, overwrite, dry_run).await;
            progress.inc(size);
            result
        }
    });
    futures::stream::iter(jobs)
        .buffered(super::files::in_flight(reader.repo(), opts.concurrency))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// What is at a selected file's path now.
enum There {
    Nothing,
    Same,
    /// A different regular file.
    Different,
    /// A folder, symlink or anything else: never replaced.
    Other,
}

/// Compare what `folder` holds at `name` with `entry` (never following a symlink).
fn what_is_there(
    folder: Option<&Folder>,
    name: &OsStr,
    entry: &Entry,
    key: &[u8; 32],
) -> io::Result<There> {
    let Some(folder) = folder else {
        return Ok(There::Nothing);
    };
    let Some(st) = folder.stat(name)? else {
        return Ok(There::Nothing);
    };
    if st.kind != Kind::File {
        return Ok(There::Other);
    }
    if st.size != entry.size {
        return Ok(There::Different);
    }
    let mut f = folder.open_file(name)?;
    let mut h = blake3::Hasher::new_keyed(key);
    io::copy(&mut f, &mut h)?;
    Ok(
        if Some(ContentId(*h.finalize().as_bytes())) == entry.content {
            There::Same
        } else {
            There::Different
        },
    )
}

/// Restore one file (or, in a dry run, say what would be done).
#[allow(clippy::too_many_arguments)]
async fn one_file(
    reader: &Reader,
    key: [u8; 32],
    target: Option<Arc<Target>>,
    sink: Arc<FileSink>,
    entry: Entry,
    id: ContentId,
    overwrite: bool,
    dry_run: bool,
) -> Result<(Outcome, Option<String>)> {
    let (parent, name) = entry.path.rsplit_once('/').unwrap_or(("", &entry.path));
    let (parent, name) = (parent.to_string(), name.to_string());
    let t = target.clone();
    let e = entry.clone();
    let (there, folder) = tokio::task::spawn_blocking(move || {
        let Some(t) = t else {
            return Ok((There::Nothing, None));
        };
        let folder = t.folder(&parent, false)?;
        let there = what_is_there(folder.as_ref(), OsStr::new(&name), &e, &key)
            .map_err(|err| t.error(&e.path, err))?;
        Ok::<_, Error>((there, folder))
    })
    .await
    .map_err(|e| Error::Other(format!("restore worker: {e}")))??;
    let replace = match there {
        There::Same => return Ok((Outcome::Present, None)),
        There::Other => return Ok((Outcome::Refused, None)),
        There::Different if !overwrite => return Ok((Outcome::Refused, None)),
        There::Different => true,
        There::Nothing => false,
    };
    let done = if replace {
        Outcome::Overwritten
    } else {
        Outcome::Restored
    };
    if dry_run {
        return Ok((done, None));
    }
    let target = target.expect("created unless a dry run");
    let path = entry.path.clone();
    let outcome = async {
        let fetched = reader.fetch_content(&id).await?;
        let target = target.clone();
        tokio::task::spawn_blocking(move || {
            let (parent, name) = entry.path.rsplit_once('/').unwrap_or(("", &entry.path));
            let folder = match folder {
                Some(f) => f,
                None => target.folder(parent, true)?.expect("created"),
            };
            let plain = fetched.open()?;
            if !replace {
                return files::restore_file(plain, &key, &folder, &entry, &sink, &target);
            }
            // Verified under another name first: a damaged object never costs the old file.
            let tmp = format!(".{name}.immich-backup-overwrite");
            let staged = Entry {
                path: super::target::join(parent, &tmp),
                ..entry.clone()
            };
            folder
                .remove_file(OsStr::new(&tmp))
                .map_err(|e| target.error(&staged.path, e))?;
            files::restore_file(plain, &key, &folder, &staged, &sink, &target)?;
            folder
                .rename(OsStr::new(&tmp), OsStr::new(name))
                .map_err(|e| target.error(&entry.path, e))
        })
        .await
        .map_err(|e| Error::Other(format!("restore worker: {e}")))?
    }
    .await;
    match outcome {
        Ok(()) => Ok((done, None)),
        Err(e @ (Error::Corrupt { .. } | Error::Missing { .. } | Error::WrongKey { .. })) => {
            tracing::warn!(path = %path, object = %id.key(), "not restored: {e}");
            Ok((Outcome::Damaged, Some(e.to_string())))
        }
        Err(e) => Err(e),
    }
}

/// `restored-assets.csv`: one row per selected asset, for re-uploading through Immich.
fn write_asset_list(target: &Target, assets: &[AssetOutcome]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let header = [
        "original_path",
        "snapshot_path",
        "file_name",
        "taken",
        "owner",
        "albums",
        "status",
        "outcome",
    ];
    let csv_err = |e: csv::Error| Error::Other(format!("{ASSET_LIST}: {e}"));
    w.write_record(header).map_err(csv_err)?;
    for a in assets {
        let outcome = serde_json::to_value(a.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        w.write_record([
            a.asset.original_path.as_str(),
            a.asset.snapshot_path.as_deref().unwrap_or(""),
            a.asset.file_name.as_str(),
            a.asset.taken.as_deref().unwrap_or(""),
            a.asset.owner.as_str(),
            a.asset.albums.join("; ").as_str(),
            a.asset.status.as_str(),
            outcome.as_str(),
        ])
        .map_err(csv_err)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::Other(format!("{ASSET_LIST}: {e}")))?;
    target
        .root()
        .replace_file(OsStr::new(ASSET_LIST), &bytes)
        .map_err(|e| target.error(ASSET_LIST, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_files_and_the_folders_they_are_in() {
        let set = glob_set(&["library/admin/2024".into(), "*.mp4".into()], "--include")
            .unwrap()
            .unwrap();
        assert!(chosen(&set, "library/admin/2024/IMG_1.jpg"));
        assert!(!chosen(&set, "library/admin/2023/IMG_1.jpg"));
        // `*` does not cross folders; `**` does.
        assert!(!chosen(&set, "upload/x/y.mp4"));
        let deep = glob_set(&["**/*.mp4".into()], "--include")
            .unwrap()
            .unwrap();
        assert!(chosen(&deep, "upload/x/y.mp4"));
        assert!(glob_set(&["a[".into()], "--include").is_err());
    }

    #[test]
    fn a_missing_now_target_is_never_the_live_library() {
        let dir = tempfile::tempdir().unwrap();
        let live = [dir.path().join("upload")];
        std::fs::create_dir_all(&live[0]).unwrap();
        assert!(refuse_live_target(&dir.path().join("upload"), live.iter()).is_err());
        assert!(refuse_live_target(&dir.path().join("upload/new/x"), live.iter()).is_err());
        assert!(refuse_live_target(&dir.path().join("restored"), live.iter()).is_ok());
    }
}
