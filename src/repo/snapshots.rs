//! Snapshots as a store lists them: which folders exist, which are complete, and the repository
//! marker that says a store is ours.
//!
//! Only listings and plaintext objects: nothing here needs a key. What a snapshot holds is read
//! through [`crate::repo::Reader`], which checks it.

use std::collections::BTreeMap;

use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{
    snapshot_key, RepoMarker, Summary, FORMAT_VERSION, MANIFEST_OBJECT, REPO_MARKER,
    SIGNATURE_OBJECT, SNAPSHOTS_DIR, SUMMARY_OBJECT,
};
use crate::store::check::{self, fail, record, Failure, InitReport, Status};
use crate::store::Store;

/// A snapshot as found in the store.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub id: String,
    /// The manifest exists: the snapshot is complete.
    pub complete: bool,
    pub summary: Option<Summary>,
}

/// Every snapshot id in the store with whether it is complete, oldest first.
pub async fn list_ids(store: &Store) -> Result<BTreeMap<String, bool>> {
    Ok(list_folders(store)
        .await?
        .into_iter()
        .map(|(id, f)| (id, f.complete))
        .collect())
}

/// What a snapshot folder holds, as far as a listing tells.
#[derive(Debug, Clone, Copy, Default)]
pub struct Folder {
    /// The manifest exists: the snapshot is complete.
    pub complete: bool,
    /// A `signature.json` exists (whether it verifies is another matter).
    pub signed: bool,
}

/// Every snapshot folder in the store, oldest first.
pub async fn list_folders(store: &Store) -> Result<BTreeMap<String, Folder>> {
    let mut ids: BTreeMap<String, Folder> = BTreeMap::new();
    let mut s = std::pin::pin!(store.list(SNAPSHOTS_DIR));
    while let Some(item) = s.next().await {
        let (key, _) = item?;
        let mut parts = key.split('/').skip(1);
        if let (Some(id), Some(name)) = (parts.next(), parts.next()) {
            let folder = ids.entry(id.to_string()).or_default();
            folder.complete |= name == MANIFEST_OBJECT;
            folder.signed |= name == SIGNATURE_OBJECT;
        }
    }
    Ok(ids)
}

/// Complete snapshots with their plaintext summaries, oldest first.
pub async fn list(store: &Store) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for (id, complete) in list_ids(store).await? {
        if !complete {
            continue;
        }
        let summary = match store.get_bytes(&snapshot_key(&id, SUMMARY_OBJECT)).await {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(_) => None,
        };
        out.push(Listed {
            id,
            complete,
            summary,
        });
    }
    Ok(out)
}

/// Resolve `latest` or an id (or a unique id prefix) to a complete snapshot id.
pub async fn resolve(store: &Store, wanted: &str) -> Result<String> {
    let ids = list_ids(store).await?;
    let complete: Vec<&String> = ids.iter().filter(|(_, c)| **c).map(|(id, _)| id).collect();
    if wanted == "latest" {
        return complete.last().map(|s| s.to_string()).ok_or_else(|| {
            Error::Usage(format!(
                "no complete snapshot in {}; run `immich-backup backup` first",
                store.url()
            ))
        });
    }
    let matches: Vec<&&String> = complete
        .iter()
        .filter(|id| id.starts_with(wanted))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.to_string()),
        [] if ids.contains_key(wanted) => Err(Error::Usage(format!(
            "snapshot {wanted} is incomplete (its backup was interrupted); choose another with `immich-backup snapshots`"
        ))),
        [] => Err(Error::Usage(format!("no snapshot {wanted}; list them with `immich-backup snapshots`"))),
        _ => Err(Error::Usage(format!("snapshot prefix {wanted} is ambiguous; give more of the id"))),
    }
}

/// Read the repository marker, or `None` for an empty store.
pub async fn read_marker(store: &Store) -> Result<Option<RepoMarker>> {
    match store.get_bytes(REPO_MARKER).await {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                object: REPO_MARKER.into(),
                message: e.to_string(),
            }),
        Err(Error::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Make sure the store is ours: read the marker, or write one into an empty store.
pub async fn open_or_init(store: &Store) -> Result<RepoMarker> {
    if let Some(m) = read_marker(store).await? {
        if m.format > FORMAT_VERSION {
            return Err(Error::Usage(format!(
                "the store uses format {} but this immich-backup reads format {FORMAT_VERSION}; upgrade immich-backup",
                m.format
            )));
        }
        return Ok(m);
    }
    let marker = RepoMarker {
        format: FORMAT_VERSION,
        id: hex::encode(rand::random::<[u8; 16]>()),
        created: Utc::now(),
        tool: format!("immich-backup {}", env!("CARGO_PKG_VERSION")),
    };
    let body = serde_json::to_vec_pretty(&marker).expect("marker serialises");
    if !store.put_new(REPO_MARKER, body.into()).await? {
        // Another run created it first: use theirs.
        return read_marker(store)
            .await?
            .ok_or_else(|| Error::Other("repository marker vanished".into()));
    }
    Ok(marker)
}

/// Require an existing repository (for commands that read).
pub async fn require_marker(store: &Store) -> Result<RepoMarker> {
    read_marker(store).await?.ok_or_else(|| Error::Storage {
        url: store.url().to_string(),
        message:
            "no immich-backup repository here (immich-backup.json is missing); check [storage] url"
                .into(),
    })
}

/// `init`: check what the store can do ([`crate::store::check`]), then open the repository marker
/// or create it in an empty store.
pub async fn init(store: &Store) -> InitReport {
    let mut report = check::run(store).await;
    if report.ok {
        let existed = read_marker(store).await;
        let r = match existed {
            Ok(Some(m)) if m.format > FORMAT_VERSION => Err(Failure {
                detail: format!(
                    "the store holds format {} but this immich-backup knows format {}",
                    m.format, FORMAT_VERSION
                ),
                remedy: "upgrade immich-backup".into(),
            }),
            Ok(Some(m)) => {
                report.repository = Some(m.id.clone());
                report.format = Some(m.format);
                Ok((
                    Status::Ok,
                    format!("existing repository {} (format {})", m.id, m.format),
                ))
            }
            Ok(None) => match open_or_init(store).await {
                Ok(m) => {
                    report.created = true;
                    report.repository = Some(m.id.clone());
                    report.format = Some(m.format);
                    Ok((
                        Status::Ok,
                        format!("created repository {} (format {})", m.id, m.format),
                    ))
                }
                Err(e) => Err(fail(store, e)),
            },
            Err(e) => Err(fail(store, e)),
        };
        let ok = record(&mut report.checks, "repository", r);
        report.ok = ok;
    }
    report
}
