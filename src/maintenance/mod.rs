//! `forget` and `prune`, restic style, without the identity.
//!
//! - **forget** applies the `[retention]` policy ([`crate::policy::retention`]) to the complete snapshots and
//!   deletes the expired ones: first the manifest (the snapshot stops being visible), then the rest
//!   of its folder.
//! - **prune** removes what no snapshot needs any more: folders without a manifest (forgotten
//!   snapshots whose deletion was interrupted, and interrupted backups) whose backup started more
//!   than `[lock] stale_secs` ago, every content object that no remaining snapshot references, and
//!   on WebDAV and SFTP stores the temporary upload names killed uploads left (as old).
//!
//! Both read only plaintext: the snapshot list, `summary.json` (times) and `refs.txt.gz` (the content
//! addresses a snapshot uses, written by the backup before its manifest). Both take the exclusive
//! lock ([`crate::repo::lock`]), so no backup runs meanwhile: a running backup holds a shared lock from
//! before it lists the stored content until after its manifest is written, which is what makes it
//! safe to delete content that "no snapshot references". `--dry-run` takes no lock and deletes
//! nothing. A complete snapshot whose `refs.txt.gz` is missing or unreadable stops prune before it
//! deletes anything.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use futures::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::config::LockConfig;
use crate::error::{Error, Result};
use crate::format::{self, ContentId, Object, Summary};
use crate::policy::retention::{self, Candidate, Decision, RetentionConfig};
use crate::repo::lock::{Lock, LockKind};
use crate::repo::Repository;
use crate::repo::{keys, snapshots};

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
    /// Temporary upload names (`….immich-backup-partial-…` on WebDAV and SFTP stores) older than
    /// the lock stale timeout removed: what killed uploads left.
    pub temporaries_removed: u64,
    pub temporary_bytes_removed: u64,
    /// Content objects still referenced.
    pub content_referenced: u64,
    pub content_removed: u64,
    pub content_bytes_removed: u64,
    /// Objects and bytes removed in all (snapshot folders and content).
    pub objects_removed: u64,
    pub bytes_removed: u64,
    /// Repository key folders removed: no snapshot is sealed to them any more, and a newer key
    /// is in use (`keys/<folder>/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys_removed: Vec<String>,
    /// Objects and bytes in the store afterwards (`data/` and `snapshots/`).
    pub store_objects: u64,
    pub store_bytes: u64,
}

