//! `forget` and `prune`, restic style, without the identity.
//!
//! - **forget** applies the `[retention]` policy ([`crate::policy::retention`]) to the complete snapshots and
//!   deletes the expired ones: first the manifest (the snapshot stops being visible), then the rest
//!   of its folder.
//! - **prune** removes what no snapshot needs any more: folders without a manifest (forgotten
//!   snapshots whose deletion was interrupted, and interrupted backups) whose backup started more
//!   than `[lock] stale_secs` ago, and every content object that no remaining snapshot references.
//!
//! Both read only plaintext: the snapshot list, `summary.json` (times) and `refs.txt.gz` (the content
//! addresses a snapshot uses, written by the backup before its manifest). Both take the exclusive
//! lock ([`crate::repo::lock`]), so no backup runs meanwhile: a running backup holds a shared lock from
//! before it lists the stored content until after its manifest is written, which is what makes it
//! safe to delete content that "no snapshot references". `--dry-run` takes no lock and deletes
//! nothing. A complete snapshot whose `refs.txt.gz` is missing or unreadable stops prune before it
//! deletes anything.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::config::Config;
use crate::config::LockConfig;
use crate::error::{Error, Result};
use crate::format::{self, ContentId, Summary};
use crate::policy::retention::{self, Candidate, Decision, RetentionConfig};
use crate::repo::lock::{Lock, LockKind};
use crate::repo::snapshots;
use crate::store::Store;

/// Deletions in flight at once.
const DELETE_CONCURRENCY: usize = 16;

/// What `forget` decided and did.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    /// The policy in words, with its time zone.
    pub policy: String,
    /// Every complete snapshot, newest first, with the rules that keep it.
    pub decisions: Vec<Decision>,
    pub kept: usize,
    /// Snapshots removed (with `--dry-run`: that would be removed).
    pub removed: Vec<String>,
    pub prune: Option<PruneReport>,
}

/// What `prune` found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Complete snapshots whose references were read.
    pub snapshots: usize,
    /// Folders without a manifest removed (older than the lock stale timeout).
    pub incomplete_removed: Vec<String>,
    /// Folders without a manifest kept because they are recent (a backup may still be writing them).
    pub incomplete_kept: Vec<String>,
    /// Content objects still referenced.
    pub content_referenced: u64,
    pub content_removed: u64,
    pub content_bytes_removed: u64,
    /// Objects and bytes removed in all (snapshot folders and content).
    pub objects_removed: u64,
    pub bytes_removed: u64,
    /// Objects and bytes in the store afterwards (`data/` and `snapshots/`).
    pub store_objects: u64,
    pub store_bytes: u64,
}

/// One `snapshots/<id>/` folder as listed.
struct Folder {
    /// It has a manifest.
    complete: bool,
    objects: Vec<(String, u64)>,
}

/// The zone the retention rules count in.
pub fn retention_timezone(cfg: &Config) -> Result<Tz> {
    let name = if cfg.retention.timezone.is_empty() {
        &cfg.schedule.timezone
    } else {
        &cfg.retention.timezone
    };
    retention::parse_timezone(name, "[retention] timezone")
}

/// The time in a snapshot id (`YYYYMMDDTHHMMSS.mmmZ-…`, or whole seconds as older ids had).
pub fn id_time(id: &str) -> Option<DateTime<Utc>> {
    let stamp = id.split('-').next()?;
    NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ")
        .or_else(|_| NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ"))
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn id_time_reads_new_and_old_ids() {
        let now = chrono::Utc::now();
        let id = crate::format::new_snapshot_id(now);
        let t = id_time(&id).expect("parses a fresh id");
        assert_eq!(t.timestamp_millis(), now.timestamp_millis());
        let old = id_time("20261125T035314Z-67811777").expect("parses an old id");
        assert_eq!(old.to_rfc3339(), "2026-11-25T03:53:14+00:00");
    }
}

/// Complete snapshots with their times (from `summary.json`, else from the id), oldest first.
pub async fn candidates(store: &Store) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for (id, complete) in snapshots::list_ids(store).await? {
        if !complete {
            continue;
        }
        let summary: Option<Summary> = store
            .get_bytes(&format::snapshot_key(&id, format::SUMMARY_OBJECT))
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let time = match summary.map(|s| s.time).or_else(|| id_time(&id)) {
            Some(t) => t,
            None => {
                tracing::warn!(snapshot = %id, "snapshot has neither a summary nor a dated id; it is always kept");
                continue;
            }
        };
        out.push(Candidate { id, time });
    }
    Ok(out)
}

