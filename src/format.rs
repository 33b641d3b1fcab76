//! The storage format: object keys, the repository marker, snapshot manifests and file lists.
//!
//! A leaf: plain types and names, no I/O. Reading and writing them is [`crate::repo`]'s job.
//!
//! docs/FORMAT.md is the prose version of this file. A snapshot lives under `snapshots/<id>/` and is
//! visible only once its last object, `manifest.json.age`, exists: everything it references is written
//! first, so an interrupted backup never looks complete and the next run reuses what was uploaded.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of the storage format described in docs/FORMAT.md (the repository marker's `format`).
/// 2: snapshots are sealed to a repository key whose secret the key files under `keys/` hold.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// Version of the manifests this program writes: 2 adds the age header MACs of the dump and the
/// file list and comes with a signature (`signature.json`); 1 is the unsigned format of 0.1.
pub const MANIFEST_FORMAT: u32 = 2;
/// The plaintext repository marker at the top of the store.
pub(crate) const REPO_MARKER: &str = "immich-backup.json";
/// Prefix of content objects.
pub const DATA_DIR: &str = "data";
/// Prefix of snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Object names inside `snapshots/<id>/`.
pub const DUMP_OBJECT: &str = "dump.sql.gz.age";
pub(crate) const FILES_OBJECT: &str = "files.jsonl.gz.age";
pub const REFS_OBJECT: &str = "refs.txt.gz";
pub const SUMMARY_OBJECT: &str = "summary.json";
pub const MANIFEST_OBJECT: &str = "manifest.json.age";
/// The signed statement (`sign.rs`), written just before the manifest.
pub(crate) const SIGNATURE_OBJECT: &str = "signature.json";
/// Prefix of lock objects.
pub const LOCKS_DIR: &str = "locks";
/// Prefix of the repository keys' key files and machine files (format 2).
pub const KEYS_DIR: &str = "keys";
/// Prefix of the prune marks: a prune about to delete content leaves one, so that a backup knows
/// whether its record of the stored content is still true.
pub const PRUNES_DIR: &str = "prunes";

/// Every kind of object in a store. Its key and whether it is sealed (an age file) follow from its
/// kind, so no caller decides either: [`crate::repo`] reads and writes objects by this type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Object {
    /// `immich-backup.json`, plain JSON.
    Marker,
    /// `locks/<name>`, plain JSON.
    Lock(String),
    /// `snapshots/<id>/summary.json`, plain JSON.
    Summary(String),
    /// `snapshots/<id>/signature.json`, plain JSON.
    Signature(String),
    /// `snapshots/<id>/refs.txt.gz`, plain gzip.
    Refs(String),
    /// `snapshots/<id>/files.jsonl.gz.age`, sealed.
    Files(String),
    /// `snapshots/<id>/dump.sql.gz.age`, sealed.
    Dump(String),
    /// `snapshots/<id>/manifest.json.age`, sealed; written last.
    Manifest(String),
    /// `data/<2 hex>/<64 hex>`, sealed.
    Content(ContentId),
    /// `prunes/<YYYYMMDDTHHMMSSZ>-<8 hex>.json`, plain JSON: a prune deleted (or was about to
    /// delete) content objects.
    PruneMark(String),
    /// `keys/<key id>/<recipient id>.age`: a repository key's secret, sealed to one person's
    /// recipient (not to the repository's: [`crate::repo::keys`] seals it).
    KeyFile { key: String, recipient: String },
    /// `keys/<key id>/machine-<machine id>.age`: a repository key's public half for a backup
    /// machine, sealed to a key derived from its signing key.
    MachineFile { key: String, machine: String },
}

