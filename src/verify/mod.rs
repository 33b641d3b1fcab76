//! `check`: is every snapshot in this store complete, as far as a machine without the identity can
//! tell?
//!
//! From plaintext only (listings, `refs.txt.gz`, the marker, locks), under the shared lock so that
//! no prune deletes anything meanwhile:
//! - every complete snapshot (one with a manifest) has its summary, refs, dump and file list;
//! - its `refs.txt.gz` reads, and every content address in it exists in `data/`, with at least the
//!   size of the smallest age file (an object cut to nothing by a full disk is found here; a
//!   truncation of a larger one needs the file list's sizes, that is the identity);
//! - leftovers are counted and named, not errors: folders without a manifest (interrupted backups),
//!   staging folders of dead runs (folder stores), stale locks, objects in `data/` that are not
//!   content objects, content that no snapshot references (what `prune` removes).
//!
//! Each problem names the object and the snapshots that need it: what a restore of each would miss.
//!
//! [`drill`] goes further, with the identity: it replays a snapshot's dump into a throwaway server.

pub mod drill;

use std::collections::HashMap;

use futures::StreamExt;
use serde::Serialize;

use crate::config::LockConfig;
use crate::error::{Error, Result};
use crate::format::{ContentId, Object};
use crate::repo::lock::{self, Lock, LockKind};
use crate::repo::{sealed_payload_len, snapshots, Repository};

/// The smallest stored size a content object can have: an age header with one X25519 stanza, the
/// payload nonce and one (empty) chunk's tag. Anything smaller cannot decrypt.
pub const SMALLEST_SEALED: u64 = 150;

/// What `check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub store: String,
    /// The repository's id (from its marker).
    pub repository: String,
    /// Complete snapshots checked.
    pub snapshots: u64,
    /// Distinct content objects the snapshots reference.
    pub content_referenced: u64,
    /// Content objects in the store.
    pub content_stored: u64,
    /// Bytes of the content objects in the store.
    pub content_bytes: u64,
    /// What would make a restore fail or miss files, by object.
    pub problems: Vec<Problem>,
    pub leftovers: Leftovers,
    /// No problems.
    pub ok: bool,
}

/// One object that is missing or damaged, and the snapshots that need it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub problem: String,
    pub snapshots: Vec<String>,
}

/// What is left over from interrupted or removed work: not errors (`prune` removes most of it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Leftovers {
    /// Snapshot folders without a manifest (interrupted backups, or forgets).
    pub incomplete_snapshots: Vec<String>,
    /// Staging folders of other runs (folder stores): the next backup adopts or removes them.
    pub staging: Vec<String>,
    /// Locks whose holder is gone, each with why.
    pub stale_locks: Vec<String>,
    /// Content objects no complete snapshot references.
    pub unreferenced_content: u64,
    pub unreferenced_bytes: u64,
    /// Objects in `data/` that are not content objects.
    pub stray_objects: Vec<String>,
}

/// Check the store's structure; `lock` is the `[lock]` config, or `None` to check without the
/// store lock (read-only credentials; a prune running meanwhile could make objects look missing).
pub async fn check(repo: &Repository, lock: Option<&LockConfig>) -> Result<CheckReport> {
    let marker = snapshots::require_marker(repo).await?;
    let Some(cfg) = lock else {
        tracing::warn!("--no-lock: checking without the store lock; a prune running meanwhile could make objects look missing");
        return check_locked(repo, &marker.id, None).await;
    };
    let held = Lock::acquire(repo, LockKind::Shared, "check", cfg).await?;
    let result = tokio::select! {
        r = check_locked(repo, &marker.id, Some(cfg)) => r,
        e = held.lost() => Err(e),
    };
    held.release().await;
    result
}