/// Apply the policy; with `prune`, prune afterwards under the same lock.
pub async fn forget(
    store: &Store,
    policy: &RetentionConfig,
    tz: Tz,
    lock_cfg: &LockConfig,
    dry_run: bool,
    prune_after: bool,
) -> Result<ForgetReport> {
    snapshots::require_marker(store).await?;
    let lock = if dry_run {
        None
    } else {
        Some(Lock::acquire(store, LockKind::Exclusive, "forget", lock_cfg).await?)
    };
    let result = match &lock {
        Some(l) => tokio::select! {
            r = forget_locked(store, policy, tz, lock_cfg, dry_run, prune_after) => r,
            e = l.lost() => Err(e),
        },
        None => forget_locked(store, policy, tz, lock_cfg, dry_run, prune_after).await,
    };
    if let Some(l) = lock {
        l.release().await;
    }
    result
}

async fn forget_locked(
    store: &Store,
    policy: &RetentionConfig,
    tz: Tz,
    lock_cfg: &LockConfig,
    dry_run: bool,
    prune_after: bool,
) -> Result<ForgetReport> {
    let candidates = candidates(store).await?;
    let decisions = retention::apply(&candidates, policy, tz);
    let mut removed: Vec<String> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.id.clone())
        .collect();
    removed.sort(); // oldest first
    if !dry_run {
        for id in &removed {
            remove_snapshot(store, id).await?;
            tracing::info!(snapshot = %id, "forgot snapshot");
        }
    }
    let prune = if prune_after {
        Some(prune_locked(store, lock_cfg, dry_run, &removed).await?)
    } else {
        None
    };
    Ok(ForgetReport {
        dry_run,
        policy: policy.describe(tz),
        kept: decisions.iter().filter(|d| d.keep).count(),
        decisions,
        removed,
        prune,
    })
}

/// Delete a snapshot: the manifest first, so it is never visible half-deleted; then its folder.
async fn remove_snapshot(store: &Store, id: &str) -> Result<(u64, u64)> {
    store
        .delete(&format::snapshot_key(id, format::MANIFEST_OBJECT))
        .await?;
    let objects = store
        .list_keys(&format!("{}/{id}", format::SNAPSHOTS_DIR))
        .await?;
    let n = objects.len() as u64;
    let bytes = objects.iter().map(|(_, s)| s).sum();
    delete_all(store, objects.into_iter().map(|(k, _)| k)).await?;
    Ok((n, bytes))
}

