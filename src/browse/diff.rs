//! `diff SNAPSHOT_A SNAPSHOT_B`: what changed between two snapshots, path by path, and in the
//! database table by table.
//!
//! As restic's `diff`: `+` added, `-` removed, `M` modified (another content or size; a symlink
//! with another target), `T` type changed (a file became a folder…), `U` metadata only (mode,
//! modification time or owner; listed with `--metadata`, always counted). Both file lists are written in
//! walk order (`format::walk_order`), so they are merged as they stream, one entry of each in
//! memory at a time, whatever their length. The database part compares the row counts each
//! manifest holds (counted in the dump's COPY blocks by the backup).

use std::cmp::Ordering;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::format::{walk_order, Entry, EntryKind, Manifest};
use crate::repo::Reader;
use crate::restore::files::scan_list;

/// One changed path (`diff --json` prints one a line, `message_type` "change").
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub message_type: &'static str,
    pub path: String,
    /// `+`, `-`, `M`, `T` or `U`.
    pub modifier: char,
    /// What the path is in B (in A when removed).
    #[serde(rename = "type")]
    pub kind: EntryKind,
}

/// Added or removed entries.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of the files.
    pub bytes: u64,
}

impl Counts {
    fn add(&mut self, e: &Entry) {
        match e.kind {
            EntryKind::File => {
                self.files += 1;
                self.bytes += e.size;
            }
            EntryKind::Dir => self.dirs += 1,
            EntryKind::Symlink => self.symlinks += 1,
        }
    }
}

/// A table whose row count differs (`None`: the table is not in that snapshot's dump).
#[derive(Debug, Clone, Serialize)]
pub struct TableChange {
    pub table: String,
    pub before: Option<u64>,
    pub after: Option<u64>,
}

/// The totals (`diff --json`'s last line, `message_type` "statistics").
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiffStats {
    pub message_type: &'static str,
    pub source_snapshot: String,
    pub target_snapshot: String,
    pub added: Counts,
    pub removed: Counts,
    /// Files with other content, symlinks with another target.
    pub modified: u64,
    pub type_changed: u64,
    /// Entries whose mode, modification time or owner alone changed.
    pub metadata_changed: u64,
    /// The database: tables whose row count changed, and the dump's size before and after.
    pub tables: Vec<TableChange>,
    pub dump_bytes: (u64, u64),
}

/// Both entries record an owner (older file lists record none) and they differ.
fn owner_changed(a: &Entry, b: &Entry) -> bool {
    let known = |e: &Entry| e.uid.is_some() || e.gid.is_some();
    known(a) && known(b) && (a.uid, a.gid) != (b.uid, b.gid)
}

/// What differs between `a` and `b` at the same path: `M`, `T`, `U`, or nothing.
fn compare(a: &Entry, b: &Entry) -> Option<char> {
    if a.kind != b.kind {
        return Some('T');
    }
    let other = match a.kind {
        EntryKind::File => a.size != b.size || a.content != b.content,
        EntryKind::Symlink => a.target != b.target,
        EntryKind::Dir => false,
    };
    if other {
        Some('M')
    } else if a.mode != b.mode || a.mtime_ns != b.mtime_ns || owner_changed(a, b) {
        Some('U')
    } else {
        None
    }
}

/// The tables whose row counts differ between the two manifests.
fn tables(a: &Manifest, b: &Manifest) -> Vec<TableChange> {
    let (ra, rb) = (&a.database.row_counts, &b.database.row_counts);
    let mut names: Vec<&String> = ra.keys().chain(rb.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|t| {
            let (before, after) = (ra.get(t).copied(), rb.get(t).copied());
            (before != after).then(|| TableChange {
                table: t.clone(),
                before,
                after,
            })
        })
        .collect()
}

