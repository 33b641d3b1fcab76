//! The files half of a restore: survey the target, put every file back that can be, and say which
//! could not.
//!
//! Everything here works on the opened target ([`crate::restore::target`]): one folder at a time, never
//! through a symlink, with paths of any length. Before anything is written, one pass over the file
//! list compares it with what the target already holds (anything extra, or different, refuses the
//! restore; identical files are kept, so a restore can be run again) and with one listing of the
//! store's content (a missing object, or one whose size no age file of that file can have, is known
//! to be damaged before the database is touched). Then each file is decrypted into an unnamed file
//! in its folder, checked against its keyed content address, and only then given its name; a file
//! whose object turns out damaged is listed, and every other file is still restored. Symlinks and
//! folder modes come last, and Immich's folders and `.immich` markers are made whatever happened
//! before (never through a symlink).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use flate2::read::GzDecoder;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::database::HashingReader;
use super::RestoreOptions;
use crate::error::{Error, Result};
use crate::format::walk_order;
use crate::format::{self, ContentId, Entry, EntryKind, Manifest, Object};
use crate::repo::snapshots;
use crate::repo::{read_error, sealed_payload_len, Reader, Repository, Unsealed};
use crate::restore::owner::{OwnerTotals, Owners};
use crate::restore::target::{self, Folder, Kind, Target};
use crate::restore::view::{self, View};
use crate::store::directio::{self, DirectWriter, NewFiles};

/// A file that could not be restored because its content object is damaged or missing.
#[derive(Debug, Clone, Serialize)]
pub struct Damaged {
    pub path: String,
    /// The content object, `data/ab/abcd…`.
    pub object: String,
    pub reason: String,
    /// Other complete snapshots that use the same object (and so lack this content too).
    pub also_in: Vec<String>,
}

/// A snapshot path made safe: relative, plain components, first one an originals folder, or in one
/// of the snapshot's external libraries.
pub(crate) fn check_path(manifest: &Manifest, rel: &str) -> Result<()> {
    let p = std::path::Path::new(rel);
    let plain = !rel.is_empty()
        && !rel.contains('\0')
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    let in_folders = p
        .components()
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .is_some_and(|f| manifest.folders.iter().any(|m| m == f));
    if !(plain && (in_folders || view::in_external_library(manifest, rel))) {
        return Err(Error::Corrupt {
            object: files_object(manifest).key(),
            message: format!(
                "unsafe path {rel:?} in the file list; refusing to write outside the target"
            ),
        });
    }
    Ok(())
}

/// The snapshot's file list, as an object.
fn files_object(manifest: &Manifest) -> Object {
    Object::Files(manifest.id.clone())
}