impl Object {
    /// The object's key under the store's prefix.
    pub fn key(&self) -> String {
        match self {
            Object::Marker => REPO_MARKER.to_string(),
            Object::Lock(name) => format!("{LOCKS_DIR}/{name}"),
            Object::Summary(id) => snapshot_key(id, SUMMARY_OBJECT),
            Object::Signature(id) => snapshot_key(id, SIGNATURE_OBJECT),
            Object::Refs(id) => snapshot_key(id, REFS_OBJECT),
            Object::Files(id) => snapshot_key(id, FILES_OBJECT),
            Object::Dump(id) => snapshot_key(id, DUMP_OBJECT),
            Object::Manifest(id) => snapshot_key(id, MANIFEST_OBJECT),
            Object::Content(id) => id.key(),
            Object::PruneMark(name) => format!("{PRUNES_DIR}/{name}"),
            Object::KeyFile { key, recipient } => format!("{KEYS_DIR}/{key}/{recipient}.age"),
            Object::MachineFile { key, machine } => {
                format!("{KEYS_DIR}/{key}/machine-{machine}.age")
            }
        }
    }

    /// Whether the object is an age file (readable only with an identity).
    pub fn sealed(&self) -> bool {
        matches!(
            self,
            Object::Files(_)
                | Object::Dump(_)
                | Object::Manifest(_)
                | Object::Content(_)
                | Object::KeyFile { .. }
                | Object::MachineFile { .. }
        )
    }
}

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
    /// Owner user id (`st_uid`); absent in lists written before 0.3, which restore without chown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Owner group id (`st_gid`); absent like `uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
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
    /// The id of the repository key the snapshot is sealed to (`keys/<id>/`); absent when it is
    /// sealed to the recipients themselves (format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_key: Option<String>,
    pub upload_location: String,
    pub folders: Vec<String>,
    pub database: DatabaseInfo,
    pub dump: ObjectRef,
    pub files: ObjectRef,
    pub totals: Totals,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// External libraries backed up with this snapshot: their files are under `folder`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_libraries: Vec<ExternalLibrary>,
    /// Whether every file Immich's database names is in the snapshot (absent from older ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
}

/// An external library backed up with a snapshot: Immich sees it at `container_path`, the backed-up
/// machine had it at `host_path`, and the snapshot holds its files under `folder`
/// (`external/<container path>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalLibrary {
    pub container_path: String,
    pub host_path: String,
    pub folder: String,
}

/// What the consistency check of a snapshot concluded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every file the database names is in the snapshot; no asset is outside it.
    Ok,
    /// Some originals or sidecars the database names are not in the snapshot (missing, or left
    /// out by `[immich] exclude`: see `excluded`).
    Missing,
    /// Nothing missing, but some assets are in external libraries that are not backed up.
    External,
    /// Not checked: the dump held no asset table (`note` says why).
    #[default]
    Unchecked,
}

