//! The walk: the configured folders under UPLOAD_LOCATION, and the backed-up external libraries
//! (under `external/<container path>` in the file list), in a stable, sorted order (component-wise,
//! as `Path`'s ordering), each entry with the metadata the cache compares. Symlinks are recorded,
//! never followed (but an external library's own folder may be one: it is the user's choice);
//! generated folders are never visited; past a long path the walk goes on relative to the open
//! folder.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::format::{walk_order, Entry, EntryKind};
use crate::immich::exclude::Excludes;
use crate::immich::paths::external_folder;

/// One thing found by the walk, with the metadata the cache compares.
#[derive(Debug, Clone)]
pub struct Found {
    pub entry: Entry,
    /// Where to open it: its path, or, deep down, a path through its open folder
    /// (`/proc/self/fd/N/name`, see `LONG_PATH`) that `dir` keeps valid.
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
pub(crate) fn now_ns() -> i64 {
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
    /// A path `[immich] exclude` leaves out (a folder with everything in it, which is not walked).
    Excluded {
        path: String,
    },
}

/// Items the walk sends at once (one wake-up of the consumer per batch, not per file).
pub(crate) const WALK_BATCH: usize = 256;

/// A folder the walk takes, and the path it has in the file list.
#[derive(Debug, Clone)]
pub struct Top {
    pub path: PathBuf,
    pub rel: String,
    /// An external library: its folder itself may be a symlink, and is followed.
    pub external: bool,
}

/// What a backup of `cfg` walks, in walk order: the originals folders under UPLOAD_LOCATION and
/// every backed-up external library.
pub fn tops(cfg: &Config) -> Vec<Top> {
    let root = &cfg.immich.upload_location;
    let mut out: Vec<Top> = cfg
        .immich
        .folders
        .iter()
        .map(|f| Top {
            path: root.join(f),
            rel: f.clone(),
            external: false,
        })
        .collect();
    for l in &cfg.immich.external_libraries {
        if let Some(rel) = external_folder(&l.container_path) {
            out.push(Top {
                path: l.host_path.clone(),
                rel,
                external: true,
            });
        }
    }
    out.sort_by(|a, b| walk_order(&a.rel, &b.rel));
    out.dedup_by(|a, b| a.rel == b.rel);
    out
}

/// Walk `tops` (in walk order) sending what it finds in batches. Runs on a blocking thread.
///
/// Each folder's entries are read, sorted by name and `stat`ed relative to the open folder
/// (`fstatat` through `DirEntry::metadata`), so no path is resolved again from the root: a folder
/// is listed before its contents, exactly the order the cache is merged in (`crate::format::walk_order`).
pub fn walk(tops: &[Top], excludes: &Excludes, tx: mpsc::Sender<Vec<Walked>>) {
    let mut out = Batch {
        tx,
        items: Vec::with_capacity(WALK_BATCH),
        excludes: excludes.clone(),
    };
    for top in tops {
        if excludes.matches(&top.rel) {
            if !out.push(Walked::Excluded {
                path: top.rel.clone(),
            }) {
                return;
            }
            continue;
        }
        if !top.path.exists() {
            if top.external {
                tracing::warn!(folder = %top.path.display(), library = %top.rel, "external library folder does not exist; its assets will be reported missing");
            } else {
                tracing::warn!(folder = %top.path.display(), "originals folder does not exist; nothing to back up there");
            }
            continue;
        }
        let meta = if top.external {
            std::fs::metadata(&top.path)
        } else {
            std::fs::symlink_metadata(&top.path)
        };
        let walked = describe(Some(top.rel.clone()), &top.path, meta, None);
        let is_dir = matches!(&walked, Walked::Found(f) if f.entry.kind == EntryKind::Dir);
        if !out.push(walked)
            || (is_dir && !walk_dir(&Dir::Path(top.path.clone()), &top.rel, &mut out))
        {
            return; // the backup stopped
        }
    }
    out.flush();
}

/// Paths at least this long are walked through their open folder: the kernel refuses a path longer
/// than PATH_MAX (4096 bytes), so deep down each folder is opened relative to its parent
/// (`openat`, never following a symlink) and named `/proc/self/fd/N`.
pub(crate) const LONG_PATH: usize = 3072;

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
    excludes: Excludes,
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
        if let Some(path) = child_rel.as_ref().filter(|p| out.excludes.matches(p)) {
            if !out.push(Walked::Excluded { path: path.clone() }) {
                return false;
            }
            continue;
        }
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
        uid: Some(meta.uid()),
        gid: Some(meta.gid()),
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
