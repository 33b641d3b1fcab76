//! The local-folder store's data path: objects are plain files, written and read with `std::fs`.
//!
//! object_store's `LocalFileSystem` is correct but slow for this job: it syncs every object and its
//! folder to disk, buffers a whole part in memory before writing, and reads in small chunks through
//! the runtime. For a folder or NAS store that was most of a backup's and a restore's time. Here the
//! guarantees stay and the per-object syncs go:
//!
//! - a backup's content objects (`data/…`) are written into the run's own staging folder
//!   (`staging/<run>/<aa>/<64 hex>`), each as an unnamed `O_TMPFILE` file given its name when
//!   complete (or under a hidden temporary name where the file system lacks `O_TMPFILE`), with
//!   writeback started as each completes but no `fsync`;
//! - at commit, one `syncfs` makes them all durable, then each is moved into `data/ab/` without
//!   replacing an object already there, and a second `syncfs` makes the names durable. So `data/`
//!   never holds an object whose bytes might not be on disk, and a power cut before the commit loses
//!   only a staging folder;
//! - other objects (the dump, the file list) are written under a hidden temporary name (`KEY#N`,
//!   which object_store's own listing skips) and linked into place, create-only, when complete; the
//!   backup syncs before it writes the manifest;
//! - the staging folder of a run that died (killed, or out of memory) on this host since the last
//!   boot is adopted by the next backup: synced, then published, so nothing is uploaded twice. One
//!   left by a boot before the last (a power cut: its bytes may never have reached the disk), or by
//!   another host that holds no live lock, is removed.
//!
//! Writes without a staging folder (outside a backup) sync each object, as before.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::format::{ContentId, DATA_DIR};
use crate::store::directio::{DirectWriter, NewFiles};

/// Folder (under the store root) holding the staging folders of running backups.
pub(crate) const STAGING_DIR: &str = "staging";
/// The file in a staging folder that names its run.
pub(crate) const OWNER_FILE: &str = "owner.json";

/// Who a staging folder belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Owner {
    pub host: String,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): a different one means the machine
    /// restarted since, and unsynced bytes may have been lost.
    pub boot_id: String,
    pub pid: u32,
    pub started: chrono::DateTime<chrono::Utc>,
}

impl Owner {
    /// This process, now.
    pub(crate) fn this_process() -> Owner {
        Owner {
            host: crate::host::hostname(),
            boot_id: boot_id(),
            pid: std::process::id(),
            started: chrono::Utc::now(),
        }
    }
}

/// This boot's id, or empty where the kernel does not say (staging folders are then never adopted).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What a backup does with another run's staging folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Its run is alive (or may be): leave it.
    Leave,
    /// Its run died on this host since the last boot: its complete objects are safe to publish.
    Adopt,
    /// Its bytes may not have reached the disk (a restart since), or nobody owns it: remove it.
    Discard,
}

/// Decide about a staging folder from its owner, this process, and whether its owner's host holds
/// a live lock on the store. `fresh` says the folder is too new to judge without an owner file.
pub(crate) fn verdict(
    owner: Option<&Owner>,
    me: &Owner,
    host_has_live_lock: bool,
    fresh: bool,
) -> Verdict {
    let Some(o) = owner else {
        return if fresh {
            Verdict::Leave
        } else {
            Verdict::Discard
        };
    };
    if o.host != me.host {
        return if host_has_live_lock {
            Verdict::Leave
        } else {
            Verdict::Discard
        };
    }
    if o.boot_id.is_empty() || o.boot_id != me.boot_id {
        return Verdict::Discard;
    }
    // Our own pid in another folder is an earlier process (PID 1 of a restarted container).
    if o.pid != me.pid && crate::host::pid_alive(o.pid) {
        return Verdict::Leave;
    }
    Verdict::Adopt
}

/// A store that is a local (or mounted) folder.
#[derive(Debug)]
pub(crate) struct LocalDir {
    root: PathBuf,
    /// The running backup's staging folder, once it has one.
    staging: Mutex<Option<PathBuf>>,
    seq: AtomicU64,
    /// How staged content is written: unnamed and with `O_DIRECT` where the file system allows.
    files: NewFiles,
}