/// One `snapshots/<id>/` folder as listed.
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
pub(crate) fn id_time(id: &str) -> Option<DateTime<Utc>> {
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
pub(crate) async fn candidates(repo: &Repository) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for (id, complete) in snapshots::list_ids(repo).await? {
        if !complete {
            continue;
        }
        let summary: Option<Summary> = repo.get_json(&Object::Summary(id.clone())).await.ok();
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
    repo: &Repository,
    policy: &RetentionConfig,
    tz: Tz,
    lock_cfg: &LockConfig,
    dry_run: bool,
    prune_after: bool,
) -> Result<ForgetReport> {
    snapshots::require_marker(repo).await?;
    let lock = if dry_run {
        None
    } else {
        Some(Lock::acquire(repo, LockKind::Exclusive, "forget", lock_cfg).await?)
    };
    let result = match &lock {
        Some(l) => tokio::select! {
            r = forget_locked(repo, policy, tz, lock_cfg, dry_run, prune_after) => r,
            e = l.lost() => Err(e),
        },
        None => forget_locked(repo, policy, tz, lock_cfg, dry_run, prune_after).await,
    };
    if let Some(l) = lock {
        l.release().await;
    }
    result
}

async fn forget_locked(
    repo: &Repository,
    policy: &RetentionConfig,
    tz: Tz,
    lock_cfg: &LockConfig,
    dry_run: bool,
    prune_after: bool,
) -> Result<ForgetReport> {
    let candidates = candidates(repo).await?;
    let decisions = retention::apply(&candidates, policy, tz);
    let mut removed: Vec<String> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.id.clone())
        .collect();
    removed.sort(); // oldest first
    if !dry_run {
        for id in &removed {
            snapshots::remove(repo, id).await?;
            tracing::info!(snapshot = %id, "forgot snapshot");
        }
    }
    let prune = if prune_after {
        Some(prune_locked(repo, lock_cfg, dry_run, &removed).await?)
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

/// Read a snapshot's plaintext references into `into`; an error says prune deleted nothing.
async fn read_refs(repo: &Repository, id: &str, into: &mut HashSet<ContentId>) -> Result<()> {
    snapshots::read_refs(repo, id, |c| {
        into.insert(c);
    })
    .await
    .map_err(|e| match e {
        Error::Missing { object, .. } => Error::Missing {
            object,
            hint: format!(
                "snapshot {id} has no reference list, so prune cannot tell what it uses; nothing was deleted. Remove that snapshot's folder or restore it from a copy of the store"
            ),
        },
        Error::Corrupt { object, message } => Error::Corrupt {
            object,
            message: format!("{message}; prune stopped before deleting anything"),
        },
        other => other,
    })
}

/// `prune`: take the exclusive lock and remove what no snapshot needs.
pub async fn prune(repo: &Repository, lock_cfg: &LockConfig, dry_run: bool) -> Result<PruneReport> {
    snapshots::require_marker(repo).await?;
    if dry_run {
        return prune_locked(repo, lock_cfg, true, &[]).await;
    }
    let work = prune_locked(repo, lock_cfg, false, &[]);
    Lock::hold(repo, LockKind::Exclusive, "prune", lock_cfg, work).await
}

/// Prune with the exclusive lock held (or as a dry run). `forgotten` are snapshots a dry-run
/// `forget` would have removed: they count as gone.
async fn prune_locked(
    repo: &Repository,
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
    let mut folders: BTreeMap<String, snapshots::Folder> = snapshots::list_folders(repo).await?;
    folders.retain(|id, f| {
        if forgotten.contains(id.as_str()) {
            // A dry-run forget would have removed it.
            report.objects_removed += f.objects.len() as u64;
            report.bytes_removed += f.objects.iter().map(|o| o.size).sum::<u64>();
            return false;
        }
        true
    });

    // Every reference of every complete snapshot, and of recent incomplete ones.
    let mut referenced: HashSet<ContentId> = HashSet::new();
    let mut stale_folders = Vec::new();
    let mut keys_in_use = KeysInUse::default();
    for (id, folder) in folders {
        let objects = folder.objects;
        if folder.complete {
            read_refs(repo, &id, &mut referenced).await?;
            keys_in_use.read(repo, &id).await;
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
            if objects.iter().any(|o| o.key.ends_with(format::REFS_OBJECT)) {
                let _ = read_refs(repo, &id, &mut referenced).await;
            }
            keys_in_use.unknown = true;
            report.incomplete_kept.push(id);
        }
    }
    report.content_referenced = referenced.len() as u64;

    // Content nobody references.
    let mut unreferenced = Vec::new();
    let mut data_objects = 0u64;
    let mut data_bytes = 0u64;
    let mut listing = std::pin::pin!(repo.data_objects());
    while let Some(item) = listing.next().await {
        let (object, id) = item?;
        data_objects += 1;
        data_bytes += object.size;
        match id {
            Some(id) => {
                if !referenced.contains(&id) {
                    unreferenced.push(object);
                }
            }
            None => tracing::warn!(object = %object.key, "not a content object; left alone"),
        }
    }

    // Delete: stale folders first (manifest-less already), then content.
    for (id, objects) in stale_folders {
        report.objects_removed += objects.len() as u64;
        report.bytes_removed += objects.iter().map(|o| o.size).sum::<u64>();
        if !dry_run {
            repo.delete_listed(objects.into_iter()).await?;
            tracing::info!(snapshot = %id, "removed an incomplete snapshot folder");
        }
        report.incomplete_removed.push(id);
    }
    for folder in keys_in_use.removable(repo).await? {
        if !dry_run {
            keys_in_use.delete(repo, &folder).await?;
            tracing::info!(key = %folder.name, "removed a repository key no snapshot uses");
        }
        report.keys_removed.push(folder.name);
    }
    report.content_removed = unreferenced.len() as u64;
    report.content_bytes_removed = unreferenced.iter().map(|o| o.size).sum();
    report.objects_removed += report.content_removed;
    report.bytes_removed += report.content_bytes_removed;
    if !dry_run && !unreferenced.is_empty() {
        // Backups that trust their record of the stored content see the mark and list again.
        repo.mark_prune().await?;
        repo.delete_listed(unreferenced.into_iter()).await?;
    }
    remove_temporaries(repo, lock_cfg, dry_run, &mut report).await?;

    if dry_run {
        // `data/` was listed above; nothing was deleted since.
        let (snap_objects, snap_bytes) = repo.snapshot_usage().await?;
        report.store_objects = data_objects + snap_objects - report.objects_removed;
        report.store_bytes = data_bytes + snap_bytes - report.bytes_removed;
    } else {
        (report.store_objects, report.store_bytes) = repo.usage().await?.total();
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

/// The repository keys the snapshots are sealed to, from their summaries: a key folder is removed
/// only when no snapshot uses it, a newer one is in use, and every summary could be read.
#[derive(Default)]
struct KeysInUse {
    used: BTreeSet<String>,
    unknown: bool,
}

impl KeysInUse {
    async fn read(&mut self, repo: &Repository, id: &str) {
        match repo
            .get_json::<Summary>(&Object::Summary(id.to_string()))
            .await
        {
            Ok(s) => self.used.extend(s.repository_key),
            Err(_) => self.unknown = true,
        }
    }

    async fn removable(&self, repo: &Repository) -> Result<Vec<keys::KeyFolder>> {
        let Some(newest_used) = self.used.last() else {
            return Ok(Vec::new());
        };
        if self.unknown {
            return Ok(Vec::new());
        }
        Ok(keys::list(repo)
            .await?
            .into_iter()
            .filter(|f| f.name < *newest_used && !self.used.contains(&f.name))
            .collect())
    }

    async fn delete(&self, repo: &Repository, folder: &keys::KeyFolder) -> Result<()> {
        // Machine files first: no backup starts sealing to a key that is on its way out.
        for m in &folder.machines {
            repo.delete(&Object::MachineFile {
                key: folder.name.clone(),
                machine: m.clone(),
            })
            .await?;
        }
        for r in &folder.recipients {
            repo.delete(&Object::KeyFile {
                key: folder.name.clone(),
                recipient: r.clone(),
            })
            .await?;
        }
        Ok(())
    }
}

/// Delete the temporary upload names killed uploads left on a WebDAV or SFTP store (older than the
/// lock stale timeout; the exclusive lock keeps backups out meanwhile).
async fn remove_temporaries(
    repo: &Repository,
    lock_cfg: &LockConfig,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<()> {
    let store = repo.store();
    let stale = store
        .stale_temporaries(std::time::Duration::from_secs(lock_cfg.stale_secs))
        .await?;
    for (key, size) in stale {
        if !dry_run {
            store.delete(&key).await?;
            tracing::info!(object = %key, "removed the temporary of a killed upload");
        }
        report.temporaries_removed += 1;
        report.temporary_bytes_removed += size;
    }
    Ok(())
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
