//! Collecting the originals: walk the configured folders under UPLOAD_LOCATION in a stable order,
//! and decide per file whether its content must be read and stored.
//!
//! The walk is sorted (component-wise, as `Path`'s ordering), so the local metadata cache of the last
//! backup is merge-joined against it in constant memory: a file whose size, mtime, ctime and inode
//! match is not read again. Content is addressed by its keyed hash; what the store already holds is not
//! uploaded again. Symlinks are recorded, never followed; generated folders are never visited.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{Error, IoContext, Result};
use crate::format::{walk_order, ContentId, Entry, EntryKind, Object, DATA_DIR};
use crate::repo::{SealedWriter, Writer};
use crate::store::Store;

/// Files up to this size are read once into memory; larger ones are hashed, then streamed.
pub const SMALL_FILE: u64 = 4 * 1024 * 1024;
/// Read size for large files.
const READ_BUFFER: usize = 256 * 1024;

/// Buffers for small files, reused: a fresh allocation per file would fault in (and zero) new
/// pages every time, which cost more than the encryption. At most one per worker is kept.
#[derive(Default)]
pub struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_default()
    }

    fn give(&self, buf: Vec<u8>) {
        let mut kept = self.0.lock().expect("not poisoned");
        if kept.len() < MAX_KEPT_BUFFERS {
            kept.push(buf);
        }
    }
}

/// Small-file buffers kept for reuse (each up to [`SMALL_FILE`]).
const MAX_KEPT_BUFFERS: usize = 8;

/// One thing found by the walk, with the metadata the cache compares.
#[derive(Debug, Clone)]
pub struct Found {
    pub entry: Entry,
    /// Where to open it: its path, or, deep down, a path through its open folder
    /// (`/proc/self/fd/N/name`, see [`LONG_PATH`]) that `dir` keeps valid.
    pub abs: PathBuf,
    /// The open folder `abs` goes through, for paths too long to open by name.
    pub dir: Option<Arc<std::os::fd::OwnedFd>>,
    pub ino: u64,
    pub ctime_ns: i64,
    /// When the walk read this metadata (nanoseconds since the epoch).
    pub walked_ns: i64,
}

/// How long before the walk a file's last change must be for its metadata to stand for its content.
///
/// A file changed again within the same timestamp tick as the walk could keep its size, mtime and
/// ctime while its bytes differ ("racily clean", as git calls it). Ticks are a few milliseconds on
/// Linux file systems but 2 s on FAT/exFAT, and a network file system's clock may be a little off
/// ours: a file changed less than this before it was walked is read again next time.
pub const SETTLE_NS: i64 = 5_000_000_000;

impl Found {
    /// Whether the file's last change was long enough before the walk that, as long as its
    /// metadata stays the same, its content is the content read after this walk.
    pub fn settled(&self) -> bool {
        self.ctime_ns < self.walked_ns - SETTLE_NS
    }

    /// What says the file is unchanged while it stays the same: size, mtime, ctime, inode.
    pub fn metadata(&self) -> (u64, i64, i64, u64) {
        (
            self.entry.size,
            self.entry.mtime_ns,
            self.ctime_ns,
            self.ino,
        )
    }
}

/// Now, in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// What the walk yields.
#[derive(Debug)]
pub enum Walked {
    Found(Found),
    /// A path the walk could not read or cannot record; the policy decides what happens.
    Unreadable {
        path: String,
        error: String,
    },
}

/// Items the walk sends at once (one wake-up of the consumer per batch, not per file).
pub const WALK_BATCH: usize = 256;

/// Walk `folders` under `root` in sorted order, sending what it finds in batches. Runs on a
/// blocking thread.
///
/// Each folder's entries are read, sorted by name and `stat`ed relative to the open folder
/// (`fstatat` through `DirEntry::metadata`), so no path is resolved again from the root: a folder
/// is listed before its contents, exactly the order the cache is merged in ([`walk_order`]).
pub fn walk(root: &Path, folders: &[String], tx: mpsc::Sender<Vec<Walked>>) {
    let mut folders: Vec<&String> = folders.iter().collect();
    folders.sort();
    folders.dedup();
    let mut out = Batch {
        tx,
        items: Vec::with_capacity(WALK_BATCH),
    };
    for folder in folders {
        let top = root.join(folder);
        if !top.exists() {
            tracing::warn!(folder = %top.display(), "originals folder does not exist; nothing to back up there");
            continue;
        }
        let walked = describe(
            Some(folder.to_string()),
            &top,
            std::fs::symlink_metadata(&top),
            None,
        );
        let is_dir = matches!(&walked, Walked::Found(f) if f.entry.kind == EntryKind::Dir);
        if !out.push(walked) || (is_dir && !walk_dir(&Dir::Path(top), folder, &mut out)) {
            return; // the backup stopped
        }
    }
    out.flush();
}