impl LocalDir {
    /// A store at `root`; `direct_io` writes staged content with `O_DIRECT` (directio.rs).
    pub fn new(root: &Path, direct_io: bool) -> LocalDir {
        LocalDir {
            root: root.to_path_buf(),
            staging: Mutex::new(None),
            seq: AtomicU64::new(0),
            files: NewFiles::new(direct_io && crate::store::directio::suits(root)),
        }
    }

    /// The file holding `key` (keys are relative, `/`-separated, made by this program).
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn temp_name(&self, dest: &Path) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(format!("#{}{n}", std::process::id()));
        dest.with_file_name(name)
    }

    /// Start staging this run's content objects; returns the staging folder's name.
    pub(crate) fn begin_staging(&self) -> io::Result<String> {
        let owner = Owner::this_process();
        let name = format!(
            "{}-{}",
            owner.started.format("%Y%m%dT%H%M%S%.3fZ"),
            hex::encode(rand::random::<[u8; 4]>())
        );
        let dir = self.root.join(STAGING_DIR).join(&name);
        fs::create_dir_all(&dir)?;
        let body = serde_json::to_vec_pretty(&owner).expect("owner serialises");
        fs::write(dir.join(OWNER_FILE), body)?;
        *self.staging.lock().expect("not poisoned") = Some(dir);
        Ok(name)
    }

    /// Whether a backup is staging into this store.
    pub(crate) fn is_staging(&self) -> bool {
        self.staging.lock().expect("not poisoned").is_some()
    }

    /// Whether content object `id` is complete in this run's staging folder.
    pub(crate) fn is_staged(&self, id: &ContentId) -> bool {
        let staging = self.staging.lock().expect("not poisoned").clone();
        staging.is_some_and(|dir| staged_path(&dir, &id.key()).exists())
    }

    /// A writer for `key`: staged when it is content and a backup is staging, otherwise written to
    /// a temporary name and linked into place.
    pub fn create(&self, key: &str) -> io::Result<LocalWriter> {
        let staging = self.staging.lock().expect("not poisoned").clone();
        let is_content =
            key.starts_with(DATA_DIR) && key.as_bytes().get(DATA_DIR.len()) == Some(&b'/');
        let (dest, mode) = match staging {
            Some(dir) if is_content => (staged_path(&dir, key), Finish::Stage),
            // Without a staging folder a content object must be durable before it is visible.
            None if is_content => (self.path(key), Finish::SyncThenLink),
            _ => (self.path(key), Finish::Link),
        };
        self.open_writer(dest, mode)
    }

    /// A writer that replaces `key` when complete (`backup --repair`): written under a temporary
    /// name, synced, renamed over `key`, the folder synced. Never staged.
    pub(crate) fn create_replacing(&self, key: &str) -> io::Result<LocalWriter> {
        self.open_writer(self.path(key), Finish::Replace)
    }

    /// A writer for a content object named only when complete ([`LocalWriter::name`]), hashed as
    /// it is written; `None` outside a backup (no staging folder).
    pub(crate) fn create_unnamed(&self) -> Option<io::Result<LocalWriter>> {
        let dir = self.staging.lock().expect("not poisoned").clone()?;
        Some(self.open_writer(dir.join("unnamed"), Finish::Stage))
    }

    fn open_writer(&self, dest: PathBuf, mode: Finish) -> io::Result<LocalWriter> {
        let folder = dest.parent().expect("objects have a folder");
        if mode == Finish::Stage {
            // An unnamed file: nothing to clean up if the run dies, and no rename at the end.
            let unnamed = || self.files.unnamed(folder, 0o644, u64::MAX);
            let opened = match unnamed() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(folder)?;
                    unnamed()
                }
                other => other,
            };
            if let Some(w) = opened? {
                return Ok(LocalWriter {
                    out: Some(Out::Direct(w)),
                    tmp: None,
                    dest,
                    mode,
                });
            }
        }
        let tmp = self.temp_name(&dest);
        let file = match create_new(&tmp) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(folder)?;
                create_new(&tmp)?
            }
            other => other?,
        };
        Ok(LocalWriter {
            out: Some(Out::Plain(file)),
            tmp: Some(tmp),
            dest,
            mode,
        })
    }

    /// Make everything written to the store's file system so far durable.
    pub fn sync(&self) -> io::Result<()> {
        let dir = File::open(&self.root)?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Publish this run's staged objects (sync, move into `data/`, sync); returns how many were new.
    /// Everything written before is durable afterwards, staged or not.
    pub(crate) fn publish(&self) -> io::Result<u64> {
        let Some(dir) = self.staging.lock().expect("not poisoned").take() else {
            self.sync()?;
            return Ok(0);
        };
        self.sync()?;
        let n = self.move_staged(&dir)?;
        self.sync()?;
        Ok(n)
    }

    /// Move every complete object of staging folder `dir` into `data/`, then remove the folder.
    fn move_staged(&self, dir: &Path) -> io::Result<u64> {
        let mut new = 0;
        for shard in fs::read_dir(dir)? {
            let shard = shard?;
            if shard.file_type()?.is_dir() {
                new += self.move_shard(&shard.path(), &shard.file_name())?;
            } // else owner.json
        }
        remove_folder(dir)?;
        Ok(new)
    }

    /// Move the complete objects of staging shard `shard` (`<run>/<aa>`) into `data/<aa>`: the
    /// whole folder in one rename where `data/<aa>` does not exist yet (a first backup) and the
    /// shard holds nothing else, otherwise object by object, never replacing one.
    fn move_shard(&self, shard: &Path, name: &std::ffi::OsStr) -> io::Result<u64> {
        let prefix = name.to_str().filter(|n| n.len() == 2);
        let mut objects = Vec::new();
        let mut only_objects = prefix.is_some();
        for entry in fs::read_dir(shard)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let id = file_name
                .to_str()
                .filter(|n| prefix.is_some_and(|p| n.starts_with(p)))
                .and_then(|n| n.parse::<ContentId>().ok());
            match id {
                Some(id) => objects.push((id, entry.path())),
                None => only_objects = false, // an incomplete object
            }
        }
        if only_objects && !objects.is_empty() {
            let dest = self.root.join(DATA_DIR).join(name);
            if rename_dir_noreplace(shard, &dest)? {
                return Ok(objects.len() as u64);
            }
        }
        let mut new = 0;
        for (id, path) in objects {
            match rename_noreplace(&path, &self.path(&id.key())) {
                Ok(true) => new += 1,
                Ok(false) => remove_if_exists(&path)?, // stored already
                Err(e) => return Err(e),
            }
        }
        Ok(new)
    }

    /// Staging folders of other runs, with their owners (`None`: unreadable owner file) and whether
    /// the folder changed in the last minute.
    ///
    /// Called before a backup begins staging: a folder this process still holds is an earlier
    /// run's that failed (the agent runs backup after backup in one process), and counts as
    /// another's from now on.
    pub(crate) fn other_staging(&self) -> io::Result<Vec<(String, Option<Owner>, bool)>> {
        self.staging.lock().expect("not poisoned").take();
        let base = self.root.join(STAGING_DIR);
        let entries = match fs::read_dir(&base) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let owner = fs::read(entry.path().join(OWNER_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let fresh = entry
                .metadata()?
                .modified()?
                .elapsed()
                .map_or(true, |age| age.as_secs() < 60);
            out.push((
                entry.file_name().to_string_lossy().into_owned(),
                owner,
                fresh,
            ));
        }
        Ok(out)
    }

    /// Adopt a dead run's staging folder: sync, publish its complete objects; returns how many.
    pub(crate) fn adopt(&self, name: &str) -> io::Result<u64> {
        self.sync()?;
        let n = self.move_staged(&self.root.join(STAGING_DIR).join(name))?;
        self.sync()?;
        Ok(n)
    }

    /// Remove a staging folder whose bytes cannot be trusted.
    pub(crate) fn discard(&self, name: &str) -> io::Result<()> {
        remove_folder(&self.root.join(STAGING_DIR).join(name))
    }

    /// Every content address under `data/`, from the folder names alone (no per-object `stat`).
    pub(crate) fn content_ids(&self) -> io::Result<Vec<ContentId>> {
        let mut ids = Vec::new();
        let data = self.root.join(DATA_DIR);
        let subdirs = match fs::read_dir(&data) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(e),
        };
        for sub in subdirs {
            let sub = sub?;
            let prefix = sub.file_name();
            let Some(prefix) = prefix.to_str().filter(|p| p.len() == 2) else {
                continue;
            };
            for obj in fs::read_dir(sub.path())? {
                let name = obj?.file_name();
                let Some(name) = name.to_str().filter(|n| n.starts_with(prefix)) else {
                    continue;
                };
                if let Ok(id) = name.parse::<ContentId>() {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }
}

/// Where content object `key` is staged in staging folder `dir`: `<dir>/<aa>/<64 hex>`, spread over
/// 256 folders like `data/` (one folder would make every writer wait for its lock).
fn staged_path(dir: &Path, key: &str) -> PathBuf {
    let name = key.rsplit('/').next().unwrap_or(key);
    dir.join(name.get(..2).unwrap_or("xx")).join(name)
}

/// Give the unnamed file `file` the name `to` (create-only: `Ok(false)` when `to` exists).
pub(crate) fn link_fd(file: &File, to: &Path) -> io::Result<bool> {
    let from = c_path(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
    let to_c = c_path(to)?;
    create_only(to, || {
        // SAFETY: valid NUL-terminated paths; the descriptor is open.
        unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to_c.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        }
    })
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Run `call`, a system call that creates `to` and fails with `EEXIST` when it exists: `Ok(false)`
/// then. When `to`'s folder is missing it is created and the call made once more.
fn create_only(to: &Path, call: impl Fn() -> libc::c_int) -> io::Result<bool> {
    for attempt in 0..2 {
        if call() == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => return Ok(false),
            Some(libc::ENOENT) if attempt == 0 => {
                fs::create_dir_all(to.parent().expect("objects have a folder"))?
            }
            _ => return Err(e),
        }
    }
    Err(io::Error::other(format!("cannot create {}", to.display())))
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Remove a staging folder and what is left in it (the owner file, incomplete objects).
fn remove_folder(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Move `from` to `to` unless `to` exists: `Ok(false)` then, and `from` is left. Creates `to`'s
/// folder. Uses `renameat2(RENAME_NOREPLACE)`, or a hard link where the file system lacks it.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    match renameat2_noreplace(from, to) {
        Err(e) if noreplace_unsupported(&e) => link_noreplace(from, to),
        other => other,
    }
}

/// Rename folder `from` to `to` unless `to` exists; `Ok(false)` then, or where the file system
/// cannot rename without replacing (the caller moves the contents one by one).
fn rename_dir_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    match renameat2_noreplace(from, to) {
        Err(e) if noreplace_unsupported(&e) || e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            Ok(false)
        }
        other => other,
    }
}

