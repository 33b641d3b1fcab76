//! Browsing snapshots without restoring them: `ls`, `find`, `diff`, `stats` and `dump`.
//!
//! Most restores are not disasters: someone emptied Immich's trash or a phone app wiped an upload,
//! and a few files are wanted back. These commands read what a restore reads, the same way: the
//! manifest through [`crate::repo::trust`] (only snapshots the backup machine signed), the file list
//! through `restore::files::scan_list` (streamed, every path checked, its SHA-256 checked
//! at the end), a file's content checked against its keyed address, the dump through
//! `restore::database::verify_dump`. Nothing is held whole in memory but `stats`'s index
//! of content objects: file lists are streamed, and `diff` merges two of them in walk order.
//!
//! One file per command: [`ls`], [`find`], [`diff`], [`stats`], [`dump`]; this file has what they
//! share: the shared store lock, how an entry is shown ([`Node`]).

pub mod diff;
pub mod dump;
pub mod find;
pub mod ls;
pub mod stats;

use chrono::{DateTime, Local, TimeZone, Utc};
use serde::Serialize;

use crate::config::LockConfig;
use crate::error::Result;
use crate::format::{Entry, EntryKind};
use crate::repo::lock::{Lock, LockKind};
use crate::repo::Repository;

/// Run `work` under the store's shared lock (a prune cannot delete what is being read), or
/// without any lock when `lock` is `None` (`--no-lock`, a store that may only be read).
pub async fn with_lock<T>(
    repo: &Repository,
    lock: Option<&LockConfig>,
    operation: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match lock {
        Some(cfg) => Lock::hold(repo, LockKind::Shared, operation, cfg, work).await,
        None => work.await,
    }
}

/// One file-list entry as `ls` and `find` show it, in restic's names (`ls --json` prints one a
/// line, `message_type` "node").
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub message_type: &'static str,
    /// The last component of the path.
    pub name: String,
    /// `file`, `dir` or `symlink`.
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// The path in the snapshot (relative to UPLOAD_LOCATION; external libraries under
    /// `external/<container path>`).
    pub path: String,
    pub size: u64,
    /// Permission bits, as a number (`420` is 0644).
    pub mode: u32,
    /// `-rw-r--r--`.
    pub permissions: String,
    /// Modification time, UTC.
    pub mtime: DateTime<Utc>,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linktarget: Option<String>,
    /// A file's content address (its object is `data/<2 hex>/<address>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Node {
    /// The node of `e`.
    pub fn of(e: &Entry) -> Node {
        Node {
            message_type: "node",
            name: e.path.rsplit('/').next().unwrap_or(&e.path).to_string(),
            kind: e.kind,
            path: e.path.clone(),
            size: e.size,
            mode: e.mode & 0o7777,
            permissions: mode_string(e.kind, e.mode),
            mtime: mtime(e.mtime_ns),
            linktarget: e.target.clone(),
            content: e.content.map(|c| c.to_string()),
        }
    }

    /// `ls --long`'s line: permissions, size, local modification time, path (` -> target`).
    pub fn long(&self) -> String {
        let local = self.mtime.with_timezone(&Local);
        let mut line = format!(
            "{} {:>12} {} {}",
            self.permissions,
            self.size,
            local.format("%Y-%m-%d %H:%M:%S"),
            self.path
        );
        if let Some(t) = &self.linktarget {
            line.push_str(" -> ");
            line.push_str(t);
        }
        line
    }
}

/// `e.mtime_ns` as a time.
pub fn mtime(ns: i64) -> DateTime<Utc> {
    Utc.timestamp_nanos(ns)
}

/// `drwxr-xr-x`, as `ls -l` shows a mode (setuid, setgid and sticky bits included).
pub fn mode_string(kind: EntryKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
    });
    let special = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (who, (bit, on, off)) in special.iter().enumerate() {
        let shift = 6 - 3 * who as u32;
        let rwx = (mode >> shift) & 0o7;
        s.push(if rwx & 4 != 0 { 'r' } else { '-' });
        s.push(if rwx & 2 != 0 { 'w' } else { '-' });
        let x = rwx & 1 != 0;
        s.push(match (mode & bit != 0, x) {
            (true, true) => *on,
            (true, false) => *off,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_as_ls_shows_them() {
        assert_eq!(mode_string(EntryKind::File, 0o644), "-rw-r--r--");
        assert_eq!(mode_string(EntryKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(EntryKind::Symlink, 0o777), "lrwxrwxrwx");
        assert_eq!(mode_string(EntryKind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(EntryKind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(EntryKind::File, 0o2600), "-rw---S---");
    }
}
