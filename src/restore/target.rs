//! The restore target as open folders: every file-system operation of a restore is made relative to
//! an open folder, one name at a time, and never follows a symlink.
//!
//! A file list names paths like `library/admin/2024/IMG_0001.jpg`. Resolving such a path from the
//! target's root each time would follow whatever symlinks the target holds (one planted there, or
//! one the file list itself restored a moment earlier), and fails past 4096 bytes. So a restore
//! opens the target once and then works with `openat`, `mkdirat`, `linkat`, `symlinkat`, … on
//! the open folder of each entry, with single-component names that are never `.`, `..` or contain
//! `/`, and `O_NOFOLLOW` on every open: no path can lead out of the target, a symlink on the way is
//! refused (not followed), and paths of any length work. (This is the discipline of `cap-std`,
//! stricter in that it follows no symlink at all, even one that stays inside; it is written here on
//! `rustix`, which cap-std itself is built on, because restore also needs `O_TMPFILE`, `O_DIRECT`
//! and `linkat` on those folders.)
//!
//! Only the target folder itself is opened by path, following symlinks: it is the user's choice
//! (UPLOAD_LOCATION may well be a symlink to a bigger disk).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

use crate::error::{Error, Result};

/// The opened target folder.
pub struct Target {
    path: PathBuf,
    root: Folder,
}

/// One open folder inside the target, with its path relative to the target (for messages).
#[derive(Clone)]
pub struct Folder {
    fd: Arc<OwnedFd>,
    rel: String,
}

/// What is at a name, without following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A name's kind and size.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub kind: Kind,
    pub size: u64,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Target {
    /// Open the target folder `path`, creating it first when `create` (a dry run does not).
    /// `Ok(None)`: it does not exist and was not created.
    pub fn open(path: &Path, create: bool) -> Result<Option<Target>> {
        if create {
            std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match rustix::fs::open(path, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(Target {
                path: path.to_path_buf(),
                root: Folder {
                    fd: Arc::new(fd),
                    rel: String::new(),
                },
            })),
            Err(e) if e == rustix::io::Errno::NOENT && !create => Ok(None),
            Err(e) => Err(Error::io(path, e.into())),
        }
    }

    /// The target's own path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The target folder.
    pub fn root(&self) -> &Folder {
        &self.root
    }

    /// `rel` shown under the target, for messages.
    pub fn shown(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// An error about `rel` (relative to the target).
    pub fn error(&self, rel: &str, e: io::Error) -> Error {
        Error::io(self.shown(rel), explain(e))
    }

    /// The folder at `rel` (`/`-separated, relative), opened one component at a time; each
    /// missing one is created when `create`, else `Ok(None)`.
    pub fn folder(&self, rel: &str, create: bool) -> Result<Option<Folder>> {
        let mut at = self.root.clone();
        for name in rel.split('/').filter(|c| !c.is_empty()) {
            match at.child(name, create) {
                Ok(Some(f)) => at = f,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.error(&join(&at.rel, name), e)),
            }
        }
        Ok(Some(at))
    }

    /// Make everything written under the target durable: one `syncfs`.
    pub fn sync(&self) -> Result<()> {
        rustix::fs::syncfs(self.root.fd()).map_err(|e| Error::io(&self.path, e.into()))
    }
}

/// `parent/name`, or `name` at the top.
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Refuse anything but one plain path component.
fn check_name(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(())
}

/// A clearer message for the errors a refused symlink gives.
pub(crate) fn explain(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::new(
            e.kind(),
            "is a symlink; restore never writes through one (move it away, then restore again)",
        ),
        Some(libc::ENOTDIR) => io::Error::new(
            e.kind(),
            "is not a folder (a file or symlink is where the snapshot has a folder)",
        ),
        _ => e,
    }
}

impl Folder {
    /// The open folder.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Its path relative to the target.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// The subfolder `name`, created first when `create`; `Ok(None)` when it is missing and not
    /// created. A symlink or a file there is an error.
    pub fn child(&self, name: &str, create: bool) -> io::Result<Option<Folder>> {
        check_name(name.as_ref())?;
        if create {
            match rustix::fs::mkdirat(self.fd(), name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match rustix::fs::openat(self.fd(), name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Some(Folder {
                fd: Arc::new(fd),
                rel: join(&self.rel, name),
            })),
            Err(rustix::io::Errno::NOENT) if !create => Ok(None),
            Err(e) => Err(explain(e.into())),
        }
    }

    /// What is at `name`, not following a symlink; `None` when nothing is.
    pub fn stat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        check_name(name)?;
        match rustix::fs::statat(self.fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = match FileType::from_raw_mode(st.st_mode) {
                    FileType::RegularFile => Kind::File,
                    FileType::Directory => Kind::Dir,
                    FileType::Symlink => Kind::Symlink,
                    _ => Kind::Other,
                };
                Ok(Some(Stat {
                    kind,
                    size: st.st_size as u64,
                }))
            }
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Open the regular file `name` for reading (never through a symlink).
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        check_name(name)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(self.fd(), name, flags, Mode::empty())
            .map_err(|e| explain(e.into()))?;
        Ok(File::from(fd))
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: &OsStr) -> io::Result<OsString> {
        check_name(name)?;
        let target = rustix::fs::readlinkat(self.fd(), name, Vec::new())?;
        Ok(OsString::from(std::ffi::OsStr::from_bytes(
            target.as_bytes(),
        )))
    }