/// Paths at least this long are walked through their open folder: the kernel refuses a path longer
/// than PATH_MAX (4096 bytes), so deep down each folder is opened relative to its parent
/// (`openat`, never following a symlink) and named `/proc/self/fd/N`.
pub const LONG_PATH: usize = 3072;

/// A folder being walked: by its path, or through an open descriptor.
enum Dir {
    Path(PathBuf),
    Open {
        fd: Arc<std::os::fd::OwnedFd>,
        proc: PathBuf,
    },
}

impl Dir {
    /// The path to list it by and to join names to.
    fn path(&self) -> &Path {
        match self {
            Dir::Path(p) => p,
            Dir::Open { proc, .. } => proc,
        }
    }

    /// The descriptor that keeps [`Dir::path`] valid, if any.
    fn keep(&self) -> Option<Arc<std::os::fd::OwnedFd>> {
        match self {
            Dir::Path(_) => None,
            Dir::Open { fd, .. } => Some(fd.clone()),
        }
    }

    /// The subfolder `name`.
    fn child(&self, name: &std::ffi::OsStr) -> io::Result<Dir> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let parent = match self {
            Dir::Path(p) => {
                let joined = p.join(name);
                if joined.as_os_str().len() < LONG_PATH {
                    return Ok(Dir::Path(joined));
                }
                Arc::new(rustix::fs::open(p.as_path(), flags, Mode::empty())?)
            }
            Dir::Open { fd, .. } => fd.clone(),
        };
        let fd = rustix::fs::openat(&*parent, name, flags, Mode::empty())?;
        let proc = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ));
        Ok(Dir::Open {
            fd: Arc::new(fd),
            proc,
        })
    }
}

/// Batches what the walk found; `false` once the receiver is gone.
struct Batch {
    tx: mpsc::Sender<Vec<Walked>>,
    items: Vec<Walked>,
}

impl Batch {
    fn push(&mut self, w: Walked) -> bool {
        self.items.push(w);
        self.items.len() < WALK_BATCH || self.flush()
    }

    fn flush(&mut self) -> bool {
        let items = std::mem::replace(&mut self.items, Vec::with_capacity(WALK_BATCH));
        items.is_empty() || self.tx.blocking_send(items).is_ok()
    }
}

/// The contents of folder `dir` (at `rel` under the root), depth first in name order; `false`
/// when the walk must stop.
fn walk_dir(dir: &Dir, rel: &str, out: &mut Batch) -> bool {
    let unreadable = |path: &str, e: io::Error| Walked::Unreadable {
        path: path.to_string(),
        error: e.to_string(),
    };
    let mut entries = Vec::new();
    match std::fs::read_dir(dir.path()) {
        Ok(listing) => {
            for e in listing {
                match e {
                    Ok(e) => entries.push(e),
                    Err(e) => return out.push(unreadable(rel, e)),
                }
            }
        }
        Err(e) => return out.push(unreadable(rel, e)),
    }
    entries.sort_unstable_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let child_rel = name.to_str().map(|n| format!("{rel}/{n}"));
        let path = e.path();
        let walked = describe(child_rel.clone(), &path, e.metadata(), dir.keep());
        let is_dir = matches!(&walked, Walked::Found(f) if f.entry.kind == EntryKind::Dir);
        if !out.push(walked) {
            return false;
        }
        if let (true, Some(child_rel)) = (is_dir, child_rel) {
            let walked = match dir.child(&name) {
                Ok(child) => walk_dir(&child, &child_rel, out),
                Err(e) => out.push(unreadable(&child_rel, e)),
            };
            if !walked {
                return false;
            }
        }
    }
    true
}

