//! The repository: a store plus the keys to read or write it, and the one place that knows which
//! objects are sealed.
//!
//! Backups, restores, maintenance and checks name objects by their kind ([`Object`]) and never
//! build keys, call age, or decide whether something is encrypted: that follows from the kind.
//!
//! - [`Repository`]: the store alone. Plain objects (marker, locks, summaries, signatures, refs),
//!   sealed objects as opaque bytes, sizes, deletes and listings: what the backup machine and
//!   `forget`/`prune` may do without any secret.
//! - [`Writer`] = repository + public recipients: seals what a backup writes ([`SealedWriter`]
//!   streams a dump, a file list or a content object into the store).
//! - [`Reader`] = repository + identities: opens what a restore reads ([`Fetched`] → [`Unsealed`]),
//!   pinned to the age header the signed manifest names.
//!
//! Beside them: [`snapshots`] (listing, the marker, `init`), [`lock`] (shared and exclusive locks)
//! and [`trust`] (which snapshots are authentic).
//!
//! The streaming halves are synchronous, for the blocking threads that compress and encrypt; the
//! rest is async.

pub mod keys;
pub mod lock;
mod read;
pub mod snapshots;
pub mod trust;
mod write;

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;

use crate::config::StorageConfig;
use crate::crypto::sign::SigningKey;
use crate::crypto::{Identities, Recipients};
use crate::error::{Error, Result};
use crate::format::{ContentId, Object, DATA_DIR, SNAPSHOTS_DIR};
use crate::store::{error_from_io, ObjectWriter, Store};

pub use crate::crypto::seal::age_payload_len as sealed_payload_len;
pub use read::{Fetched, Reader, Unsealed};
pub use snapshots::{init, StoredObject};
pub use write::{SealedWriter, Writer};

/// A store holding (or about to hold) an immich-backup repository.
#[derive(Clone, Debug)]
pub struct Repository {
    pub(crate) store: Store,
}

/// A sealed object's bytes as stored (an age file), e.g. a manifest before it is written.
#[derive(Clone, Debug)]
pub struct Sealed(pub(crate) Bytes);

impl Sealed {
    /// The age file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Our error for an I/O error met while writing object `key`, through whatever layers (gzip,
/// hashing, sealing) sit on the writer: the store's own error when it is one, else a storage error
/// on `key`.
pub(crate) fn write_error(key: &str, e: io::Error) -> Error {
    error_from_io(key, e)
}

/// Our error for an I/O error met while reading the plaintext of object `key` (through gzip or a
/// hasher on top of an [`Unsealed`]): a chunk that fails authentication, a truncated object or a
/// damaged gzip stream is a damaged object.
pub(crate) fn read_error(key: &str, e: io::Error) -> Error {
    crate::crypto::read_error(key, e)
}

/// Whether `obj` is of the kind (sealed or plain) the caller handles; the other kind is a
/// programming error.
fn expect_kind(obj: &Object, sealed: bool) -> Result<()> {
    if obj.sealed() == sealed {
        return Ok(());
    }
    Err(Error::Other(format!(
        "{} is {}, not {}",
        obj.key(),
        if sealed { "plain" } else { "sealed" },
        if sealed { "sealed" } else { "plain" },
    )))
}

pub(crate) fn expect_plain(obj: &Object) -> Result<()> {
    expect_kind(obj, false)
}

pub(crate) fn expect_sealed(obj: &Object) -> Result<()> {
    expect_kind(obj, true)
}

impl Repository {
    /// Open the store named by `[storage]`.
    pub fn open(cfg: &StorageConfig) -> Result<Repository> {
        Ok(Repository::new(Store::open(cfg)?))
    }

    /// The repository in an already opened store.
    pub fn new(store: Store) -> Repository {
        Repository { store }
    }

    /// The store underneath (its URL, staging, raw listings).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store's URL with secrets removed.
    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// The write side: this repository, the recipients a backup seals to and the keys it signs
    /// snapshots with (none: unsigned, for stores written before signing existed).
    pub fn writer(&self, recipients: Arc<Recipients>, signing: Vec<SigningKey>) -> Writer {
        Writer::new(self.clone(), recipients, signing, None)
    }

    /// The write side of a backup: sealing to what [`keys::for_backup`] found (the repository
    /// key, or the recipients in a format-1 store).
    pub fn sealing_writer(&self, to: keys::SealTo, signing: Vec<SigningKey>) -> Writer {
        Writer::new(self.clone(), Arc::new(to.recipients), signing, to.key)
    }

    /// The read side: this repository and the identities a restore opens with, as they are
    /// (tests; a store without repository keys).
    pub fn reader(&self, identities: Arc<Identities>) -> Reader {
        Reader::new(self.clone(), identities)
    }