/// `renameat2(from, to, RENAME_NOREPLACE)`: `Ok(false)` when `to` exists; creates `to`'s folder.
fn renameat2_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    let (f, t) = (c_path(from)?, c_path(to)?);
    create_only(to, || {
        // SAFETY: both are valid NUL-terminated paths.
        unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        }
    })
}

fn noreplace_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::ENOTSUP)
    )
}

/// Hard-link `from` to `to` (create-only), then remove `from`.
fn link_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    let linked = match fs::hard_link(from, to) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound && from.exists() => {
            fs::create_dir_all(to.parent().expect("objects have a folder"))?;
            return link_noreplace(from, to);
        }
        Err(e) => return Err(e),
    };
    remove_if_exists(from)?;
    Ok(linked)
}

/// How a [`LocalWriter`] completes its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// Renamed to its staged name; published at commit.
    Stage,
    /// Linked into place now (create-only); made durable by the commit's sync.
    Link,
    /// Synced, linked into place, folder synced: durable before it is visible.
    SyncThenLink,
    /// Synced, renamed over what is there, folder synced (a repair).
    Replace,
}

/// Where a [`LocalWriter`]'s bytes go.
enum Out {
    Plain(File),
    Direct(DirectWriter),
}

/// One object being written to a temporary file. Dropping it unfinished removes the file.
pub(crate) struct LocalWriter {
    out: Option<Out>,
    /// The temporary name; `None` for an unnamed (`O_TMPFILE`) file.
    tmp: Option<PathBuf>,
    dest: PathBuf,
    mode: Finish,
}