/// What the walk records for `p` (at `rel`, `None` when its name is not UTF-8), given its (not
/// followed) metadata; `dir` keeps `p` valid when it goes through an open folder.
fn describe(
    rel: Option<String>,
    p: &Path,
    meta: io::Result<std::fs::Metadata>,
    dir: Option<Arc<std::os::fd::OwnedFd>>,
) -> Walked {
    // Taken after the metadata was read.
    let walked_ns = now_ns();
    let Some(path) = rel else {
        return Walked::Unreadable {
            path: p.to_string_lossy().into_owned(),
            error: "file name is not valid UTF-8; rename it so it can be recorded".into(),
        };
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) => {
            return Walked::Unreadable {
                path,
                error: e.to_string(),
            }
        }
    };
    let ft = meta.file_type();
    let (kind, target) = if ft.is_file() {
        (EntryKind::File, None)
    } else if ft.is_dir() {
        (EntryKind::Dir, None)
    } else if ft.is_symlink() {
        match std::fs::read_link(p).map(|t| t.to_str().map(str::to_string)) {
            Ok(Some(t)) => (EntryKind::Symlink, Some(t)),
            Ok(None) => {
                return Walked::Unreadable {
                    path,
                    error: "symlink target is not valid UTF-8".into(),
                }
            }
            Err(e) => {
                return Walked::Unreadable {
                    path,
                    error: e.to_string(),
                }
            }
        }
    } else {
        return Walked::Unreadable {
            path,
            error: "not a regular file, folder or symlink".into(),
        };
    };
    let entry = Entry {
        path,
        kind,
        size: if kind == EntryKind::File {
            meta.size()
        } else {
            0
        },
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        mode: meta.mode() & 0o7777,
        content: None,
        target,
    };
    Walked::Found(Found {
        entry,
        abs: p.to_path_buf(),
        dir,
        ino: meta.ino(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        walked_ns,
    })
}

/// One line of the local metadata cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheLine {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub content: ContentId,
}

/// Reads the previous backup's cache in walk order; a missing or damaged cache just means misses.
pub struct CacheReader {
    lines: Option<std::io::Lines<BufReader<File>>>,
    next: Option<CacheLine>,
}

impl CacheReader {
    pub fn open(path: &Path) -> CacheReader {
        let lines = File::open(path).ok().map(|f| BufReader::new(f).lines());
        let mut r = CacheReader { lines, next: None };
        r.advance();
        r
    }

    fn advance(&mut self) {
        self.next = None;
        if let Some(lines) = &mut self.lines {
            match lines.next() {
                Some(Ok(l)) => match serde_json::from_str(&l) {
                    Ok(c) => self.next = Some(c),
                    Err(_) => self.lines = None,
                },
                _ => self.lines = None,
            }
        }
    }

    /// The cached line for `found`, if its metadata still matches.
    pub fn lookup(&mut self, found: &Found) -> Option<ContentId> {
        while let Some(c) = &self.next {
            match walk_order(&c.path, &found.entry.path) {
                Ordering::Less => self.advance(),
                Ordering::Equal => {
                    let hit = (c.size, c.mtime_ns, c.ctime_ns, c.ino) == found.metadata();
                    let id = c.content;
                    self.advance();
                    return hit.then_some(id);
                }
                Ordering::Greater => return None,
            }
        }
        None
    }
}

/// Writes the new cache next to the old one; it replaces the old one only when the snapshot is done.
pub struct CacheWriter {
    tmp: PathBuf,
    dest: PathBuf,
    out: BufWriter<File>,
}

impl CacheWriter {
    pub fn create(dest: &Path) -> Result<CacheWriter> {
        let dir = dest.parent().expect("cache file has a folder");
        std::fs::create_dir_all(dir).at(dir)?;
        remove_stale_temps(dest);
        let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
        let out = BufWriter::new(File::create(&tmp).at(&tmp)?);
        Ok(CacheWriter {
            tmp,
            dest: dest.to_path_buf(),
            out,
        })
    }

    /// Remember `found`'s content for the next backup, unless it changed too recently for its
    /// metadata to prove it unchanged next time ([`Found::settled`]).
    pub fn add(&mut self, found: &Found, content: ContentId) -> Result<()> {
        if !found.settled() {
            return Ok(());
        }
        let line = CacheLine {
            path: found.entry.path.clone(),
            size: found.entry.size,
            mtime_ns: found.entry.mtime_ns,
            ctime_ns: found.ctime_ns,
            ino: found.ino,
            content,
        };
        serde_json::to_writer(&mut self.out, &line)
            .map_err(io::Error::other)
            .at(&self.tmp)?;
        self.out.write_all(b"\n").at(&self.tmp)
    }