    /// The read side with the repository keys `identities` open in this store ([`keys::unlock`]):
    /// what every command that reads snapshots uses.
    pub async fn unlock(&self, identities: Arc<Identities>) -> Result<Reader> {
        let unlocked = keys::unlock(self, &identities).await?;
        Ok(Reader::new(self.clone(), Arc::new(unlocked)))
    }

    /// A whole plain object.
    pub async fn get(&self, obj: &Object) -> Result<Bytes> {
        expect_plain(obj)?;
        self.store.get_bytes(&obj.key()).await
    }

    /// A plain JSON object, parsed; a body that does not parse is a damaged object.
    pub(crate) async fn get_json<T: DeserializeOwned>(&self, obj: &Object) -> Result<T> {
        let body = self.get(obj).await?;
        parse_json(obj, &body)
    }

    /// Create a plain object; `Ok(false)` when it exists already (it is left as it was).
    pub async fn put_new(&self, obj: &Object, body: Vec<u8>) -> Result<bool> {
        expect_plain(obj)?;
        self.store.put_new(&obj.key(), body.into()).await
    }

    /// Create a plain object that must not exist yet (a snapshot's objects are never replaced).
    pub async fn create(&self, obj: &Object, body: Vec<u8>) -> Result<()> {
        expect_plain(obj)?;
        self.create_key(obj, body.into()).await
    }

    /// Create a sealed object from its sealed bytes; it must not exist yet.
    pub(crate) async fn create_sealed(&self, obj: &Object, sealed: &Sealed) -> Result<()> {
        expect_sealed(obj)?;
        self.create_key(obj, sealed.0.clone()).await
    }

    async fn create_key(&self, obj: &Object, body: Bytes) -> Result<()> {
        let key = obj.key();
        if !self.store.put_new(&key, body).await? {
            return Err(Error::Other(format!(
                "{key} already exists; refusing to overwrite a snapshot"
            )));
        }
        Ok(())
    }

    /// A sealed object's bytes as stored, not opened (to hash, or to open later).
    pub(crate) async fn get_sealed(&self, obj: &Object) -> Result<Sealed> {
        expect_sealed(obj)?;
        Ok(Sealed(self.store.get_bytes(&obj.key()).await?))
    }

    /// A synchronous writer of a plain object (the refs), for a blocking thread.
    pub(crate) fn plain_writer(&self, obj: &Object) -> Result<ObjectWriter> {
        expect_plain(obj)?;
        Ok(self.store.writer(&obj.key()))
    }

    /// Stored size of an object, or `None` when it does not exist.
    pub async fn size(&self, obj: &Object) -> Result<Option<u64>> {
        self.store.size(&obj.key()).await
    }

    /// Delete an object; a missing one is not an error.
    pub async fn delete(&self, obj: &Object) -> Result<()> {
        self.store.delete(&obj.key()).await
    }

    /// Every content address in the store.
    pub(crate) async fn content_ids(&self) -> Result<Vec<ContentId>> {
        self.store.content_ids().await
    }

    /// Every content object with its stored size.
    pub(crate) fn content_sizes(
        &self,
    ) -> impl futures::Stream<Item = Result<(ContentId, u64)>> + '_ {
        self.store.content_sizes()
    }