impl LocalWriter {
    /// Give a staged content object its key (before [`LocalWriter::finish`]).
    pub fn name(&mut self, key: &str) {
        if self.mode == Finish::Stage {
            // `<run>/unnamed` (from create_unnamed) or `<run>/<aa>/<hex>`.
            let mut run = self
                .dest
                .parent()
                .expect("staged objects are in a run folder");
            if self.dest.file_name() != Some("unnamed".as_ref()) {
                run = run.parent().expect("staged objects are in a run folder");
            }
            self.dest = staged_path(run, key);
        }
    }

    /// Complete the object; `Ok(false)` when one with this key already existed (left as it was).
    pub fn finish(mut self) -> io::Result<bool> {
        let file = match self.out.take().expect("finish runs once") {
            Out::Plain(file) => file,
            Out::Direct(w) => w.finish()?,
        };
        if matches!(self.mode, Finish::SyncThenLink | Finish::Replace) {
            file.sync_all()?;
        } else {
            start_writeback(&file);
        }
        let Some(tmp) = self.tmp.take() else {
            return link_fd(&file, &self.dest); // an unnamed staged file
        };
        drop(file);
        let created = match self.mode {
            Finish::Stage => {
                if let Err(e) = fs::rename(&tmp, &self.dest) {
                    if e.kind() != io::ErrorKind::NotFound || !tmp.exists() {
                        return Err(e);
                    }
                    fs::create_dir_all(self.dest.parent().expect("objects have a folder"))?;
                    fs::rename(&tmp, &self.dest)?;
                }
                true
            }
            Finish::Link | Finish::SyncThenLink => link_noreplace(&tmp, &self.dest)?,
            Finish::Replace => {
                fs::rename(&tmp, &self.dest)?;
                true
            }
        };
        if matches!(self.mode, Finish::SyncThenLink | Finish::Replace) && created {
            File::open(self.dest.parent().expect("objects have a folder"))?.sync_all()?;
        }
        Ok(created)
    }
}