    /// Make this the cache the next backup reads.
    pub fn commit(self) -> Result<()> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .at(&self.tmp)?;
        file.sync_all().at(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.dest).at(&self.dest)
    }

    /// Drop the new cache (the backup failed).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Remove the temporary caches that killed runs left beside `dest` (`<name>.tmp<pid>` of a process
/// that no longer runs).
fn remove_stale_temps(dest: &Path) {
    let (Some(dir), Some(stem)) = (dest.parent(), dest.file_stem().and_then(|s| s.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(stem))
            .and_then(|r| r.strip_prefix(".tmp"))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What `backup --repair` replaces: stored content objects known to be damaged (named by a restore
/// or a check), and those whose stored size no age file of the file's size can have. A file whose
/// content is one of them is read again and, if it still hashes to that address, its object is
/// written again and replaces the damaged one in one step (a new object under a temporary name,
/// renamed over the old; on cloud stores an overwriting put, which is atomic), so no reader ever sees
/// half an object.
#[derive(Debug, Default)]
pub struct Repair {
    damaged: Mutex<HashSet<ContentId>>,
    /// Stored objects and their sizes (sorted), and the age header length of this store's objects.
    sizes: Vec<(ContentId, u64)>,
    header: u64,
    repaired: Mutex<Vec<ContentId>>,
    named: HashSet<ContentId>,
}

impl Repair {
    /// Repair `named` objects and any whose size in `sizes` cannot be right; `header` is the age
    /// header length of an object written to the configured recipients.
    pub fn new(named: HashSet<ContentId>, mut sizes: Vec<(ContentId, u64)>, header: u64) -> Repair {
        sizes.sort_unstable();
        Repair {
            damaged: Mutex::new(named.clone()),
            sizes,
            header,
            repaired: Mutex::default(),
            named,
        }
    }

    /// Whether `id` is to be replaced.
    pub fn is_damaged(&self, id: &ContentId) -> bool {
        self.damaged.lock().expect("not poisoned").contains(id)
    }

    /// Mark `id` damaged if it is stored with a size no age file of `len` bytes has.
    fn check_size(&self, id: &ContentId, len: u64) {
        if let Ok(i) = self.sizes.binary_search_by(|(c, _)| c.cmp(id)) {
            let expected = self.header + crate::repo::sealed_payload_len(len);
            if self.sizes[i].1 != expected {
                tracing::warn!(object = %id.key(), stored = self.sizes[i].1, expected, "stored object has the wrong size; storing it again");
                self.damaged.lock().expect("not poisoned").insert(*id);
            }
        }
    }

    /// Every stored content address (from the listing [`Repair::new`] was given).
    pub fn stored_ids(&self) -> Vec<ContentId> {
        self.sizes.iter().map(|(id, _)| *id).collect()
    }

    fn mark_repaired(&self, id: &ContentId) {
        self.repaired.lock().expect("not poisoned").push(*id);
    }

    /// The objects replaced, and the named ones no file of this backup has (so they could not be).
    pub fn outcome(&self) -> (Vec<ContentId>, Vec<ContentId>) {
        let mut repaired = self.repaired.lock().expect("not poisoned").clone();
        repaired.sort();
        repaired.dedup();
        let mut missed: Vec<ContentId> = self
            .named
            .iter()
            .filter(|id| !repaired.contains(id))
            .copied()
            .collect();
        missed.sort();
        (repaired, missed)
    }
}

/// The content addresses the store holds, plus what this run has added.
///
/// What this run added is remembered in memory, unless the store stages this run's content in a
/// local folder: then only the objects being written are kept here, and a finished one is looked up
/// in the staging folder, so memory does not grow with the number of new files (a first backup of a
/// million photos).
///
/// A file whose content another worker is storing waits for that upload: should it fail (its file
/// changed, or could not be read), this one stores the content itself, so no entry ever names
/// content that was not stored.
pub struct Known {
    listed: Vec<ContentId>,
    /// This run's content: `false` while it is being stored, `true` once stored.
    added: Mutex<HashMap<ContentId, bool>>,
    changed: Condvar,
    /// Workers waiting on `changed` (counted under the `added` lock): with none, no wake-up.
    waiting: std::sync::atomic::AtomicUsize,
    staged: Option<Store>,
    /// `backup --repair`: stored objects that do not count as stored.
    repair: Option<Arc<Repair>>,
}

impl Known {
    /// From a listing of `data/`.
    pub fn new(mut listed: Vec<ContentId>, store: &Store) -> Known {
        listed.sort_unstable();
        listed.dedup();
        Known {
            listed,
            added: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            waiting: Default::default(),
            staged: store.is_staging().then(|| store.clone()),
            repair: None,
        }
    }

    /// Content that `repair` marks damaged does not count as stored.
    pub fn with_repair(mut self, repair: Option<Arc<Repair>>) -> Known {
        self.repair = repair;
        self
    }

    /// Whether `id` is in the listing and not to be repaired.
    fn listed(&self, id: &ContentId) -> bool {
        self.listed.binary_search(id).is_ok()
            && !self.repair.as_ref().is_some_and(|r| r.is_damaged(id))
    }

    /// `backup --repair`: `id`, of a file of `len` bytes, is damaged if its stored size is wrong.
    pub fn check_size(&self, id: &ContentId, len: u64) {
        if let Some(r) = &self.repair {
            r.check_size(id, len);
        }
    }

    /// Whether storing `id` must replace a damaged stored object.
    pub fn replaces(&self, id: &ContentId) -> bool {
        self.repair.as_ref().is_some_and(|r| r.is_damaged(id))
            && self.listed.binary_search(id).is_ok()
    }

    fn is_staged(&self, id: &ContentId) -> bool {
        self.staged.as_ref().is_some_and(|s| s.is_staged(id))
    }

    fn added(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, bool>> {
        self.added.lock().expect("not poisoned")
    }

    /// Whether the store holds `id` (content still being stored does not count).
    pub fn contains(&self, id: &ContentId) -> bool {
        self.listed(id) || self.added().get(id) == Some(&true) || self.is_staged(id)
    }

    /// Claim `id` for upload; `None` when it is stored. While another worker is storing it, this
    /// waits for the outcome. Dropping the claim without [`Claim::stored`] releases it.
    fn claim(&self, id: &ContentId) -> Option<Claim<'_>> {
        if self.listed(id) {
            return None;
        }
        let mut added = self.added();
        loop {
            match added.get(id) {
                Some(true) => return None,
                Some(false) => {
                    self.waiting
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    added = self.changed.wait(added).expect("not poisoned");
                    self.waiting
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                None if self.is_staged(id) && !self.replaces(id) => return None,
                None => {
                    added.insert(*id, false);
                    return Some(Claim {
                        known: self,
                        id: *id,
                        stored: false,
                    });
                }
            }
        }
    }

    /// `id` is stored now.
    fn stored(&self, id: &ContentId) {
        let mut added = self.added();
        if self.staged.is_some() {
            added.remove(id); // the staging folder has it
        } else {
            added.insert(*id, true);
        }
        self.wake(added);
    }

    /// Wake the workers waiting for an upload's outcome, if any (`added` is still locked).
    fn wake(&self, added: std::sync::MutexGuard<'_, HashMap<ContentId, bool>>) {
        if self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            self.changed.notify_all();
        }
        drop(added);
    }

    /// Storing `id` failed: the next file with this content stores it.
    fn release(&self, id: &ContentId) {
        let mut added = self.added();
        added.remove(id);
        self.wake(added);
    }

    pub fn len(&self) -> usize {
        self.listed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }
}

/// The right, and the duty, to store one content object: released unless marked stored.
struct Claim<'a> {
    known: &'a Known,
    id: ContentId,
    stored: bool,
}

impl Claim<'_> {
    fn stored(mut self) {
        self.stored = true;
        self.known.stored(&self.id);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.stored {
            self.known.release(&self.id);
        }
    }
}

/// What storing one file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Unchanged since the last backup (cache hit); not read.
    Unchanged,
    /// Read; the content was already in the store.
    Deduplicated { read: u64 },
    /// Read and uploaded.
    Uploaded { read: u64, stored: u64 },
}