/// `(parent, name)` of a checked snapshot path.
fn split(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

/// Stream the decrypted file list through `f`, in order, checking it against the manifest.
fn for_each_entry(
    plain: Unsealed,
    manifest: &Manifest,
    mut f: impl FnMut(Entry) -> Result<()>,
) -> Result<()> {
    let key = &manifest.files.key;
    let hashing = HashingReader::new(plain);
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
        check_path(manifest, &entry.path)?;
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

/// Start walking the file list on a blocking thread, calling `f` for each entry of `view`, with
/// its path relative to the view's target; the handle gives `state` back at the end.
async fn spawn_scan<T: Send + 'static>(
    reader: &Reader,
    manifest: &Manifest,
    view: Option<&View>,
    state: T,
    mut f: impl FnMut(&mut T, Entry) -> Result<()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<Result<T>>> {
    let list = reader
        .fetch(&files_object(manifest), &manifest.files)
        .await?;
    let (manifest, view) = (manifest.clone(), view.cloned());
    Ok(tokio::task::spawn_blocking(move || {
        let mut state = state;
        for_each_entry(list.open()?, &manifest, |mut e| {
            let Some(view) = &view else {
                return f(&mut state, e);
            };
            let Some(rel) = view.rel(&e.path) else {
                return Ok(());
            };
            let cut = e.path.len() - rel.len();
            e.path.drain(..cut);
            f(&mut state, e)
        })?;
        Ok(state)
    }))
}

/// Walk the file list on a blocking thread, calling `f` for each entry of `view` (`None`: every
/// entry, with its path in the snapshot).
pub(crate) async fn scan_list<T: Send + 'static>(
    reader: &Reader,
    manifest: &Manifest,
    view: Option<&View>,
    state: T,
    f: impl FnMut(&mut T, Entry) -> Result<()> + Send + 'static,
) -> Result<T> {
    spawn_scan(reader, manifest, view, state, f)
        .await?
        .await
        .map_err(|e| Error::Other(format!("file list reader: {e}")))?
}

/// The store's content objects and their sizes, from one listing, and the size of the age header
/// this snapshot's objects have (measured on its file list: the same recipients wrote both).
///
/// Each object is kept as the first 8 bytes of its address and its size: 16 bytes, so a million
/// objects take 16 MiB. (Two addresses sharing 8 bytes among a million objects is a one in ten
/// million chance, and would only let a missing object go unnoticed until its download fails.)
pub struct Stored {
    sizes: Vec<(u64, u64)>,
    header: Option<u64>,
}

/// The length of the age header of a snapshot's objects, from its file list's stored size
/// `files_stored` (the same recipients sealed the list and the content, so their headers match).
pub(crate) fn header_len(manifest: &Manifest, files_stored: u64) -> Option<u64> {
    files_stored.checked_sub(sealed_payload_len(manifest.files.size))
}

/// The first 8 bytes of an address.
fn short(id: &ContentId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

impl Stored {
    /// List `data/` once.
    pub async fn list(repo: &Repository, manifest: &Manifest) -> Result<Stored> {
        let mut sizes: Vec<(u64, u64)> = repo
            .content_sizes()
            .map_ok(|(id, size)| (short(&id), size))
            .try_collect()
            .await?;
        sizes.sort_unstable();
        let list_size = repo.size(&files_object(manifest)).await?;
        let header = list_size.and_then(|s| header_len(manifest, s));
        Ok(Stored { sizes, header })
    }

    /// Why the object for `entry` cannot hold its content, if it cannot.
    pub fn damage(&self, id: &ContentId, len: u64) -> Option<String> {
        let Ok(i) = self.sizes.binary_search_by(|(c, _)| c.cmp(&short(id))) else {
            return Some("the object is missing from the store".into());
        };
        let stored = self.sizes[i].1;
        let expected = self.header? + sealed_payload_len(len);
        (stored != expected).then(|| {
            format!(
                "the object is {stored} bytes, but an age file of this {len}-byte file is {expected}: truncated or damaged"
            )
        })
    }
}

/// What the target holds already, compared with the snapshot.
#[derive(Default)]
pub(crate) struct Survey {
    /// Files already in place and identical (an interrupted restore being resumed).
    pub present: HashSet<String>,
    /// Immich markers (`<folder>/.immich`) in the target that differ from the snapshot's: made by an
    /// earlier restore that failed (markers are made whatever happens), replaced by the snapshot's.
    pub stale_markers: HashSet<String>,
    /// Partial files an interrupted restore left (removed before this one writes).
    pub stale_partials: Vec<String>,
    /// Files whose object is missing, or has a size no age file of the file can have (what a dry
    /// run reports; a restore tries them anyway and lists what fails).
    pub damaged: Vec<Damaged>,
}

/// Compare `view`'s part of the file list with its target and with the store's listing; refuse
/// when the target holds anything that is not the snapshot's.
pub(crate) async fn survey(
    reader: &Reader,
    manifest: &Manifest,
    key: &[u8; 32],
    (view, target): (&View, Option<&Arc<Target>>),
    stored: Arc<Stored>,
) -> Result<Survey> {
    let folders = view.folders().map(<[String]>::to_vec);
    let existing = match target {
        Some(t) => walk_target(t.clone(), folders).await?,
        None => Vec::new(),
    };
    let key = *key;
    let target = target.cloned();
    let merging = target.clone();
    let state = Merge {
        view: view.clone(),
        existing,
        next: 0,
        extras: Vec::new(),
        differing: Vec::new(),
        survey: Survey::default(),
        parent: None,
    };
    let merged = scan_list(reader, manifest, Some(view), state, move |m, e| {
        m.entry(merging.as_deref(), &key, &stored, e)
    })
    .await?;
    let Merge {
        existing,
        next,
        mut extras,
        differing,
        mut survey,
        ..
    } = merged;
    extras.extend(existing[next..].iter().map(|(p, _)| p.clone()));
    if !view.is_external() {
        extras.retain(|p| !is_folder_or_marker(p));
    }
    // What a restore killed while it wrote a file under a partial name left: removed, not extra.
    let (partials, extras): (Vec<String>, Vec<String>) =
        extras.into_iter().partition(|p| is_partial(p));
    survey.stale_partials = partials;
    let shown = |p: &str| target_path(target.as_deref(), p);
    if let Some(first) = extras.first() {
        return Err(not_fresh_files(
            view,
            format!(
                "the target holds {} path(s) that are not in the snapshot (first: {})",
                extras.len(),
                shown(first)
            ),
        ));
    }
    if let Some(first) = differing.first() {
        return Err(not_fresh_files(
            view,
            format!(
                "the target already holds {} file(s) that differ from the snapshot (first: {})",
                differing.len(),
                shown(first)
            ),
        ));
    }
    Ok(survey)
}

/// The originals folders and their markers are not extra.
fn is_folder_or_marker(p: &str) -> bool {
    !p.contains('/') || is_marker(p)
}

/// A file a restore writes before it has verified it (where unnamed files are not possible).
fn is_partial(p: &str) -> bool {
    let name = split(p).1;
    name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)
}

/// The end of the name of a file being restored, see [`FileSink`].
const PARTIAL_SUFFIX: &str = ".immich-backup-partial";

/// `<folder>/.immich`, Immich's marker.
fn is_marker(p: &str) -> bool {
    p.split_once('/')
        .is_some_and(|(_, name)| name == crate::immich::MARKER_FILE)
}

fn not_fresh_files(view: &View, reason: String) -> Error {
    let remedy = if view.is_external() {
        "Restore the external library into an empty folder (move the existing files away first, or give its container path another host_path in [immich] external_libraries); files identical to the snapshot's are kept"
    } else {
        "Restore into an empty UPLOAD_LOCATION (move the existing files away first); files identical to the snapshot's are kept"
    };
    Error::NotFresh {
        reason,
        remedy: remedy.into(),
    }
}

/// `rel` as it is on disk under `target` (for messages); as it is when there is no target.
fn target_path(target: Option<&Target>, rel: &str) -> String {
    match target {
        Some(t) => t.shown(rel).display().to_string(),
        None => rel.to_string(),
    }
}

/// The state of the merge of the target's walk with the file list.
struct Merge {
    view: View,
    existing: Vec<(String, Kind)>,
    next: usize,
    extras: Vec<String>,
    differing: Vec<String>,
    survey: Survey,
    /// The last folder opened to compare a file (files come folder by folder).
    parent: Option<Folder>,
}

impl Merge {
    fn entry(
        &mut self,
        target: Option<&Target>,
        key: &[u8; 32],
        stored: &Stored,
        e: Entry,
    ) -> Result<()> {
        while self.next < self.existing.len()
            && walk_order(&self.existing[self.next].0, &e.path).is_lt()
        {
            self.extras.push(self.existing[self.next].0.clone());
            self.next += 1;
        }
        let there = if self.next < self.existing.len() && self.existing[self.next].0 == e.path {
            self.next += 1;
            Some(self.existing[self.next - 1].1)
        } else {
            None
        };
        if let (Some(kind), Some(target)) = (there, target) {
            if self.same(target, &e, kind, key)? {
                if e.kind == EntryKind::File {
                    self.survey.present.insert(e.path);
                }
            } else if e.kind == EntryKind::File && kind == Kind::File && is_marker(&e.path) {
                self.survey.stale_markers.insert(e.path);
            } else {
                self.differing.push(e.path);
            }
            return Ok(());
        }
        if let (EntryKind::File, Some(id)) = (e.kind, e.content) {
            if let Some(reason) = stored.damage(&id, e.size) {
                self.survey.damaged.push(Damaged {
                    path: self.view.snapshot_path(&e.path),
                    object: id.key(),
                    reason,
                    also_in: Vec::new(),
                });
            }
        }
        Ok(())
    }

    /// Whether what the target has at `e.path` (of `kind`) is exactly the snapshot's.
    fn same(&mut self, target: &Target, e: &Entry, kind: Kind, key: &[u8; 32]) -> Result<bool> {
        let (parent, name) = split(&e.path);
        let folder = match &self.parent {
            Some(f) if f.rel() == parent => f.clone(),
            _ => match target.folder(parent, false)? {
                Some(f) => {
                    self.parent = Some(f.clone());
                    f
                }
                None => return Ok(false),
            },
        };
        let name = OsStr::new(name);
        Ok(match (e.kind, kind) {
            (EntryKind::Dir, Kind::Dir) => true,
            (EntryKind::Symlink, Kind::Symlink) => {
                folder
                    .read_link(name)
                    .ok()
                    .as_deref()
                    .and_then(OsStr::to_str)
                    == e.target.as_deref()
            }
            (EntryKind::File, Kind::File) => {
                let hashed = folder.open_file(name).and_then(|mut f| {
                    if f.metadata()?.len() != e.size {
                        return Ok(None);
                    }
                    let mut h = blake3::Hasher::new_keyed(key);
                    io::copy(&mut f, &mut h)?;
                    Ok(Some(ContentId(*h.finalize().as_bytes())))
                });
                matches!(hashed, Ok(Some(id)) if Some(id) == e.content)
            }
            _ => false,
        })
    }
}

/// Everything under the target's originals folders (`None`: everything in the target), in walk
/// order (never following a symlink).
async fn walk_target(
    target: Arc<Target>,
    folders: Option<Vec<String>>,
) -> Result<Vec<(String, Kind)>> {
    tokio::task::spawn_blocking(move || {
        let Some(mut folders) = folders else {
            let mut out = Vec::new();
            walk_folder(&target, target.root(), &mut out)?;
            return Ok(out);
        };
        folders.sort();
        folders.dedup();
        let mut out = Vec::new();
        for f in folders {
            match target.root().stat(OsStr::new(&f)) {
                Ok(Some(st)) => {
                    out.push((f.clone(), st.kind));
                    if st.kind == Kind::Dir {
                        let folder = target.folder(&f, false)?.expect("it was just there");
                        walk_folder(&target, &folder, &mut out)?;
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(target.error(&f, e)),
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Other(format!("target walk: {e}")))?
}

fn walk_folder(target: &Target, folder: &Folder, out: &mut Vec<(String, Kind)>) -> Result<()> {
    let entries = folder
        .entries()
        .map_err(|e| target.error(folder.rel(), e))?;
    for (name, kind) in entries {
        let Some(name) = name.to_str() else {
            out.push((
                target::join(folder.rel(), &name.to_string_lossy()),
                Kind::Other,
            ));
            continue;
        };
        let rel = target::join(folder.rel(), name);
        out.push((rel.clone(), kind));
        if kind == Kind::Dir {
            let child = folder
                .child(name, false)
                .map_err(|e| target.error(&rel, e))?;
            if let Some(child) = child {
                walk_folder(target, &child, out)?;
            }
        }
    }
    Ok(())
}

/// The folders of the entries being restored, opened along the walk (entries come folder by folder,
/// depth first), created where missing.
struct Folders {
    target: Arc<Target>,
    open: Vec<Folder>,
}

impl Folders {
    /// The open folder `rel`, created where missing.
    fn get(&mut self, rel: &str) -> Result<Folder> {
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        // Keep the open folders that are a prefix of `rel`.
        let mut keep = 0;
        while keep < self.open.len()
            && keep < parts.len()
            && self.open[keep].rel() == parts[..=keep].join("/")
        {
            keep += 1;
        }
        self.open.truncate(keep);
        for i in keep..parts.len() {
            let parent = if i == 0 {
                self.target.root().clone()
            } else {
                self.open[i - 1].clone()
            };
            let child = parent
                .child(parts[i], true)
                .map_err(|e| self.target.error(&parts[..=i].join("/"), e))?
                .expect("created");
            self.open.push(child);
        }
        Ok(self
            .open
            .last()
            .cloned()
            .unwrap_or_else(|| self.target.root().clone()))
    }
}

/// One file to restore: its folder, its entry.
struct Job {
    folder: Folder,
    entry: Entry,
}

/// What [`restore_files`] did.
pub(crate) struct FilesDone {
    pub restored: u64,
    pub damaged: Vec<Damaged>,
    /// The originals folders the list records (UPLOAD_LOCATION's target only), for their owners.
    pub folders: Vec<Entry>,
    /// What could not be done about owners.
    pub owners: OwnerTotals,
}

/// Restore every file of the list that is not `present` (those the survey found damaged are tried
/// too: the survey's verdict comes from sizes alone); then symlinks, then folder modes and times;
/// sync once.
pub(crate) async fn restore_files(
    reader: &Reader,
    manifest: &Manifest,
    key: [u8; 32],
    opts: &RestoreOptions,
    (view, target): (&View, &Arc<Target>),
    survey: &Survey,
) -> Result<FilesDone> {
    let (tx, mut rx) = mpsc::channel::<Entry>(1024);
    let lister = spawn_scan(reader, manifest, Some(view), (), move |_, e| {
        tx.blocking_send(e).map_err(|_| Error::Interrupted)
    })
    .await?;
    for rel in &survey.stale_partials {
        let (parent, name) = split(rel);
        if let Some(folder) = target.folder(parent, false)? {
            folder
                .remove_file(OsStr::new(name))
                .map_err(|e| target.error(rel, e))?;
        }
    }
    let sink =
        Arc::new(FileSink::new(target.path(), opts.keep_special_modes).with_owners(!opts.no_owner));
    let present_sink = sink.clone();
    let list_key = manifest.files.key.clone();
    let mut folders = Folders {
        target: target.clone(),
        open: Vec::new(),
    };
    let mut dirs: Vec<Entry> = Vec::new();
    let mut links: Vec<Entry> = Vec::new();
    let mut damaged: Vec<Damaged> = Vec::new();
    let mut restored = 0u64;
    {
        let entries = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let jobs = entries
            .filter_map(|e| {
                let job = match e.kind {
                    EntryKind::Dir => folders.get(&e.path).map(|_| {
                        dirs.push(e);
                        None
                    }),
                    EntryKind::Symlink => {
                        links.push(e);
                        Ok(None)
                    }
                    EntryKind::File if survey.present.contains(&e.path) => {
                        // Restored by an earlier run: only its owner may still be missing.
                        folders.get(split(&e.path).0).and_then(|folder| {
                            present_sink
                                .fix_owner(&folder, &e)
                                .map_err(|err| target.error(&e.path, err))?;
                            Ok(None)
                        })
                    }
                    EntryKind::File => folders.get(split(&e.path).0).and_then(|folder| {
                        if survey.stale_markers.contains(&e.path) {
                            folder
                                .remove_file(OsStr::new(split(&e.path).1))
                                .map_err(|err| target.error(&e.path, err))?;
                        }
                        Ok(Some(Job { folder, entry: e }))
                    }),
                };
                async move { job.transpose() }
            })
            .map(|job| {
                let reader = reader.clone();
                let progress = opts.progress.clone();
                let sink = sink.clone();
                let target = target.clone();
                let list_key = list_key.clone();
                async move {
                    let Job { folder, entry } = job?;
                    let id = entry.content.ok_or_else(|| Error::Corrupt {
                        object: list_key,
                        message: format!("{} has no content address", entry.path),
                    })?;
                    let outcome = async {
                        let fetched = reader.fetch_content(&id).await?;
                        let entry = entry.clone();
                        tokio::task::spawn_blocking(move || {
                            let plain = fetched.open()?;
                            restore_file(plain, &key, &folder, &entry, &sink, &target)
                        })
                        .await
                        .map_err(|e| Error::Other(format!("restore worker: {e}")))?
                    }
                    .await;
                    progress.inc(entry.size);
                    Ok::<_, Error>((entry, id, outcome))
                }
            })
            .buffer_unordered(in_flight(reader.repo(), opts.concurrency));
        let mut jobs = std::pin::pin!(jobs);
        while let Some(r) = jobs.next().await {
            let (entry, id, outcome) = r?;
            match outcome {
                Ok(()) => restored += 1,
                Err(
                    e @ (Error::Corrupt { .. } | Error::Missing { .. } | Error::WrongKey { .. }),
                ) => {
                    tracing::warn!(path = %entry.path, object = %id.key(), "not restored: {e}");
                    damaged.push(Damaged {
                        path: view.snapshot_path(&entry.path),
                        object: id.key(),
                        reason: e.to_string(),
                        also_in: Vec::new(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
    lister
        .await
        .map_err(|e| Error::Other(format!("file list reader: {e}")))??;
    restore_links(target, &links, &sink)?;
    finish_folders(target, &mut dirs, &sink)?;
    target.sync()?;
    let folders = match view.is_external() {
        true => Vec::new(),
        false => dirs.into_iter().filter(|d| !d.path.contains('/')).collect(),
    };
    Ok(FilesDone {
        restored,
        damaged,
        folders,
        owners: sink.owners.totals(),
    })
}

/// Symlinks, after everything else (so none is ever on the way of a file being written).
fn restore_links(target: &Target, links: &[Entry], sink: &FileSink) -> Result<()> {
    for e in links {
        let (parent, name) = split(&e.path);
        let folder = target.folder(parent, true)?.expect("created");
        let name = OsStr::new(name);
        let exists = folder
            .stat(name)
            .map_err(|err| target.error(&e.path, err))?;
        if exists.is_none() {
            folder
                .symlink(e.target.as_deref().unwrap_or_default(), name)
                .map_err(|err| target.error(&e.path, err))?;
        }
        sink.owners.set_at(folder.fd(), name, e);
    }
    Ok(())
}

/// Folder owners, modes and times, deepest first (a read-only folder is finished after its
/// contents).
fn finish_folders(target: &Target, dirs: &mut [Entry], sink: &FileSink) -> Result<()> {
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.split('/').count()));
    for e in dirs.iter() {
        let folder = target.folder(&e.path, true)?.expect("created");
        sink.owners.set_fd(folder.fd(), e);
        folder
            .set_mode(sink.mode(e.mode))
            .and_then(|()| folder.set_mtime(e.mtime_ns))
            .map_err(|err| target.error(&e.path, err))?;
    }
    Ok(())
}

/// Where restored files are written: past the page cache where the file system allows, as
/// unnamed files (`O_TMPFILE`) given their name only once verified, or where the file system cannot
/// make those, under a hidden partial name renamed into place (directio.rs).
pub struct FileSink {
    files: NewFiles,
    /// Keep setuid, setgid and sticky bits ([`RestoreOptions::keep_special_modes`]).
    keep_special_modes: bool,
    /// The recorded owners, given back as root (owner.rs).
    owners: Owners,
}

/// A file being restored: unnamed, or at its partial name.
enum Partial {
    Unnamed,
    Named(std::ffi::OsString),
}

impl FileSink {
    /// A sink for files under `target`.
    pub fn new(target: &std::path::Path, keep_special_modes: bool) -> FileSink {
        FileSink {
            files: NewFiles::new(directio::suits(target)),
            keep_special_modes,
            owners: Owners::new(false),
        }
    }

    /// Give restored entries their recorded owners when `wanted` (and we are root).
    pub(crate) fn with_owners(mut self, wanted: bool) -> FileSink {
        self.owners = Owners::new(wanted);
        self
    }

    /// Give a file an earlier run restored its recorded owner (and its mode again, which chown
    /// may have cleared bits of).
    fn fix_owner(&self, folder: &Folder, entry: &Entry) -> io::Result<()> {
        if !self.owners.applies() || entry.uid.is_none() {
            return Ok(());
        }
        let file = folder.open_file(OsStr::new(split(&entry.path).1))?;
        if self.owners.set_fd(std::os::fd::AsFd::as_fd(&file), entry) {
            file.set_permissions(std::fs::Permissions::from_mode(self.mode(entry.mode)))?;
        }
        Ok(())
    }

    /// The mode to give a restored file or folder recorded with `mode`.
    fn mode(&self, mode: u32) -> u32 {
        restored_mode(mode, self.keep_special_modes)
    }

    /// A new file that will become `name` in `folder`, for `len` bytes.
    fn create(
        &self,
        folder: &Folder,
        name: &OsStr,
        len: u64,
    ) -> io::Result<(DirectWriter, Partial)> {
        if let Some(w) = self.files.unnamed_in(folder.fd(), 0o600, len)? {
            return Ok((w, Partial::Unnamed));
        }
        let mut tmp = std::ffi::OsString::from(".");
        tmp.push(name);
        tmp.push(PARTIAL_SUFFIX);
        let w = self.files.create_in(folder.fd(), &tmp, 0o600, len)?;
        Ok((w, Partial::Named(tmp)))
    }

    /// Give the verified file its name.
    fn publish(folder: &Folder, file: &File, partial: &Partial, name: &OsStr) -> io::Result<bool> {
        match partial {
            Partial::Named(tmp) => folder.rename(tmp, name).map(|()| true),
            Partial::Unnamed => folder.link_unnamed(file, name),
        }
    }
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

thread_local! {
    /// Each restore worker's read buffer (a fresh one per file would fault in new pages).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
}

/// Decrypt one content object into a new file in `folder`, verify it against its address, and
/// only then give it its name.
pub(crate) fn restore_file(
    mut plain: impl Read,
    key: &[u8; 32],
    folder: &Folder,
    entry: &Entry,
    sink: &FileSink,
    target: &Target,
) -> Result<()> {
    let id = entry.content.expect("checked by the caller");
    let object = id.key();
    let name = OsStr::new(split(&entry.path).1);
    let io_err = |e: io::Error| target.error(&entry.path, e);
    let (mut out, partial) = sink.create(folder, name, entry.size).map_err(io_err)?;
    let result = (|| {
        let mut hasher = blake3::Hasher::new_keyed(key);
        let mut len = 0u64;
        READ_BUFFER.with_borrow_mut(|buf| loop {
            let n = plain.read(buf).map_err(|e| read_error(&object, e))?;
            if n == 0 {
                return Ok::<_, Error>(());
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err)?;
            len += n as u64;
        })?;
        let out = out.finish().map_err(io_err)?;
        if len != entry.size || ContentId(*hasher.finalize().as_bytes()) != id {
            return Err(Error::Corrupt {
                object: object.clone(),
                message: format!("content does not match its address (for {})", entry.path),
            });
        }
        // Owner, mode and time through the open file (the owner first: chown clears setuid bits);
        // durability comes from one sync at the end.
        sink.owners.set_fd(std::os::fd::AsFd::as_fd(&out), entry);
        out.set_permissions(std::fs::Permissions::from_mode(sink.mode(entry.mode)))
            .map_err(io_err)?;
        out.set_modified(mtime(entry.mtime_ns)).map_err(io_err)?;
        crate::store::local::start_writeback(&out);
        if !FileSink::publish(folder, &out, &partial, name).map_err(io_err)? {
            return Err(Error::Other(format!(
                "{} appeared while it was being restored; is Immich running? Stop it and restore again",
                target.shown(&entry.path).display()
            )));
        }
        Ok(())
    })();
    if let (Err(_), Partial::Named(tmp)) = (&result, &partial) {
        let _ = folder.remove_file(tmp);
    }
    result
}

fn mtime(mtime_ns: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(mtime_ns.max(0) as u64)
}

/// Create Immich's six folders with their `.immich` markers, so the server starts; never through a
/// symlink. A folder or marker made here gets the owner the snapshot records for that folder, or
/// for its first originals folder (`folders`), when owners are given back (`owners`). Returns what
/// could not be done, as warnings.
pub(crate) fn make_markers(target: &Target, folders: &[Entry], owners: bool) -> Vec<String> {
    let stamp = chrono::Utc::now().timestamp_millis().to_string();
    let owners = Owners::new(owners);
    let mut warnings = Vec::new();
    for f in crate::immich::FOLDERS {
        let owner = folders.iter().find(|e| e.path == f).or(folders.first());
        let existed = matches!(target.root().stat(OsStr::new(f)), Ok(Some(_)));
        let made = target.root().child(f, true).and_then(|folder| {
            let folder = folder.expect("created");
            let marker = OsStr::new(crate::immich::MARKER_FILE);
            let made = folder.create_small(marker, stamp.as_bytes(), 0o644)?;
            if let Some(owner) = owner {
                if !existed {
                    owners.set_fd(folder.fd(), owner);
                }
                if made {
                    owners.set_at(folder.fd(), marker, owner);
                }
            }
            Ok(made)
        });
        if let Err(e) = made {
            let w = format!(
                "{}/.immich was not made: {}",
                target.shown(f).display(),
                target::explain(e)
            );
            tracing::warn!(
                "{w}; if {f} is meant to point elsewhere, create .immich there yourself"
            );
            warnings.push(w);
        }
    }
    warnings
}

/// The complete snapshots that use each of `objects` (from their plaintext `refs.txt.gz`).
pub(crate) async fn shared_by(
    repo: &Repository,
    objects: &HashSet<ContentId>,
) -> Result<HashMap<ContentId, Vec<String>>> {
    let mut out: HashMap<ContentId, Vec<String>> = HashMap::new();
    if objects.is_empty() {
        return Ok(out);
    }
    for (id, complete) in snapshots::list_ids(repo).await? {
        if !complete {
            continue;
        }
        let Ok(bytes) = repo.get(&Object::Refs(id.clone())).await else {
            continue;
        };
        // A damaged list tells what it can, up to where it is damaged.
        for c in format::parse_refs(&bytes).map_while(|c| c.ok()) {
            if objects.contains(&c) {
                out.entry(c).or_default().push(id.clone());
            }
        }
    }
    Ok(out)
}

/// Files fetched at once: `concurrency`, four times as many from a store across a network,
/// where each small file waits mostly on the round trip (every file streams through a bounded
/// buffer, so memory stays bounded either way).
pub(crate) fn in_flight(repo: &crate::repo::Repository, concurrency: usize) -> usize {
    let c = concurrency.max(1);
    if repo.store().is_remote() {
        c * 4
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file restored through each way of making it (unnamed, or under a partial name renamed
    /// into place) lands whole, with its mode, and leaves nothing else; a damaged one leaves nothing.
    #[test]
    fn files_are_published_only_when_verified_with_or_without_unnamed_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::generate_key();
        let id_file = dir.path().join("id.txt");
        crate::crypto::write_identity_file(&id_file, &key).unwrap();
        let identities = crate::crypto::Identities::load(&id_file).unwrap();
        let recipients =
            crate::crypto::Recipients::load(std::slice::from_ref(&key.recipient), None).unwrap();
        let content_key = recipients.content_key();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut sealed = recipients.encrypt(Vec::new()).unwrap();
        sealed.write_all(&data).unwrap();
        let sealed = sealed.finish().unwrap();
        let id = ContentId(*blake3::keyed_hash(&content_key, &data).as_bytes());
        for unnamed in [true, false] {
            let target = Target::open(&dir.path().join(format!("t-{unnamed}")), true)
                .unwrap()
                .unwrap();
            let folder = target.folder("library/a", true).unwrap().unwrap();
            let mut sink = FileSink::new(target.path(), false);
            if !unnamed {
                sink.files = sink.files.without_unnamed();
            }
            let entry = Entry {
                path: "library/a/x.jpg".into(),
                kind: EntryKind::File,
                size: data.len() as u64,
                mtime_ns: 1_600_000_000_000_000_000,
                mode: 0o4755,
                content: Some(id),
                target: None,
                uid: None,
                gid: None,
            };
            restore_file(
                identities.decrypt(&sealed[..], "x").unwrap(),
                &content_key,
                &folder,
                &entry,
                &sink,
                &target,
            )
            .unwrap();
            let path = target.shown(&entry.path);
            assert_eq!(std::fs::read(&path).unwrap(), data, "unnamed {unnamed}");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "setuid dropped");
            // A damaged object: an error, and nothing at its name or beside it.
            let mut bad = sealed.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 1;
            let other = Entry {
                path: "library/a/y.jpg".into(),
                ..entry.clone()
            };
            let err = restore_file(
                identities.decrypt(&bad[..], "x").unwrap(),
                &content_key,
                &folder,
                &other,
                &sink,
                &target,
            )
            .unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
            let names: Vec<_> = folder
                .entries()
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            assert_eq!(names, ["x.jpg"], "unnamed {unnamed}");
        }
    }
}
