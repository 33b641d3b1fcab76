//! `stats [SNAPSHOT]`: how big the snapshots are, what each one alone keeps in the store, and how
//! big the store is.
//!
//! Works without the identity, from what the backup machine can read: each snapshot's plaintext
//! `summary.json` (files, bytes, dump size), its `refs.txt.gz` (the content objects it uses) and one
//! listing of the store (every object's stored size). A content object is *unique* to a snapshot when
//! no other complete snapshot references it (what forgetting that snapshot and pruning would free)
//! and *shared* otherwise. With the identity each snapshot is also opened as a restore opens it
//! (only authentic ones are counted) and its manifest adds folders, symlinks, tables and rows.
//!
//! Memory: one entry per content object in the store (about 50 bytes each), whatever the number
//! of snapshots; the refs are streamed.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{ContentId, Manifest, Object, Summary};
use crate::repo::snapshots;
use crate::repo::trust::{self, Trust};
use crate::repo::{Reader, Repository};

/// One snapshot's numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotStats {
    pub id: String,
    pub time: Option<DateTime<Utc>>,
    pub host: String,
    /// Files and their bytes (what a restore writes), from the summary.
    pub files: u64,
    pub bytes: u64,
    /// The compressed dump's size (plaintext gzip), from the summary.
    pub dump_bytes: u64,
    /// Content objects the snapshot references, and their stored bytes.
    pub content_objects: u64,
    pub content_stored_bytes: u64,
    /// Of those, the ones no other complete snapshot references.
    pub unique_objects: u64,
    pub unique_stored_bytes: u64,
    /// And the ones other snapshots reference too.
    pub shared_objects: u64,
    pub shared_stored_bytes: u64,
    /// The snapshot's own objects (dump, file list, manifest, refs…), stored bytes.
    pub snapshot_stored_bytes: u64,
    /// Referenced objects the store does not hold (`check` names them).
    pub missing_objects: u64,
    /// Why the refs could not be read, when they could not (the content figures are then 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refs_error: Option<String>,
    /// With the identity: from the authentic manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestStats>,
}

/// What the manifest adds (with the identity).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ManifestStats {
    pub dirs: u64,
    pub symlinks: u64,
    pub database: String,
    pub server_version: String,
    pub tables: u64,
    pub rows: u64,
}

impl ManifestStats {
    fn of(m: &Manifest) -> ManifestStats {
        ManifestStats {
            dirs: m.totals.dirs,
            symlinks: m.totals.symlinks,
            database: m.database.database.clone(),
            server_version: m.database.server_version.clone(),
            tables: m.database.row_counts.len() as u64,
            rows: m.database.row_counts.values().sum(),
        }
    }
}

/// The store as a whole.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub snapshots: u64,
    pub content_objects: u64,
    pub content_bytes: u64,
    /// Content objects no complete snapshot references (what `prune` removes).
    pub unreferenced_objects: u64,
    pub unreferenced_bytes: u64,
    pub snapshot_objects: u64,
    pub snapshot_bytes: u64,
    /// Everything in `data/` and `snapshots/`.
    pub total_bytes: u64,
    /// Files' bytes summed over the snapshots (what restoring every one would write), against
    /// `content_bytes`: what deduplication and compression save.
    pub snapshot_file_bytes: u64,
}

/// `stats`'s report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsReport {
    pub store: String,
    pub with_identity: bool,
    pub snapshots: Vec<SnapshotStats>,
    pub totals: StoreStats,
}

/// One content object: its stored size, the first snapshot (index) that references it, the last
/// one counted (a snapshot's refs may name an object more than once), and how many snapshots do.
#[derive(Clone, Copy, Default)]
struct Use {
    stored: u64,
    present: bool,
    owner: u32,
    last: u32,
    count: u32,
}