    /// Every object under `data/` with its address, or `None` for an object that is not a
    /// content object (a stray file someone put there).
    pub fn data_objects(
        &self,
    ) -> impl futures::Stream<Item = Result<(StoredObject, Option<ContentId>)>> + '_ {
        self.store.list(DATA_DIR).map_ok(|(key, size)| {
            let id = ContentId::from_key(&key).filter(|id| id.key() == key);
            (StoredObject { key, size }, id)
        })
    }

    /// Delete objects a listing found ([`Repository::data_objects`], [`snapshots::Folder`]),
    /// several at a time.
    pub(crate) async fn delete_listed(
        &self,
        objects: impl Iterator<Item = StoredObject>,
    ) -> Result<()> {
        futures::stream::iter(objects)
            .map(|o| async move { self.store.delete(&o.key).await })
            .buffer_unordered(DELETE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Objects and bytes in `data/` and in `snapshots/`.
    pub async fn usage(&self) -> Result<Usage> {
        let (data_objects, data_bytes) = count_objects(&self.store, DATA_DIR).await?;
        let (snapshot_objects, snapshot_bytes) = self.snapshot_usage().await?;
        Ok(Usage {
            data_objects,
            data_bytes,
            snapshot_objects,
            snapshot_bytes,
        })
    }

    /// The names of the prune marks in `prunes/` (one listing), sorted.
    pub(crate) async fn prune_marks(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .store
            .list_keys(crate::format::PRUNES_DIR)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.rsplit('/').next().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Leave a prune mark before deleting content ([`crate::format::PRUNES_DIR`]), and delete
    /// the marks older than a backup's record of the store may be ([`KNOWN_MAX_AGE_DAYS`]): such a
    /// backup lists the store again anyway.
    pub(crate) async fn mark_prune(&self) -> Result<()> {
        let keep = chrono::Duration::days(KNOWN_MAX_AGE_DAYS + 1);
        let now = chrono::Utc::now();
        let name = format!(
            "{}-{}.json",
            now.format("%Y%m%dT%H%M%SZ"),
            hex::encode(rand::random::<[u8; 4]>())
        );
        let body = serde_json::json!({
            "time": now,
            "host": crate::host::hostname(),
            "tool": format!("immich-backup {}", env!("CARGO_PKG_VERSION")),
        });
        self.create(&Object::PruneMark(name), body.to_string().into_bytes())
            .await?;
        let oldest = (now - keep).format("%Y%m%dT%H%M%SZ").to_string();
        for old in self.prune_marks().await? {
            if old < oldest {
                self.delete(&Object::PruneMark(old)).await?;
            }
        }
        Ok(())
    }

    /// Objects and bytes in `snapshots/` alone (one listing).
    pub(crate) async fn snapshot_usage(&self) -> Result<(u64, u64)> {
        count_objects(&self.store, SNAPSHOTS_DIR).await
    }

    /// A backup begins: in a folder store, content it writes is staged (kept out of `data/`)
    /// until [`Repository::publish`]; elsewhere nothing happens.
    pub(crate) async fn begin_staging(&self) -> Result<()> {
        self.store.begin_staging().await
    }

    /// Whether this run stages its content (a folder store during a backup).
    pub(crate) fn is_staging(&self) -> bool {
        self.store.is_staging()
    }

    /// Whether this run has staged content object `id`.
    pub(crate) fn is_staged(&self, id: &ContentId) -> bool {
        self.store.is_staged(id)
    }

    /// Make this run's staged content durable and visible, and everything written before durable;
    /// returns how many objects were new. Call before [`Writer::commit`].
    pub(crate) async fn publish(&self) -> Result<u64> {
        self.store.publish().await
    }

    /// The staging folders that other (possibly dead) runs left, with their owners.
    pub(crate) async fn other_staging(
        &self,
    ) -> Result<Vec<(String, Option<crate::store::local::Owner>, bool)>> {
        self.store.other_staging().await
    }

    /// Publish the staging folder of a run that died; returns how many objects were new.
    pub(crate) async fn adopt_staging(&self, name: &str) -> Result<u64> {
        self.store.adopt_staging(name).await
    }

    /// Remove the staging folder of a run whose bytes cannot be trusted.
    pub(crate) async fn discard_staging(&self, name: &str) -> Result<()> {
        self.store.discard_staging(name).await
    }
}

/// A backup trusts its record of the stored content (instead of listing `data/`) for at most this
/// many days, and only while no prune mark appeared since it listed.
pub const KNOWN_MAX_AGE_DAYS: i64 = 7;

/// Deletes in flight at once.
const DELETE_CONCURRENCY: usize = 16;

/// What a store holds, by prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub data_objects: u64,
    pub data_bytes: u64,
    pub snapshot_objects: u64,
    pub snapshot_bytes: u64,
}

impl Usage {
    /// (objects, bytes) over the whole store.
    pub fn total(&self) -> (u64, u64) {
        (
            self.data_objects + self.snapshot_objects,
            self.data_bytes + self.snapshot_bytes,
        )
    }
}

/// Objects and bytes under `dir`, from one listing.
async fn count_objects(store: &Store, dir: &str) -> Result<(u64, u64)> {
    let mut n = 0;
    let mut bytes = 0;
    let mut s = std::pin::pin!(store.list(dir));
    while let Some(item) = s.next().await {
        let (_, size) = item?;
        n += 1;
        bytes += size;
    }
    Ok((n, bytes))
}

pub(crate) fn parse_json<T: DeserializeOwned>(obj: &Object, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Corrupt {
        object: obj.key(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use super::*;
    use crate::crypto::{generate_key, write_identity_file};
    use crate::format::ObjectRef;

    /// A repository in memory, with a key pair: (repository, writer, reader).
    fn repo_with_keys() -> (tempfile::TempDir, Repository, Writer, Reader) {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key();
        let id_file = dir.path().join("id.txt");
        write_identity_file(&id_file, &key).unwrap();
        let recipients = Recipients::load(std::slice::from_ref(&key.recipient), None).unwrap();
        let identities = Identities::load(&id_file).unwrap();
        let store = Store::from_object_store(
            Arc::new(object_store::memory::InMemory::new()),
            "",
            "memory:///",
        );
        let repo = Repository::new(store);
        let writer = repo.writer(Arc::new(recipients), vec![key.signing]);
        let reader = repo.reader(Arc::new(identities));
        (dir, repo, writer, reader)
    }

    /// Write `plain` as the sealed object `obj`; returns its pin (as a manifest records it).
    async fn put_sealed(writer: &Writer, obj: &Object, plain: &[u8]) -> ObjectRef {
        let (writer, obj, plain) = (writer.clone(), obj.clone(), plain.to_vec());
        tokio::task::spawn_blocking(move || {
            let mut w = writer.sealed_writer(&obj).unwrap();
            let mac = hex::encode(w.header_mac());
            w.write_all(&plain).unwrap();
            w.finish().unwrap();
            ObjectRef {
                key: obj.key(),
                size: plain.len() as u64,
                sha256: String::new(),
                header_mac: Some(mac),
            }
        })
        .await
        .unwrap()
    }

    async fn read_all(fetched: Fetched) -> Result<Vec<u8>> {
        tokio::task::spawn_blocking(move || {
            let mut plain = fetched.open()?;
            let mut out = Vec::new();
            plain
                .read_to_end(&mut out)
                .map_err(|e| read_error("the object under test", e))?;
            Ok(out)
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sealed_objects_round_trip_only_under_their_own_name_and_pin() {
        let (_d, repo, writer, reader) = repo_with_keys();
        let dump = Object::Dump("a".into());
        let pinned = put_sealed(&writer, &dump, b"SELECT 1;\n").await;
        let stored = repo.get_sealed(&dump).await.unwrap();
        assert!(stored.as_bytes().starts_with(b"age-encryption.org/v1"));
        let fetched = reader.fetch(&dump, &pinned).await.unwrap();
        assert_eq!(read_all(fetched).await.unwrap(), b"SELECT 1;\n");

        // A manifest naming another snapshot's dump for this one is refused before any read.
        let other = Object::Dump("b".into());
        let err = reader.fetch(&other, &pinned).await.unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");

        // The same name with another age header (a replaced object) fails at open.
        put_sealed(&writer, &other, b"SELECT 1;\n").await;
        let swapped = ObjectRef {
            key: other.key(),
            ..pinned.clone()
        };
        let fetched = reader.fetch(&other, &swapped).await.unwrap();
        let err = read_all(fetched).await.unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");

        // A damaged chunk is a damaged object.
        let mut bytes = stored.as_bytes().to_vec();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        let damaged = Object::Dump("c".into());
        repo.create_sealed(&damaged, &Sealed(bytes.into()))
            .await
            .unwrap();
        let fetched = reader
            .fetch(
                &damaged,
                &ObjectRef {
                    key: damaged.key(),
                    ..pinned
                },
            )
            .await
            .unwrap();
        let err = read_all(fetched).await.unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn plain_and_sealed_objects_are_not_mixed_up_and_never_overwritten() {
        let (_d, repo, writer, reader) = repo_with_keys();
        let manifest = Object::Manifest("a".into());
        // A sealed object is not read or written as plain text, nor the reverse.
        assert!(repo.get(&manifest).await.is_err());
        assert!(repo.create(&manifest, b"{}".to_vec()).await.is_err());
        assert!(repo.get_sealed(&Object::Summary("a".into())).await.is_err());
        assert!(writer.sealed_writer(&Object::Refs("a".into())).is_err());
        // Small sealed objects: sealed in memory, created once, opened.
        let sealed = writer.seal(br#"{"x": 1}"#).unwrap();
        repo.create_sealed(&manifest, &sealed).await.unwrap();
        let again = writer.seal(br#"{"x": 2}"#).unwrap();
        assert!(repo.create_sealed(&manifest, &again).await.is_err());
        let value: serde_json::Value = reader.open_json(&manifest).await.unwrap();
        assert_eq!(value["x"], 1);
        // Plain objects: created once, parsed, a body that does not parse is damaged.
        let summary = Object::Summary("a".into());
        repo.create(&summary, b"not json".to_vec()).await.unwrap();
        assert!(repo.create(&summary, b"{}".to_vec()).await.is_err());
        let err = repo
            .get_json::<serde_json::Value>(&summary)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(matches!(
            repo.get(&Object::Summary("missing".into())).await,
            Err(Error::Missing { .. })
        ));
    }
}
