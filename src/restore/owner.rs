//! Owners of restored files: the uid and gid the file list records, given back when restore runs
//! as root (Immich installs that run as another user, such as Unraid's, TrueNAS's or a `PUID`
//! setup, need their files owned by that user again).
//!
//! Every chown goes through an open descriptor, or `fchownat` with `AT_SYMLINK_NOFOLLOW` relative
//! to an open folder, so no symlink is followed; it comes before the mode is set, because chown
//! clears setuid and setgid bits. Not root, or with `restore --no-owner`, nothing is chowned; a list
//! written before owners were recorded restores as before. A chown the file system refuses (root
//! squashed on NFS, FAT) is counted and told once, not fatal: the files themselves are restored.

use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rustix::fs::AtFlags;
use rustix::fs::{Gid, Uid};

use crate::format::Entry;

/// What restore does about owners, and what it could not do.
pub(crate) struct Owners {
    /// Root, and not `--no-owner`.
    apply: bool,
    /// Not `--no-owner`: say so when owners differ and could not be given back.
    wanted: bool,
    /// Our effective uid and gid.
    ours: (u32, u32),
    counts: OwnerCounts,
    first_error: Mutex<Option<String>>,
}

/// How many restored entries did not get their recorded owner.
#[derive(Debug, Default)]
pub(crate) struct OwnerCounts {
    /// Recorded with an owner other than ours, while not root.
    pub foreign: AtomicU64,
    /// The file system refused the chown.
    pub failed: AtomicU64,
}

impl Owners {
    /// Owners for a restore that wants them (`!--no-owner`); applied only when we are root.
    pub fn new(wanted: bool) -> Owners {
        let ours = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        Owners {
            apply: wanted && ours.0 == 0,
            wanted,
            ours,
            counts: OwnerCounts::default(),
            first_error: Mutex::new(None),
        }
    }

    /// Whether chowns are made at all.
    pub fn applies(&self) -> bool {
        self.apply
    }

    /// The owner to give `entry`: `None` when none is recorded or owners are not given back
    /// (counted when it differs from ours).
    pub fn of(&self, entry: &Entry) -> Option<(Uid, Gid)> {
        let (Some(uid), Some(gid)) = (entry.uid, entry.gid) else {
            return None;
        };
        if !self.apply {
            if self.wanted && (uid, gid) != self.ours {
                self.counts.foreign.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        // u32::MAX is "no change" to chown, never an owner.
        (uid != u32::MAX && gid != u32::MAX).then(|| (Uid::from_raw(uid), Gid::from_raw(gid)))
    }

    /// Give the open file or folder `fd` the owner recorded in `entry`; `true` when it was changed
    /// (its mode must then be set again).
    pub fn set_fd(&self, fd: BorrowedFd<'_>, entry: &Entry) -> bool {
        let Some((uid, gid)) = self.of(entry) else {
            return false;
        };
        self.outcome(entry, rustix::fs::fchown(fd, Some(uid), Some(gid)))
    }

    /// Give `name` in the open folder `folder` (a symlink itself, never what it points to) the
    /// owner recorded in `entry`.
    pub fn set_at(&self, folder: BorrowedFd<'_>, name: &OsStr, entry: &Entry) -> bool {
        let Some((uid, gid)) = self.of(entry) else {
            return false;
        };
        let r = rustix::fs::chownat(
            folder,
            name,
            Some(uid),
            Some(gid),
            AtFlags::SYMLINK_NOFOLLOW,
        );
        self.outcome(entry, r)
    }

    fn outcome(&self, entry: &Entry, r: rustix::io::Result<()>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().expect("not poisoned");
                first.get_or_insert_with(|| format!("{}: {}", entry.path, io::Error::from(e)));
                false
            }
        }
    }

    /// What could not be done.
    pub fn totals(&self) -> OwnerTotals {
        OwnerTotals {
            foreign: self.counts.foreign.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            first_error: self.first_error.lock().expect("not poisoned").clone(),
        }
    }
}

/// What one restore could not do about owners, over all its targets.
#[derive(Debug, Clone, Default)]
pub(crate) struct OwnerTotals {
    pub foreign: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl OwnerTotals {
    /// One line saying what was not done, if anything.
    pub fn tell(&self) {
        if self.foreign > 0 {
            tracing::info!(
                entries = self.foreign,
                "ownership was not restored: {} files and folders are recorded with another owner, and restore is not running as root; run restore as root (sudo) to restore owners, or chown the restored files yourself",
                self.foreign
            );
        }
        if self.failed > 0 {
            tracing::warn!(
                entries = self.failed,
                first = self.first_error.as_deref().unwrap_or_default(),
                "the file system refused to give {} files and folders their recorded owner (root squashed on NFS? a file system without owners?); chown them yourself",
                self.failed
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file list written before owners were recorded reads with no owner, and restores without
    /// a chown; a recorded owner is written back out as it was read.
    #[test]
    fn lists_without_owners_read_and_restore_without_chown() {
        let old = r#"{"path":"library/a.jpg","type":"file","size":3,"mtime_ns":1,"mode":420,"content":"0000000000000000000000000000000000000000000000000000000000000000"}"#;
        let entry: Entry = serde_json::from_str(old).unwrap();
        assert_eq!((entry.uid, entry.gid), (None, None));
        assert_eq!(serde_json::to_string(&entry).unwrap(), old);
        let owners = Owners::new(true);
        assert!(owners.of(&entry).is_none());
        assert_eq!(owners.totals().foreign, 0);
        let new = Entry {
            uid: Some(1234),
            gid: Some(5678),
            ..entry
        };
        let line = serde_json::to_string(&new).unwrap();
        assert!(line.ends_with(r#","uid":1234,"gid":5678}"#), "{line}");
        // Applied as root only; otherwise counted (told once at the end).
        let ours = rustix::process::geteuid().as_raw();
        match owners.of(&new) {
            Some((u, g)) => assert_eq!((ours, u.as_raw(), g.as_raw()), (0, 1234, 5678)),
            None => assert_eq!((ours != 0, owners.totals().foreign), (true, 1)),
        }
        // --no-owner: nothing applied, nothing counted.
        let off = Owners::new(false);
        assert!(off.of(&new).is_none());
        assert_eq!(off.totals().foreign, 0);
    }
}