/// The file list of `m` as a channel of entries, read on a blocking thread.
fn stream(
    reader: &Reader,
    m: &Manifest,
) -> (
    mpsc::Receiver<Entry>,
    impl std::future::Future<Output = Result<()>>,
) {
    let (tx, rx) = mpsc::channel::<Entry>(1024);
    let (reader, m) = (reader.clone(), m.clone());
    let lister = async move {
        scan_list(&reader, &m, None, tx, |tx, e| {
            tx.blocking_send(e).map_err(|_| Error::Interrupted)
        })
        .await
        .map(drop)
    };
    (rx, lister)
}

/// Compare snapshot `a`'s file list with `b`'s, handing each change to `each` (`U` ones only with
/// `metadata`) in walk order; the totals at the end.
pub async fn diff(
    reader: &Reader,
    a: &Manifest,
    b: &Manifest,
    metadata: bool,
    mut each: impl FnMut(&Change) -> Result<()>,
) -> Result<DiffStats> {
    let mut stats = DiffStats {
        message_type: "statistics",
        source_snapshot: a.id.clone(),
        target_snapshot: b.id.clone(),
        tables: tables(a, b),
        dump_bytes: (a.dump.size, b.dump.size),
        ..Default::default()
    };
    let (mut ra, list_a) = stream(reader, a);
    let (mut rb, list_b) = stream(reader, b);
    let merge = async {
        let (mut ea, mut eb) = (ra.recv().await, rb.recv().await);
        loop {
            let order = match (&ea, &eb) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(x), Some(y)) => walk_order(&x.path, &y.path),
            };
            let (modifier, shown) = match order {
                Ordering::Less => {
                    let e = ea.take().expect("some");
                    stats.removed.add(&e);
                    ea = ra.recv().await;
                    (Some('-'), e)
                }
                Ordering::Greater => {
                    let e = eb.take().expect("some");
                    stats.added.add(&e);
                    eb = rb.recv().await;
                    (Some('+'), e)
                }
                Ordering::Equal => {
                    let (x, y) = (ea.take().expect("some"), eb.take().expect("some"));
                    let m = compare(&x, &y);
                    match m {
                        Some('M') => stats.modified += 1,
                        Some('T') => stats.type_changed += 1,
                        Some('U') => stats.metadata_changed += 1,
                        _ => {}
                    }
                    (ea, eb) = (ra.recv().await, rb.recv().await);
                    (m.filter(|m| *m != 'U' || metadata), y)
                }
            };
            if let Some(modifier) = modifier {
                each(&Change {
                    message_type: "change",
                    path: shown.path,
                    modifier,
                    kind: shown.kind,
                })?;
            }
        }
        // Closing the channels stops the readers when the merge stopped early.
        drop((ra, rb));
        Ok::<_, Error>(())
    };
    let (la, lb, merged) = tokio::join!(list_a, list_b, merge);
    // A reader's own error says more than the merge's (a damaged list ends its channel early).
    match (la, lb) {
        (Err(e), _) | (_, Err(e)) if !matches!(e, Error::Interrupted) => return Err(e),
        _ => {}
    }
    merged?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ContentId;

    #[test]
    fn a_change_is_content_type_or_metadata() {
        let a = Entry {
            path: "library/a.jpg".into(),
            kind: EntryKind::File,
            size: 3,
            mtime_ns: 1,
            mode: 0o644,
            content: Some(ContentId([1; 32])),
            target: None,
            uid: None,
            gid: None,
        };
        assert_eq!(compare(&a, &a), None);
        let other = Entry {
            content: Some(ContentId([2; 32])),
            ..a.clone()
        };
        assert_eq!(compare(&a, &other), Some('M'));
        let touched = Entry {
            mtime_ns: 2,
            ..a.clone()
        };
        assert_eq!(compare(&a, &touched), Some('U'));
        let owned = Entry {
            uid: Some(0),
            gid: Some(0),
            ..a.clone()
        };
        assert_eq!(compare(&a, &owned), None, "an older list records no owner");
        let chowned = Entry {
            uid: Some(1000),
            ..owned.clone()
        };
        assert_eq!(compare(&owned, &chowned), Some('U'));
        let dir = Entry {
            kind: EntryKind::Dir,
            content: None,
            ..a.clone()
        };
        assert_eq!(compare(&a, &dir), Some('T'));
    }
}