async fn check_locked(
    repo: &Repository,
    repository: &str,
    lock_cfg: Option<&LockConfig>,
) -> Result<CheckReport> {
    let mut report = CheckReport {
        store: repo.url().to_string(),
        repository: repository.to_string(),
        ..Default::default()
    };
    let folders = snapshots::list_folders(repo).await?;
    let mut ids: Vec<String> = Vec::new();
    // Content address → the snapshots (indexes into `ids`) that reference it.
    let mut referenced: HashMap<ContentId, Vec<u32>> = HashMap::new();
    for (id, folder) in &folders {
        if !folder.complete {
            report.leftovers.incomplete_snapshots.push(id.clone());
            continue;
        }
        report.snapshots += 1;
        let index = ids.len() as u32;
        ids.push(id.clone());
        let has = |obj: &Object| folder.objects.iter().any(|o| o.key == obj.key());
        for obj in [
            Object::Summary(id.clone()),
            Object::Dump(id.clone()),
            Object::Files(id.clone()),
        ] {
            if !has(&obj) {
                report.problems.push(missing(&obj, id));
            }
        }
        let refs = Object::Refs(id.clone());
        if !has(&refs) {
            report.problems.push(missing(&refs, id));
            continue;
        }
        let found = snapshots::read_refs(repo, id, |c| {
            let users = referenced.entry(c).or_default();
            if users.last() != Some(&index) {
                users.push(index);
            }
        })
        .await;
        let why = match found {
            Ok(()) => continue,
            Err(Error::Missing { .. }) => "missing from the store".to_string(),
            Err(Error::Corrupt { message, .. }) => format!("damaged ({message})"),
            Err(e) => return Err(e),
        };
        report.problems.push(Problem {
            object: refs.key(),
            problem: format!("{why}: the content this snapshot needs is not known"),
            snapshots: vec![id.clone()],
        });
    }
    report.content_referenced = referenced.len() as u64;
    check_content(repo, &mut report, &mut referenced, &ids).await?;
    // What is referenced and was not found.
    let mut lost: Vec<(ContentId, Vec<u32>)> = referenced.into_iter().collect();
    lost.sort_unstable_by_key(|(c, _)| *c);
    for (c, users) in lost {
        report.problems.push(Problem {
            object: Object::Content(c).key(),
            problem: "missing from the store".into(),
            snapshots: names(&users, &ids),
        });
    }
    leftovers(repo, &mut report, lock_cfg).await?;
    report.ok = report.problems.is_empty();
    tracing::info!(
        snapshots = report.snapshots,
        content = report.content_stored,
        problems = report.problems.len(),
        "check done"
    );
    Ok(report)
}

/// The ids of the snapshots at `users` (indexes into `ids`).
fn names(users: &[u32], ids: &[String]) -> Vec<String> {
    users.iter().map(|i| ids[*i as usize].clone()).collect()
}

fn missing(obj: &Object, id: &str) -> Problem {
    Problem {
        object: obj.key(),
        problem: "missing from the store".into(),
        snapshots: vec![id.to_string()],
    }
}

/// One listing of `data/`: found objects leave `referenced` (what remains is missing); sizes no
/// age file can have are problems; the rest is counted.
async fn check_content(
    repo: &Repository,
    report: &mut CheckReport,
    referenced: &mut HashMap<ContentId, Vec<u32>>,
    ids: &[String],
) -> Result<()> {
    let smallest = SMALLEST_SEALED.max(sealed_payload_len(0));
    let mut listing = std::pin::pin!(repo.data_objects());
    while let Some(item) = listing.next().await {
        let (object, id) = item?;
        let Some(id) = id else {
            report.leftovers.stray_objects.push(object.key);
            continue;
        };
        report.content_stored += 1;
        report.content_bytes += object.size;
        match referenced.remove(&id) {
            Some(users) if object.size < smallest => report.problems.push(Problem {
                object: object.key,
                problem: format!(
                    "{} bytes: smaller than any age file ({smallest} bytes at least), so truncated",
                    object.size
                ),
                snapshots: names(&users, ids),
            }),
            Some(_) => {}
            None => {
                report.leftovers.unreferenced_content += 1;
                report.leftovers.unreferenced_bytes += object.size;
            }
        }
    }
    Ok(())
}

/// Staging folders and stale locks.
async fn leftovers(
    repo: &Repository,
    report: &mut CheckReport,
    lock_cfg: Option<&LockConfig>,
) -> Result<()> {
    report.leftovers.staging = repo
        .other_staging()
        .await?
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    let stale = lock_cfg.cloned().unwrap_or_default().stale();
    report.leftovers.stale_locks = lock::list(repo, stale)
        .await?
        .into_iter()
        .filter_map(|l| {
            l.stale
                .clone()
                .map(|why| format!("{}: {why}", l.describe()))
        })
        .collect();
    Ok(())
}