    /// Create the symlink `name` pointing at `target` (which is not followed, now or later).
    pub fn symlink(&self, target: &str, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        rustix::fs::symlinkat(target, self.fd(), name)?;
        Ok(())
    }

    /// Give the unnamed (`O_TMPFILE`) file `file` the name `name`: `Ok(false)` when `name` exists.
    pub(crate) fn link_unnamed(&self, file: &File, name: &OsStr) -> io::Result<bool> {
        check_name(name)?;
        use std::os::fd::AsRawFd;
        let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
        match rustix::fs::linkat(
            rustix::fs::CWD,
            proc.as_str(),
            self.fd(),
            name,
            AtFlags::SYMLINK_FOLLOW,
        ) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Rename `from` to `to` in this folder (replacing `to`, never following it).
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        rustix::fs::renameat(self.fd(), from, self.fd(), to)?;
        Ok(())
    }

    /// Remove the file (or symlink) `name`; a missing one is fine.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        match rustix::fs::unlinkat(self.fd(), name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Create the file `name` with `bytes` unless something is there already (`Ok(false)`).
    pub fn create_small(&self, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<bool> {
        check_name(name)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(self.fd(), name, flags, Mode::from_bits_truncate(mode)) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::EXIST) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        use std::io::Write;
        File::from(fd).write_all(bytes)?;
        Ok(true)
    }

    /// Replace the file `name` with `bytes`, durably: written under a temporary name, synced,
    /// renamed over `name`, and the folder synced.
    pub(crate) fn replace_file(&self, name: &OsStr, bytes: &[u8]) -> io::Result<()> {
        check_name(name)?;
        let mut tmp = name.to_os_string();
        tmp.push(".tmp");
        self.remove_file(&tmp)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(
            self.fd(),
            tmp.as_os_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut file = File::from(fd);
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
        self.rename(&tmp, name)?;
        rustix::fs::fsync(self.fd())?;
        Ok(())
    }

    /// Set this folder's permission bits.
    pub(crate) fn set_mode(&self, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(self.fd(), Mode::from_bits_truncate(mode))?;
        Ok(())
    }

    /// Set this folder's modification time (nanoseconds since the epoch).
    pub(crate) fn set_mtime(&self, mtime_ns: i64) -> io::Result<()> {
        let t = Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        };
        let omit = Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        };
        rustix::fs::futimens(
            self.fd(),
            &Timestamps {
                last_access: omit,
                last_modification: t,
            },
        )?;
        Ok(())
    }

    /// The names in this folder with their kinds (not followed), sorted by name.
    pub fn entries(&self) -> io::Result<Vec<(OsString, Kind)>> {
        let dup = rustix::io::fcntl_dupfd_cloexec(self.fd(), 0)?;
        let mut dir = rustix::fs::Dir::new(dup)?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsString::from(OsStr::from_bytes(name));
            let kind = match entry.file_type() {
                FileType::RegularFile => Kind::File,
                FileType::Directory => Kind::Dir,
                FileType::Symlink => Kind::Symlink,
                FileType::Unknown => match self.stat(&name)? {
                    Some(s) => s.kind,
                    None => continue,
                },
                _ => Kind::Other,
            };
            out.push((name, kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_followed_and_names_are_single_components() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = Target::open(&dir.path().join("t"), true).unwrap().unwrap();
        let lib = target.folder("library/a", true).unwrap().unwrap();
        assert_eq!(lib.rel(), "library/a");
        // A symlink to a folder outside: refused as a folder, never followed.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("t/library/evil")).unwrap();
        let err = target.folder("library/evil/sub", true).err().unwrap();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        let library = target.folder("library", false).unwrap().unwrap();
        assert_eq!(
            library.stat(OsStr::new("evil")).unwrap().unwrap().kind,
            Kind::Symlink
        );
        assert!(library.open_file(OsStr::new("evil")).is_err());
        for bad in ["..", ".", "a/b", ""] {
            assert!(library.stat(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        assert!(library.child("..", true).is_err());
        // A file written through a symlinked name is refused too.
        std::os::unix::fs::symlink(outside.path().join("x"), dir.path().join("t/library/link"))
            .unwrap();
        assert!(!library
            .create_small(OsStr::new("link"), b"x", 0o644)
            .unwrap());
        assert!(!outside.path().join("x").exists());
        // Missing folders are not created unless asked.
        assert!(target.folder("upload/x", false).unwrap().is_none());
        let names: Vec<_> = library
            .entries()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "evil", "link"]);
    }

    #[test]
    fn paths_longer_than_path_max_work() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::open(dir.path(), true).unwrap().unwrap();
        let component = "d".repeat(200);
        let rel: Vec<&str> = std::iter::repeat_n(component.as_str(), 30).collect();
        let rel = rel.join("/");
        assert!(rel.len() > 4096);
        let deep = target.folder(&rel, true).unwrap().unwrap();
        assert!(deep.create_small(OsStr::new("f"), b"deep", 0o644).unwrap());
        let again = target.folder(&rel, false).unwrap().unwrap();
        let mut back = String::new();
        std::io::Read::read_to_string(&mut again.open_file(OsStr::new("f")).unwrap(), &mut back)
            .unwrap();
        assert_eq!(back, "deep");
    }
}
