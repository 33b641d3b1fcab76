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
    self, ContentId, Object, RepoMarker, Summary, FORMAT_VERSION, MANIFEST_OBJECT,
    SIGNATURE_OBJECT, SNAPSHOTS_DIR,
};
use crate::repo::Repository;
use crate::store::check::{self, fail, record, Failure, InitReport, Status};

/// A snapshot as found in the store.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub id: String,
    /// The manifest exists: the snapshot is complete.
    pub complete: bool,
    pub summary: Option<Summary>,
}

/// Every snapshot id in the store with whether it is complete, oldest first.
pub async fn list_ids(repo: &Repository) -> Result<BTreeMap<String, bool>> {
    Ok(list_folders(repo)
        .await?
        .into_iter()
        .map(|(id, f)| (id, f.complete))
        .collect())
}

/// What a snapshot folder holds, as far as a listing tells.
#[derive(Debug, Clone, Default)]
pub struct Folder {
    /// The manifest exists: the snapshot is complete.
    pub complete: bool,
    /// A `signature.json` exists (whether it verifies is another matter).
    pub signed: bool,
    /// Every object in the folder (known names or not), with its stored size.
    pub objects: Vec<StoredObject>,
}

/// An object as a listing found it: its key, to hand back to `Repository::delete_listed`, and its
/// stored size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
}

/// Every snapshot folder in the store, oldest first.
pub(crate) async fn list_folders(repo: &Repository) -> Result<BTreeMap<String, Folder>> {
    let mut ids: BTreeMap<String, Folder> = BTreeMap::new();
    let mut s = std::pin::pin!(repo.store().list(SNAPSHOTS_DIR));
    while let Some(item) = s.next().await {
        let (key, size) = item?;
        let mut parts = key.split('/').skip(1);
        if let (Some(id), Some(name)) = (parts.next(), parts.next()) {
            let folder = ids.entry(id.to_string()).or_default();
            folder.complete |= name == MANIFEST_OBJECT;
            folder.signed |= name == SIGNATURE_OBJECT;
            folder.objects.push(StoredObject {
                key: key.clone(),
                size,
            });
        }
    }
    Ok(ids)
}

/// Hand each content address snapshot `id` references (its plaintext `refs.txt.gz`) to `each`. A
/// missing list is [`Error::Missing`]; a damaged one [`Error::Corrupt`] naming it, after the
/// addresses before the damage were handed over.
pub async fn read_refs(repo: &Repository, id: &str, mut each: impl FnMut(ContentId)) -> Result<()> {
    let object = Object::Refs(id.to_string());
    let gz = repo.get(&object).await?;
    for c in format::parse_refs(&gz) {
        each(c.map_err(|message| Error::Corrupt {
            object: object.key(),
            message,
        })?);
    }
    Ok(())
}

/// Delete snapshot `id`: the manifest first, so it is never visible half-deleted, then the rest of
/// its folder. Returns the objects and bytes removed.
pub async fn remove(repo: &Repository, id: &str) -> Result<(u64, u64)> {
    repo.delete(&Object::Manifest(id.to_string())).await?;
    let objects = repo
        .store()
        .list_keys(&format!("{SNAPSHOTS_DIR}/{id}"))
        .await?;
    let n = objects.len() as u64;
    let bytes = objects.iter().map(|(_, s)| s).sum();
    repo.delete_listed(
        objects
            .into_iter()
            .map(|(key, size)| StoredObject { key, size }),
    )
    .await?;
    Ok((n, bytes))
}

/// Complete snapshots with their plaintext summaries, oldest first.
pub async fn list(repo: &Repository) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for (id, complete) in list_ids(repo).await? {
        if !complete {
            continue;
        }
        let summary = repo.get_json(&Object::Summary(id.clone())).await.ok();
        out.push(Listed {
            id,
            complete,
            summary,
        });
    }
    Ok(out)
}

/// Resolve `latest` or an id (or a unique id prefix) to a complete snapshot id.
pub async fn resolve(repo: &Repository, wanted: &str) -> Result<String> {
    let ids = list_ids(repo).await?;
    let complete: Vec<&String> = ids.iter().filter(|(_, c)| **c).map(|(id, _)| id).collect();
    if wanted == "latest" {
        return complete.last().map(|s| s.to_string()).ok_or_else(|| {
            Error::Usage(format!(
                "no complete snapshot in {}; run `immich-backup backup` first",
                repo.url()
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
pub(crate) async fn read_marker(repo: &Repository) -> Result<Option<RepoMarker>> {
    match repo.get_json(&Object::Marker).await {
        Ok(marker) => Ok(Some(marker)),
        Err(Error::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Make sure the store is ours: read the marker, or write one into an empty store.
pub async fn open_or_init(repo: &Repository) -> Result<RepoMarker> {
    if let Some(m) = read_marker(repo).await? {
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
    if !repo.put_new(&Object::Marker, body).await? {
        // Another run created it first: use theirs.
        return read_marker(repo)
            .await?
            .ok_or_else(|| Error::Other("repository marker vanished".into()));
    }
    Ok(marker)
}

/// Require an existing repository (for commands that read).
pub async fn require_marker(repo: &Repository) -> Result<RepoMarker> {
    read_marker(repo).await?.ok_or_else(|| Error::Storage {
        url: repo.url().to_string(),
        message:
            "no immich-backup repository here (immich-backup.json is missing); check [storage] url"
                .into(),
    })
}

/// `init`: check what the store can do ([`crate::store::check`]), then open the repository marker
/// or create it in an empty store.
pub async fn init(repo: &Repository) -> InitReport {
    let mut report = check::run(repo.store()).await;
    if report.ok {
        let existed = read_marker(repo).await;
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
            Ok(None) => match open_or_init(repo).await {
                Ok(m) => {
                    report.created = true;
                    report.repository = Some(m.id.clone());
                    report.format = Some(m.format);
                    Ok((
                        Status::Ok,
                        format!("created repository {} (format {})", m.id, m.format),
                    ))
                }
                Err(e) => Err(fail(repo.store(), e)),
            },
            Err(e) => Err(fail(repo.store(), e)),
        };
        let ok = record(&mut report.checks, "repository", r);
        report.ok = ok;
    }
    report
}