/// A failure storing one file: its source could not be read, or the store failed.
#[derive(Debug)]
pub enum StoreFileError {
    Source(String),
    Store(Error),
}

/// Everything the per-file work needs, shared by the workers.
pub struct FileStorer {
    pub writer: Writer,
    pub key: [u8; 32],
    pub known: Arc<Known>,
    pub buffers: Buffers,
}

/// What storing one file on a worker gave: the file, and its content or why it was not stored.
pub type Worked = (
    Found,
    std::result::Result<(ContentId, Stored), StoreFileError>,
);

impl FileStorer {
    /// Store `found` on a blocking thread once one of `workers` is free; `guard` is held until the
    /// thread is done with the file (even if the caller stops waiting).
    pub async fn store_on_worker(
        self: Arc<Self>,
        found: Found,
        workers: &tokio::sync::Semaphore,
        guard: impl Send + 'static,
    ) -> Result<Worked> {
        let _worker = workers
            .acquire()
            .await
            .map_err(|e| Error::Other(format!("file worker: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let res = self.store_file(&found);
            (found, res)
        })
        .await
        .map_err(|e| Error::Other(format!("file worker: {e}")))
    }

    /// Hash `found` and upload it unless the store has it. Runs on a blocking thread.
    pub fn store_file(
        &self,
        found: &Found,
    ) -> std::result::Result<(ContentId, Stored), StoreFileError> {
        let src = |e: io::Error| StoreFileError::Source(e.to_string());
        let mut file = File::open(&found.abs).map_err(src)?;
        if self.known.is_empty() {
            if let Some(sealed) = self.writer.unnamed_content_writer() {
                let sealed = sealed.map_err(StoreFileError::Store)?;
                return self.store_in_one_pass(file, sealed, found.entry.size);
            }
        }
        if found.entry.size <= SMALL_FILE {
            let mut data = self.buffers.take();
            let result = self.store_small(&mut file, &mut data, found.entry.size);
            self.buffers.give(data);
            return result;
        }
        let (id, read) = self.hash_stream(&mut file)?;
        self.known.check_size(&id, read);
        let Some(claim) = self.known.claim(&id) else {
            return Ok((id, Stored::Deduplicated { read }));
        };
        let file = File::open(&found.abs).map_err(src)?;
        let stored = self.upload(claim, Source::File(file), read)?;
        Ok((id, Stored::Uploaded { read, stored }))
    }

    /// A small file: read into `data` once, hashed, encrypted from memory.
    fn store_small(
        &self,
        file: &mut File,
        data: &mut Vec<u8>,
        size: u64,
    ) -> std::result::Result<(ContentId, Stored), StoreFileError> {
        data.clear();
        data.reserve(size as usize);
        file.read_to_end(data)
            .map_err(|e| StoreFileError::Source(e.to_string()))?;
        let id = ContentId(*blake3::keyed_hash(&self.key, data).as_bytes());
        let read = data.len() as u64;
        self.known.check_size(&id, read);
        let Some(claim) = self.known.claim(&id) else {
            return Ok((id, Stored::Deduplicated { read }));
        };
        self.upload(claim, Source::Memory(data), read)
            .map(|stored| (id, Stored::Uploaded { read, stored }))
    }

    /// The first backup into a local store: encrypt while hashing and name the object at the end,
    /// reading the file once, in pieces, instead of twice (hash, then encrypt) or whole into memory.
    /// With content already stored this would encrypt what is then dropped, so it is used only
    /// while the store holds none.
    fn store_in_one_pass(
        &self,
        mut file: File,
        mut sealed: SealedWriter,
        expect_len: u64,
    ) -> std::result::Result<(ContentId, Stored), StoreFileError> {
        let key = sealed.key().to_string();
        let (id, read) = self.copy_hashed(&mut file, &mut sealed, &key)?;
        if read != expect_len {
            return Err(changed_meanwhile());
        }
        let Some(claim) = self.known.claim(&id) else {
            return Ok((id, Stored::Deduplicated { read })); // dropping the writer abandons it
        };
        let stored = sealed.finish_as(&id).map_err(StoreFileError::Store)?;
        claim.stored();
        Ok((id, Stored::Uploaded { read, stored }))
    }

    fn hash_stream(
        &self,
        r: &mut impl Read,
    ) -> std::result::Result<(ContentId, u64), StoreFileError> {
        self.copy_hashed(r, &mut io::sink(), DATA_DIR)
    }

    /// Copy `src` into `dst` (the object `object`) through a reused buffer, hashing it on the way:
    /// (keyed hash, length).
    fn copy_hashed(
        &self,
        src: &mut impl Read,
        dst: &mut impl Write,
        object: &str,
    ) -> std::result::Result<(ContentId, u64), StoreFileError> {
        let mut buf = self.buffers.take();
        if buf.len() < READ_BUFFER {
            buf.resize(READ_BUFFER, 0);
        }
        let result = copy_hashed(&self.key, src, dst, object, &mut buf[..READ_BUFFER]);
        self.buffers.give(buf);
        result
    }

    /// Encrypt `src` into `data/…`, then complete the object.
    fn upload(
        &self,
        claim: Claim<'_>,
        src: Source<'_>,
        expect_len: u64,
    ) -> std::result::Result<u64, StoreFileError> {
        let stored = self.try_upload(&claim.id, src, expect_len)?;
        claim.stored();
        Ok(stored)
    }

    fn try_upload(
        &self,
        id: &ContentId,
        src: Source<'_>,
        expect_len: u64,
    ) -> std::result::Result<u64, StoreFileError> {
        let key = id.key();
        let replace = self.known.replaces(id);
        let mut sealed = if replace {
            self.writer.replacing_writer(id)
        } else {
            self.writer.sealed_writer(&Object::Content(*id))
        }
        .map_err(StoreFileError::Store)?;
        let unchanged = match src {
            // Hashed from these very bytes: nothing can have changed.
            Source::Memory(data) => {
                sealed
                    .write_all(data)
                    .map_err(|e| StoreFileError::Store(sealed.error(e)))?;
                true
            }
            Source::File(mut file) => {
                let (hashed, len) = self.copy_hashed(&mut file, &mut sealed, &key)?;
                len == expect_len && hashed == *id
            }
        };
        if !unchanged {
            return Err(changed_meanwhile()); // dropping the writer abandons the object
        }
        let stored = sealed.finish().map_err(StoreFileError::Store)?;
        if replace {
            tracing::info!(object = %key, "replaced a damaged object");
            if let Some(r) = &self.known.repair {
                r.mark_repaired(id);
            }
        }
        Ok(stored)
    }
}

/// Copy `src` into `dst` (the object `object`) through `buf`, hashing it on the way (large reads
/// let BLAKE3 hash many chunks at once): (keyed hash, length).
fn copy_hashed(
    key: &[u8; 32],
    src: &mut impl Read,
    dst: &mut impl Write,
    object: &str,
    buf: &mut [u8],
) -> std::result::Result<(ContentId, u64), StoreFileError> {
    let mut hasher = blake3::Hasher::new_keyed(key);
    let mut len = 0u64;
    loop {
        let n = match src.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreFileError::Source(e.to_string())),
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|e| StoreFileError::Store(crate::repo::write_error(object, e)))?;
        len += n as u64;
    }
    Ok((ContentId(*hasher.finalize().as_bytes()), len))
}