/// Ask the kernel to start writing the file out now, so a later sync has little left to do.
pub(crate) fn start_writeback(file: &File) {
    // SAFETY: sync_file_range on a descriptor we own; failure only loses the head start.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl Write for LocalWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.out.as_mut().expect("not finished") {
            Out::Plain(f) => f.write(data),
            Out::Direct(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if let (Some(_), Some(tmp)) = (self.out.take(), &self.tmp) {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> String {
        ContentId([n; 32]).key()
    }

    #[test]
    fn staged_objects_appear_in_data_only_when_published_and_never_replace() {
        for direct_io in [true, false] {
            staged_objects_are_published_without_replacing(direct_io);
        }
    }

    fn staged_objects_are_published_without_replacing(direct_io: bool) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path(), direct_io);
        assert_eq!(store.files.direct(), direct_io);
        // An object already stored.
        let mut w = store.create(&key(1)).unwrap();
        w.write_all(b"first").unwrap();
        assert!(w.finish().unwrap());
        assert_eq!(store.content_ids().unwrap(), vec![ContentId([1; 32])]);

        store.begin_staging().unwrap();
        for (n, body) in [(1u8, &b"again"[..]), (2, b"second")] {
            let mut w = store.create(&key(n)).unwrap();
            w.write_all(body).unwrap();
            assert!(w.finish().unwrap());
        }
        // An abandoned one leaves nothing.
        let mut w = store.create(&key(3)).unwrap();
        w.write_all(b"abandoned").unwrap();
        drop(w);
        assert_eq!(
            store.content_ids().unwrap().len(),
            1,
            "staged is not visible"
        );
        // A large object, through direct writes and the helper thread where they are on.
        let big: Vec<u8> = (0..20 * crate::store::directio::BLOCK + 77)
            .map(|i| (i % 241) as u8)
            .collect();
        let mut w = store.create(&key(6)).unwrap();
        w.write_all(&big).unwrap();
        assert!(w.finish().unwrap());
        assert_eq!(store.publish().unwrap(), 2);
        assert_eq!(fs::read(store.path(&key(6))).unwrap(), big);
        fs::remove_file(store.path(&key(6))).unwrap();
        let mut ids = store.content_ids().unwrap();
        ids.sort();
        assert_eq!(ids, vec![ContentId([1; 32]), ContentId([2; 32])]);
        assert_eq!(fs::read(store.path(&key(1))).unwrap(), b"first");
        assert_eq!(fs::read(store.path(&key(2))).unwrap(), b"second");
        assert!(fs::read_dir(dir.path().join(STAGING_DIR))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn unnamed_objects_and_a_dead_runs_staging_folder_are_published() {
        let dir = tempfile::tempdir().unwrap();
        // A run that stages two objects (one named at the end, one abandoned), then dies.
        let dead = LocalDir::new(dir.path(), true);
        dead.begin_staging().unwrap();
        let mut w = dead.create_unnamed().unwrap().unwrap();
        w.write_all(b"hashed while written").unwrap();
        w.name(&key(4));
        assert!(w.finish().unwrap());
        let mut w = dead.create_unnamed().unwrap().unwrap();
        w.write_all(b"never named").unwrap();
        drop(w);
        drop(dead);

        let store = LocalDir::new(dir.path(), true);
        assert!(store.content_ids().unwrap().is_empty());
        let others = store.other_staging().unwrap();
        assert_eq!(others.len(), 1);
        let (name, owner, fresh) = &others[0];
        assert!(fresh);
        let me = Owner::this_process();
        // It names this process's pid: an earlier process, so its folder is adopted.
        assert_eq!(verdict(owner.as_ref(), &me, false, *fresh), Verdict::Adopt);
        assert_eq!(store.adopt(name).unwrap(), 1);
        assert_eq!(store.content_ids().unwrap(), vec![ContentId([4; 32])]);
        assert_eq!(
            fs::read(store.path(&key(4))).unwrap(),
            b"hashed while written"
        );
        assert!(store.other_staging().unwrap().is_empty());

        // In one process (the agent): a run that failed before publishing, then the next run.
        store.begin_staging().unwrap();
        let mut w = store.create(&key(5)).unwrap();
        w.write_all(b"from the failed run").unwrap();
        assert!(w.finish().unwrap());
        let others = store.other_staging().unwrap();
        assert_eq!(others.len(), 1, "the failed run's folder is another's now");
        assert_eq!(
            verdict(others[0].1.as_ref(), &me, false, true),
            Verdict::Adopt
        );
        assert_eq!(store.adopt(&others[0].0).unwrap(), 1);
        assert!(store.content_ids().unwrap().contains(&ContentId([5; 32])));
    }

    #[test]
    fn verdicts() {
        let me = Owner::this_process();
        let dead_pid = Owner {
            pid: 0x7fff_fff0,
            ..me.clone()
        };
        let alive = Owner {
            pid: 1,
            ..me.clone()
        };
        let rebooted = Owner {
            boot_id: "another boot".into(),
            ..dead_pid.clone()
        };
        let other_host = Owner {
            host: format!("{}-other", me.host),
            ..dead_pid.clone()
        };
        assert_eq!(verdict(Some(&dead_pid), &me, false, false), Verdict::Adopt);
        assert_eq!(verdict(Some(&me), &me, false, false), Verdict::Adopt);
        assert_eq!(verdict(Some(&alive), &me, false, false), Verdict::Leave);
        assert_eq!(verdict(Some(&rebooted), &me, true, false), Verdict::Discard);
        assert_eq!(verdict(Some(&other_host), &me, true, false), Verdict::Leave);
        assert_eq!(
            verdict(Some(&other_host), &me, false, false),
            Verdict::Discard
        );
        assert_eq!(verdict(None, &me, false, true), Verdict::Leave);
        assert_eq!(verdict(None, &me, false, false), Verdict::Discard);
    }

    #[test]
    fn other_objects_are_linked_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path(), true);
        for (body, created) in [(&b"one"[..], true), (b"two", false)] {
            let mut w = store.create("snapshots/x/files").unwrap();
            w.write_all(body).unwrap();
            assert_eq!(w.finish().unwrap(), created);
        }
        assert_eq!(fs::read(store.path("snapshots/x/files")).unwrap(), b"one");
        assert_eq!(fs::read_dir(store.path("snapshots/x")).unwrap().count(), 1);
    }
}