async fn delete_all(store: &Store, keys: impl Iterator<Item = String>) -> Result<()> {
    futures::stream::iter(keys)
        .map(|k| async move { store.delete(&k).await })
        .buffer_unordered(DELETE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Read a snapshot's plaintext references into `into`.
async fn read_refs(store: &Store, id: &str, into: &mut HashSet<ContentId>) -> Result<()> {
    let key = format::snapshot_key(id, format::REFS_OBJECT);
    let gz = store.get_bytes(&key).await.map_err(|e| match e {
        Error::Missing { object, .. } => Error::Missing {
            object,
            hint: format!(
                "snapshot {id} has no reference list, so prune cannot tell what it uses; nothing was deleted. Remove that snapshot's folder or restore it from a copy of the store"
            ),
        },
        other => other,
    })?;
    let corrupt = |message: String| Error::Corrupt {
        object: key.clone(),
        message: format!("{message}; prune stopped before deleting anything"),
    };
    for id in format::parse_refs(&gz) {
        into.insert(id.map_err(corrupt)?);
    }
    Ok(())
}

/// `prune`: take the exclusive lock and remove what no snapshot needs.
pub async fn prune(store: &Store, lock_cfg: &LockConfig, dry_run: bool) -> Result<PruneReport> {
    snapshots::require_marker(store).await?;
    if dry_run {
        return prune_locked(store, lock_cfg, true, &[]).await;
    }
    let lock = Lock::acquire(store, LockKind::Exclusive, "prune", lock_cfg).await?;
    let result = tokio::select! {
        r = prune_locked(store, lock_cfg, false, &[]) => r,
        e = lock.lost() => Err(e),
    };
    lock.release().await;
    result
}

/// Prune with the exclusive lock held (or as a dry run). `forgotten` are snapshots a dry-run
/// `forget` would have removed: they count as gone.
async fn prune_locked(
    store: &Store,
    lock_cfg: &LockConfig,
    dry_run: bool,
    forgotten: &[String],
) -> Result<PruneReport> {
    let now = Utc::now();
    let forgotten: HashSet<&str> = forgotten.iter().map(String::as_str).collect();
    let mut report = PruneReport {
        dry_run,
        ..Default::default()
    };

    // Snapshot folders: complete ones (with a manifest) and the rest.
    let mut folders: BTreeMap<String, Folder> = BTreeMap::new();
    let mut listing = std::pin::pin!(store.list(format::SNAPSHOTS_DIR));
    while let Some(item) = listing.next().await {
        let (key, size) = item?;
        let mut parts = key.split('/').skip(1);
        let (Some(id), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        if forgotten.contains(id) {
            // A dry-run forget would have removed it.
            report.objects_removed += 1;
            report.bytes_removed += size;
            continue;
        }
        let f = folders.entry(id.to_string()).or_insert(Folder {
            complete: false,
            objects: Vec::new(),
        });
        f.complete |= name == format::MANIFEST_OBJECT;
        f.objects.push((key, size));
    }

    // Every reference of every complete snapshot, and of recent incomplete ones.
    let mut referenced: HashSet<ContentId> = HashSet::new();
    let mut stale_folders = Vec::new();
    for (id, Folder { complete, objects }) in folders {
        if complete {
            read_refs(store, &id, &mut referenced).await?;
            report.snapshots += 1;
            continue;
        }
        // Its age: the start of the backup that wrote it (ids begin with that time).
        let old = id_time(&id).is_none_or(|started| {
            now.signed_duration_since(started).num_seconds() >= lock_cfg.stale_secs as i64
        });
        if old {
            stale_folders.push((id, objects));
        } else {
            // Maybe a backup still writing (its lock would have stopped us, but be generous).
            if objects
                .iter()
                .any(|(k, _)| k.ends_with(format::REFS_OBJECT))
            {
                let _ = read_refs(store, &id, &mut referenced).await;
            }
            report.incomplete_kept.push(id);
        }
    }
    report.content_referenced = referenced.len() as u64;

    // Content nobody references.
    let mut unreferenced = Vec::new();
    let mut data_objects = 0u64;
    let mut data_bytes = 0u64;
    let mut listing = std::pin::pin!(store.list(format::DATA_DIR));
    while let Some(item) = listing.next().await {
        let (key, size) = item?;
        data_objects += 1;
        data_bytes += size;
        match ContentId::from_key(&key) {
            Some(id) if id.key() == key => {
                if !referenced.contains(&id) {
                    unreferenced.push((key, size));
                }
            }
            _ => tracing::warn!(object = %key, "not a content object; left alone"),
        }
    }

    // Delete: stale folders first (manifest-less already), then content.
    for (id, objects) in stale_folders {
        report.objects_removed += objects.len() as u64;
        report.bytes_removed += objects.iter().map(|(_, s)| s).sum::<u64>();
        if !dry_run {
            delete_all(store, objects.into_iter().map(|(k, _)| k)).await?;
            tracing::info!(snapshot = %id, "removed an incomplete snapshot folder");
        }
        report.incomplete_removed.push(id);
    }
    report.content_removed = unreferenced.len() as u64;
    report.content_bytes_removed = unreferenced.iter().map(|(_, s)| s).sum();
    report.objects_removed += report.content_removed;
    report.bytes_removed += report.content_bytes_removed;
    if !dry_run {
        delete_all(store, unreferenced.into_iter().map(|(k, _)| k)).await?;
    }

    let (snap_objects, snap_bytes) =
        crate::store::count_objects(store, format::SNAPSHOTS_DIR).await?;
    if dry_run {
        report.store_objects = data_objects + snap_objects - report.objects_removed;
        report.store_bytes = data_bytes + snap_bytes - report.bytes_removed;
    } else {
        let (d_objects, d_bytes) = crate::store::count_objects(store, format::DATA_DIR).await?;
        report.store_objects = d_objects + snap_objects;
        report.store_bytes = d_bytes + snap_bytes;
    }
    tracing::info!(
        snapshots = report.snapshots,
        content_removed = report.content_removed,
        bytes_removed = report.bytes_removed,
        incomplete_removed = report.incomplete_removed.len(),
        dry_run,
        "prune done"
    );
    Ok(report)
}

/// Bytes and objects in the store's `data/` and `snapshots/` (for metrics).
pub async fn store_usage(store: &Store) -> Result<(u64, u64)> {
    let (a, ab) = crate::store::count_objects(store, format::DATA_DIR).await?;
    let (b, bb) = crate::store::count_objects(store, format::SNAPSHOTS_DIR).await?;
    Ok((a + b, ab + bb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_time_parses_snapshot_ids() {
        let t = id_time("20261125T035314Z-67811777").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-25T03:53:14+00:00");
        assert!(id_time("garbage").is_none());
    }
}