fn changed_meanwhile() -> StoreFileError {
    StoreFileError::Source("file changed while it was being backed up; run the backup again".into())
}

/// What [`FileStorer::upload`] encrypts: a small file already read (and hashed), or a large one
/// read again, which is hashed again on the way to prove it did not change.
enum Source<'a> {
    Memory(&'a [u8]),
    File(File),
}

/// Where the cache for this store, content key and source lives.
pub fn cache_file(
    cache_dir: &Path,
    repo_id: &str,
    key: &[u8; 32],
    upload_location: &Path,
) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(upload_location.as_os_str().as_encoded_bytes());
    let tag = &h.finalize().to_hex()[..16];
    cache_dir.join(repo_id).join(format!("files-{tag}.jsonl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_whose_content_is_being_stored_waits_and_takes_over_a_failed_upload() {
        let store = Store::from_object_store(
            Arc::new(object_store::memory::InMemory::new()),
            "",
            "memory:///",
        );
        let known = Known::new(vec![ContentId([1; 32])], &store);
        assert!(known.claim(&ContentId([1; 32])).is_none(), "listed");
        let id = ContentId([2; 32]);
        for fails in [true, false] {
            let first = known.claim(&id).expect("nobody stores it yet");
            assert!(!known.contains(&id), "being stored is not stored");
            std::thread::scope(|s| {
                let second = s.spawn(|| known.claim(&id).map(|c| c.id));
                std::thread::sleep(std::time::Duration::from_millis(50));
                assert!(!second.is_finished(), "it waits for the first upload");
                if fails {
                    drop(first); // the upload failed: released
                    assert_eq!(second.join().unwrap(), Some(id), "so it stores it itself");
                } else {
                    first.stored();
                    assert_eq!(second.join().unwrap(), None, "stored: nothing to do");
                }
            });
        }
        assert!(known.contains(&id));
    }
}