/// The database compared with the snapshot's files: every original and sidecar an asset row names
/// (mapped from Immich's container paths), against the file list. The manifest has it whole; the
/// plaintext summary has the counts only, never a path ([`Consistency::counts_only`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistency {
    pub verdict: Verdict,
    /// Asset rows whose original the snapshot should hold.
    pub assets: u64,
    /// Sidecars (XMP) the asset rows name.
    pub sidecars: u64,
    /// Asset rows not checked: status `deleted`, or `isOffline` (Immich knows the file is gone).
    pub ignored_assets: u64,
    /// Assets whose original is not in the snapshot: a restore would have holes.
    pub missing_originals: u64,
    pub missing_sidecars: u64,
    /// The first missing files, as snapshot paths (manifest only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_examples: Vec<String>,
    /// Files under `library/` and `upload/` that no asset names (informational).
    pub orphans: u64,
    /// The first orphans (manifest only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphan_examples: Vec<String>,
    /// Assets outside UPLOAD_LOCATION and every backed-up external library: not in the snapshot.
    pub external_assets: u64,
    /// The first of them, as Immich's container paths (manifest only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_examples: Vec<String>,
    /// Every external library's import paths, from the database (manifest only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_import_paths: Vec<String>,
    /// Originals and sidecars the database names that `[immich] exclude` left out of the snapshot
    /// (not counted as missing; absent from snapshots of earlier versions).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub excluded: u64,
    /// The first of them (manifest only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_examples: Vec<String>,
    /// Asset rows too long to read the path from (over 64 KiB before it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreadable_rows: u64,
    /// Why the verdict is `unchecked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Consistency {
    /// The same without any path, for the plaintext summary.
    pub fn counts_only(&self) -> Consistency {
        Consistency {
            missing_examples: Vec::new(),
            orphan_examples: Vec::new(),
            external_examples: Vec::new(),
            external_import_paths: Vec::new(),
            excluded_examples: Vec::new(),
            ..self.clone()
        }
    }

    /// Files the database names that the snapshot lacks.
    pub fn missing(&self) -> u64 {
        self.missing_originals + self.missing_sidecars
    }

    /// One word or a few, for `snapshots`: `ok`, `3 missing`, `12 external`, `unchecked`.
    pub fn short(&self) -> String {
        match self.verdict {
            Verdict::Ok => "ok".into(),
            Verdict::Unchecked => "unchecked".into(),
            Verdict::Missing if self.external_assets > 0 => format!(
                "{} missing, {} external",
                self.missing(),
                self.external_assets
            ),
            Verdict::Missing if self.missing() == 0 => format!("{} excluded", self.excluded),
            Verdict::Missing if self.excluded > 0 => {
                format!("{} missing, {} excluded", self.missing(), self.excluded)
            }
            Verdict::Missing => format!("{} missing", self.missing()),
            Verdict::External => format!("{} external", self.external_assets),
        }
    }
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
    /// The id of the repository key the snapshot is sealed to (its key files are under
    /// `keys/<id>/`); absent when it is sealed to the recipients themselves (format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_key: Option<String>,
    pub dump_bytes: u64,
    /// Files that could not be read (the snapshot is partial when > 0).
    pub skipped: u64,
    /// The consistency check's counts (no paths); absent in snapshots of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
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
pub(crate) fn parse_refs(
    gz: &[u8],
) -> impl Iterator<Item = std::result::Result<ContentId, String>> + '_ {
    use std::io::BufRead;
    std::io::BufReader::new(flate2::read::GzDecoder::new(gz))
        .lines()
        .filter(|l| !l.as_ref().is_ok_and(|l| l.is_empty()))
        .map(|l| l.map_err(|e| e.to_string()).and_then(|l| l.parse()))
}

/// Order of two `/`-separated relative paths as the sorted walk produces them.
pub(crate) fn walk_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_have_the_keys_of_format_md() {
        let id = "20261204T120000.000Z-0000abcd";
        let c = ContentId([0xab; 32]);
        assert_eq!(Object::Marker.key(), "immich-backup.json");
        assert_eq!(Object::Lock("x.json".into()).key(), "locks/x.json");
        assert_eq!(
            Object::Manifest(id.into()).key(),
            format!("snapshots/{id}/manifest.json.age")
        );
        assert_eq!(
            Object::Dump(id.into()).key(),
            format!("snapshots/{id}/dump.sql.gz.age")
        );
        assert_eq!(
            Object::Files(id.into()).key(),
            format!("snapshots/{id}/files.jsonl.gz.age")
        );
        assert_eq!(
            Object::Refs(id.into()).key(),
            format!("snapshots/{id}/refs.txt.gz")
        );
        assert_eq!(
            Object::Summary(id.into()).key(),
            format!("snapshots/{id}/summary.json")
        );
        assert_eq!(
            Object::Signature(id.into()).key(),
            format!("snapshots/{id}/signature.json")
        );
        assert_eq!(
            Object::Content(c).key(),
            format!("data/ab/{}", "ab".repeat(32))
        );
        let sealed: Vec<bool> = [
            Object::Marker,
            Object::Summary(id.into()),
            Object::Refs(id.into()),
            Object::Manifest(id.into()),
            Object::Content(c),
        ]
        .iter()
        .map(Object::sealed)
        .collect();
        assert_eq!(sealed, [false, false, false, true, true]);
    }

    #[test]
    fn walk_order_is_component_wise() {
        assert_eq!(walk_order("a/b", "a.b"), Ordering::Less);
        assert_eq!(walk_order("a", "a/b"), Ordering::Less);
        assert_eq!(walk_order("library/x", "profile"), Ordering::Less);
    }
}