/// The numbers of every complete snapshot (or only of `only`: an id, a prefix or `latest`), with
/// the store's; `deep`: the reader and trust to open manifests with.
pub async fn stats(
    repo: &Repository,
    deep: Option<(&Reader, &Trust)>,
    only: Option<&str>,
) -> Result<StatsReport> {
    let folders = snapshots::list_folders(repo).await?;
    let only = match only {
        Some(w) => Some(snapshots::resolve(repo, w).await?),
        None => None,
    };
    let mut report = StatsReport {
        store: repo.url().to_string(),
        with_identity: deep.is_some(),
        ..Default::default()
    };
    let mut index: HashMap<ContentId, Use> = HashMap::new();
    let mut listing = std::pin::pin!(repo.data_objects());
    while let Some((object, id)) = listing.try_next().await? {
        report.totals.content_objects += 1;
        report.totals.content_bytes += object.size;
        if let Some(id) = id {
            index.insert(
                id,
                Use {
                    stored: object.size,
                    present: true,
                    ..Default::default()
                },
            );
        }
    }
    for f in folders.values() {
        report.totals.snapshot_objects += f.objects.len() as u64;
        report.totals.snapshot_bytes += f.objects.iter().map(|o| o.size).sum::<u64>();
    }
    report.totals.total_bytes = report.totals.content_bytes + report.totals.snapshot_bytes;
    let complete: Vec<(&String, &snapshots::Folder)> =
        folders.iter().filter(|(_, f)| f.complete).collect();
    report.totals.snapshots = complete.len() as u64;
    let trust = deep.map(|(_, t)| trust::legacy_aware(t, &folders));
    for (n, (id, folder)) in complete.iter().enumerate() {
        let mut s = SnapshotStats {
            id: id.to_string(),
            snapshot_stored_bytes: folder.objects.iter().map(|o| o.size).sum(),
            ..Default::default()
        };
        if let Ok(summary) = repo
            .get_json::<Summary>(&Object::Summary(id.to_string()))
            .await
        {
            s.time = Some(summary.time);
            s.host = summary.host;
            (s.files, s.bytes, s.dump_bytes) = (summary.files, summary.bytes, summary.dump_bytes);
        }
        report.totals.snapshot_file_bytes += s.bytes;
        let read = snapshots::read_refs(repo, id, |c| {
            let u = index.entry(c).or_default();
            if u.count > 0 && u.last == n as u32 {
                return;
            }
            if u.count == 0 {
                u.owner = n as u32;
            }
            u.last = n as u32;
            u.count += 1;
            s.content_objects += 1;
            s.content_stored_bytes += u.stored;
            s.missing_objects += u64::from(!u.present);
        })
        .await;
        if let Err(e @ (Error::Missing { .. } | Error::Corrupt { .. })) = read {
            tracing::warn!(snapshot = %id, "its refs cannot be read: {e}");
            s.refs_error = Some(e.to_string());
        } else {
            read?;
        }
        let wanted = only.as_ref().is_none_or(|o| o == *id);
        if let (Some((reader, _)), Some(trust), true) = (deep, &trust, wanted) {
            match trust::open(reader, trust, id).await {
                Ok(opened) => s.manifest = Some(ManifestStats::of(&opened.manifest)),
                Err(
                    e @ (Error::Unauthentic { .. } | Error::Corrupt { .. } | Error::Missing { .. }),
                ) => {
                    tracing::warn!(snapshot = %id, "its manifest is not counted: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        report.snapshots.push(s);
    }
    for u in index.values() {
        if u.count == 0 {
            report.totals.unreferenced_objects += 1;
            report.totals.unreferenced_bytes += u.stored;
        } else if u.count == 1 && u.present {
            let s = &mut report.snapshots[u.owner as usize];
            s.unique_objects += 1;
            s.unique_stored_bytes += u.stored;
        }
    }
    for s in &mut report.snapshots {
        s.shared_objects = s.content_objects - s.unique_objects - s.missing_objects;
        s.shared_stored_bytes = s.content_stored_bytes - s.unique_stored_bytes;
    }
    if let Some(id) = only {
        report.snapshots.retain(|s| s.id == id);
    }
    Ok(report)
}
