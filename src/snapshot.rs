//! The storage format: object keys, the repository marker, snapshot manifests and file lists.
//!
//! docs/FORMAT.md is the prose version of this file. A snapshot lives under `snapshots/<id>/` and is
//! visible only once its last object, `manifest.json.age`, exists: everything it references is written
//! first, so an interrupted backup never looks complete and the next run reuses what was uploaded.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::Store;

/// Version of the storage format described in docs/FORMAT.md (the repository marker's `format`).
pub const FORMAT_VERSION: u32 = 1;
/// Version of the manifests this program writes: 2 adds the age header MACs of the dump and the
/// file list and comes with a signature (`signature.json`); 1 is the unsigned format of 0.1.
pub const MANIFEST_FORMAT: u32 = 2;
/// The plaintext repository marker at the top of the store.
pub const REPO_MARKER: &str = "immich-backup.json";
/// Prefix of content objects.
pub const DATA_DIR: &str = "data";
/// Prefix of snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Object names inside `snapshots/<id>/`.
pub const DUMP_OBJECT: &str = "dump.sql.gz.age";
pub const FILES_OBJECT: &str = "files.jsonl.gz.age";
pub const REFS_OBJECT: &str = "refs.txt.gz";
pub const SUMMARY_OBJECT: &str = "summary.json";
pub const MANIFEST_OBJECT: &str = "manifest.json.age";
/// The signed statement (`sign.rs`), written just before the manifest.
pub const SIGNATURE_OBJECT: &str = "signature.json";

/// `immich-backup.json`: marks a store as ours; plaintext, holds no secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoMarker {
    pub format: u32,
    pub id: String,
    pub created: DateTime<Utc>,
    pub tool: String,
}

/// The keyed BLAKE3 hash of a file's contents, which is also its object name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    /// `data/ab/abcd…`.
    pub fn key(&self) -> String {
        let hex = self.to_string();
        format!("{DATA_DIR}/{}/{hex}", &hex[..2])
    }

    /// Parse the id back out of a `data/…` key.
    pub fn from_key(key: &str) -> Option<ContentId> {
        key.rsplit('/').next().and_then(|h| h.parse().ok())
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for ContentId {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("bad content id {s:?}: {e}"))?;
        Ok(ContentId(out))
    }
}

impl Serialize for ContentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ContentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What kind of thing a file-list entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One line of the file list: a path relative to UPLOAD_LOCATION and what to put back there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    #[serde(default)]
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<ContentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A file the backup could not read (recorded; the snapshot is then marked partial).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub error: String,
}

/// One Postgres extension of the backed-up database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    pub name: String,
    pub version: String,
}

/// What the snapshot knows about the database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DatabaseInfo {
    pub mode: String,
    pub database: String,
    pub username: String,
    /// `SHOW server_version`.
    pub server_version: String,
    /// `SHOW server_version_num`.
    pub server_version_num: i64,
    #[serde(default)]
    pub extensions: Vec<Extension>,
    /// Rows per table of the Immich database (`schema.table`), counted in the dump's COPY blocks.
    pub row_counts: BTreeMap<String, u64>,
    /// The Postgres container image (Docker mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A stored object and how to verify its plaintext.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Key relative to the store prefix.
    pub key: String,
    /// Plaintext size in bytes.
    pub size: u64,
    /// SHA-256 of the plaintext (what `age -d` outputs), hex.
    pub sha256: String,
    /// The MAC on the object's age header, hex: it pins the object's file key, so a restore that
    /// streams the object can tell at its first byte that it is the one the backup wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_mac: Option<String>,
}

/// Totals over the file list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// `manifest.json.age`: the snapshot, encrypted. Its presence makes the snapshot visible.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub time: DateTime<Utc>,
    pub host: String,
    pub tool_version: String,
    /// The key of the keyed BLAKE3 content addresses, hex (needed to verify restored files).
    pub content_key: String,
    pub upload_location: String,
    pub folders: Vec<String>,
    pub database: DatabaseInfo,
    pub dump: ObjectRef,
    pub files: ObjectRef,
    pub totals: Totals,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
}

/// `summary.json`: what `snapshots` shows without the identity. Plaintext, no file names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub id: String,
    pub time: DateTime<Utc>,
    pub host: String,
    pub tool_version: String,
    pub files: u64,
    pub bytes: u64,
    /// Bytes of new content this snapshot uploaded.
    pub bytes_added: u64,
    pub dump_bytes: u64,
    /// Files that could not be read (the snapshot is partial when > 0).
    pub skipped: u64,
}

/// A new snapshot id: UTC time to the millisecond, sortable, plus randomness against collisions.
/// (Whole seconds are not enough: two backups started in the same second would sort by their
/// random part, and `latest` could name the older one.)
pub fn new_snapshot_id(time: DateTime<Utc>) -> String {
    format!(
        "{}-{:08x}",
        time.format("%Y%m%dT%H%M%S%.3fZ"),
        rand::random::<u32>()
    )
}

/// `snapshots/<id>/<name>`.
pub fn snapshot_key(id: &str, name: &str) -> String {
    format!("{SNAPSHOTS_DIR}/{id}/{name}")
}

/// The content addresses in a `refs.txt.gz` (its bytes `gz`), one a line; an `Err` names what is
/// wrong with the object at that point (a damaged gzip stream, a line that is not an address).
pub fn parse_refs(gz: &[u8]) -> impl Iterator<Item = std::result::Result<ContentId, String>> + '_ {
    use std::io::BufRead;
    std::io::BufReader::new(flate2::read::GzDecoder::new(gz))
        .lines()
        .filter(|l| !l.as_ref().is_ok_and(|l| l.is_empty()))
        .map(|l| l.map_err(|e| e.to_string()).and_then(|l| l.parse()))
}

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
