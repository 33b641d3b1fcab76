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

pub mod lock;
pub mod snapshots;
pub mod trust;

use std::io::{self, BufReader, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;

use crate::config::StorageConfig;
use crate::crypto::seal::Sealer;
use crate::crypto::unseal::Opened;
use crate::crypto::{Identities, Recipients};
use crate::error::{Error, Result};
use crate::format::{ContentId, Object, ObjectRef, DATA_DIR, SNAPSHOTS_DIR};
use crate::store::{error_from_io, ObjectWriter, Store};

pub use crate::crypto::seal::age_payload_len as sealed_payload_len;
pub use snapshots::{init, StoredObject};

/// A store holding (or about to hold) an immich-backup repository.
#[derive(Clone, Debug)]
pub struct Repository {
    store: Store,
}

/// A sealed object's bytes as stored (an age file), e.g. a manifest before it is written.
#[derive(Clone, Debug)]
pub struct Sealed(Bytes);

impl Sealed {
    /// The age file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Our error for an I/O error met while writing object `key`, through whatever layers (gzip,
/// hashing, sealing) sit on the writer: the store's own error when it is one, else a storage error
/// on `key`.
pub fn write_error(key: &str, e: io::Error) -> Error {
    error_from_io(key, e)
}

/// Our error for an I/O error met while reading the plaintext of object `key` (through gzip or a
/// hasher on top of an [`Unsealed`]): a chunk that fails authentication, a truncated object or a
/// damaged gzip stream is a damaged object.
pub fn read_error(key: &str, e: io::Error) -> Error {
    crate::crypto::read_error(key, e)
}

/// A programming error: a sealed object handled as plain, or the reverse.
fn wrong_kind(obj: &Object, sealed: bool) -> Error {
    Error::Other(format!(
        "{} is {}; it is read and written {}",
        obj.key(),
        if sealed { "plain" } else { "sealed" },
        if sealed {
            "as it is"
        } else {
            "through the repository's Reader and Writer"
        }
    ))
}

fn expect_plain(obj: &Object) -> Result<()> {
    if obj.sealed() {
        return Err(wrong_kind(obj, false));
    }
    Ok(())
}

fn expect_sealed(obj: &Object) -> Result<()> {
    if !obj.sealed() {
        return Err(wrong_kind(obj, true));
    }
    Ok(())
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

    /// The write side: this repository and the recipients a backup seals to.
    pub fn writer(&self, recipients: Arc<Recipients>) -> Writer {
        Writer {
            repo: self.clone(),
            recipients,
        }
    }

    /// The read side: this repository and the identities a restore opens with.
    pub fn reader(&self, identities: Arc<Identities>) -> Reader {
        Reader {
            repo: self.clone(),
            identities,
        }
    }

    /// A whole plain object.
    pub async fn get(&self, obj: &Object) -> Result<Bytes> {
        expect_plain(obj)?;
        self.store.get_bytes(&obj.key()).await
    }

    /// A plain JSON object, parsed; a body that does not parse is a damaged object.
    pub async fn get_json<T: DeserializeOwned>(&self, obj: &Object) -> Result<T> {
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
    pub async fn create_sealed(&self, obj: &Object, sealed: &Sealed) -> Result<()> {
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
    pub async fn get_sealed(&self, obj: &Object) -> Result<Sealed> {
        expect_sealed(obj)?;
        Ok(Sealed(self.store.get_bytes(&obj.key()).await?))
    }

    /// A synchronous writer of a plain object (the refs), for a blocking thread.
    pub fn plain_writer(&self, obj: &Object) -> Result<PlainWriter> {
        expect_plain(obj)?;
        let key = obj.key();
        Ok(PlainWriter {
            inner: self.store.writer(&key),
            key,
        })
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
    pub async fn content_ids(&self) -> Result<Vec<ContentId>> {
        self.store.content_ids().await
    }

    /// Every content object with its stored size.
    pub fn content_sizes(&self) -> impl futures::Stream<Item = Result<(ContentId, u64)>> + '_ {
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
    pub async fn delete_listed(&self, objects: impl Iterator<Item = StoredObject>) -> Result<()> {
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
        let (snapshot_objects, snapshot_bytes) = count_objects(&self.store, SNAPSHOTS_DIR).await?;
        Ok(Usage {
            data_objects,
            data_bytes,
            snapshot_objects,
            snapshot_bytes,
        })
    }
}

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

fn parse_json<T: DeserializeOwned>(obj: &Object, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Corrupt {
        object: obj.key(),
        message: e.to_string(),
    })
}

/// A plain object being written (synchronous, for a blocking thread).
pub struct PlainWriter {
    inner: ObjectWriter,
    key: String,
}

impl PlainWriter {
    /// Our error for an I/O error met while writing this object.
    pub fn error(&self, e: io::Error) -> Error {
        write_error(&self.key, e)
    }

    /// Complete the object; returns its stored size.
    pub fn finish(self) -> Result<u64> {
        self.inner.finish()
    }
}

impl Write for PlainWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.inner.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The write side of a repository: what a backup, which holds only public recipients, needs.
#[derive(Clone, Debug)]
pub struct Writer {
    repo: Repository,
    recipients: Arc<Recipients>,
}

impl Writer {
    /// The repository written to.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The recipients every sealed object is encrypted to.
    pub fn recipients(&self) -> &Recipients {
        &self.recipients
    }

    /// The key of the content addresses (derived from the recipients).
    pub fn content_key(&self) -> [u8; 32] {
        self.recipients.content_key()
    }

    /// Seal a small object in memory (a manifest: its signature needs the sealed bytes' hash
    /// before it is stored).
    pub fn seal(&self, plain: &[u8]) -> Result<Sealed> {
        let crypto = |e: io::Error| Error::Crypto(e.to_string());
        let mut sealer = self.recipients.encrypt(Vec::new()).map_err(crypto)?;
        sealer.write_all(plain).map_err(crypto)?;
        Ok(Sealed(sealer.finish().map_err(crypto)?.into()))
    }

    /// Bytes of the age header (and its line endings) of an object sealed to these recipients:
    /// with [`sealed_payload_len`], the stored size a plaintext size gives.
    pub fn header_len(&self) -> Result<u64> {
        let empty = self.seal(&[])?;
        Ok(empty.0.len() as u64 - sealed_payload_len(0))
    }

    /// Stream a new sealed object (a dump, a file list, a content object) into the store; call on
    /// a blocking thread. It appears only when [`SealedWriter::finish`]ed.
    pub fn sealed_writer(&self, obj: &Object) -> Result<SealedWriter> {
        expect_sealed(obj)?;
        let key = obj.key();
        self.seal_into(self.repo.store.writer(&key), key)
    }

    /// Like [`Writer::sealed_writer`] for a content object that exists damaged: the finished
    /// object replaces it in one step (`backup --repair`).
    pub fn replacing_writer(&self, id: &ContentId) -> Result<SealedWriter> {
        let key = id.key();
        self.seal_into(self.repo.store.replacing_writer(&key), key)
    }

    /// A content object whose address is known only at its end ([`SealedWriter::finish_as`]):
    /// a folder store during a backup only, so a new file is read once, hashed as it is sealed.
    pub fn unnamed_content_writer(&self) -> Option<Result<SealedWriter>> {
        let inner = self.repo.store.unnamed_writer()?;
        Some(self.seal_into(inner, format!("{}/(new)", crate::format::DATA_DIR)))
    }

    fn seal_into(&self, inner: ObjectWriter, key: String) -> Result<SealedWriter> {
        let sealer = self
            .recipients
            .encrypt(inner)
            .map_err(|e| error_from_io(&key, e))?;
        Ok(SealedWriter { sealer, key })
    }
}

/// A sealed object being written: what is written to it is encrypted on the way to the store.
/// Dropped unfinished, nothing becomes visible.
pub struct SealedWriter {
    sealer: Sealer<ObjectWriter>,
    key: String,
}

impl SealedWriter {
    /// The object's key (for messages).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The MAC of the object's age header, which a manifest records to pin it.
    pub fn header_mac(&self) -> [u8; 32] {
        self.sealer.header_mac()
    }

    /// Our error for an I/O error met while writing this object (through any layers on top).
    pub fn error(&self, e: io::Error) -> Error {
        write_error(&self.key, e)
    }

    /// Seal the last chunk and complete the object; returns its stored size.
    pub fn finish(self) -> Result<u64> {
        let key = self.key;
        let inner = self.sealer.finish().map_err(|e| error_from_io(&key, e))?;
        inner.finish()
    }

    /// Complete an unnamed content object as `id` ([`Writer::unnamed_content_writer`]).
    pub fn finish_as(self, id: &ContentId) -> Result<u64> {
        let key = id.key();
        let mut inner = self.sealer.finish().map_err(|e| error_from_io(&key, e))?;
        inner.name(&key);
        inner.finish()
    }

    /// Abandon the object and wait until nothing of it is left in flight.
    pub fn abort(self) {
        self.sealer.into_inner().abort()
    }
}

impl Write for SealedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.sealer.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sealer.flush()
    }
}

/// The read side of a repository: what a restore (or a check), holding the identities, needs.
#[derive(Clone, Debug)]
pub struct Reader {
    repo: Repository,
    identities: Arc<Identities>,
}

impl Reader {
    /// The repository read from.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The identities objects are opened with.
    pub fn identities(&self) -> &Arc<Identities> {
        &self.identities
    }

    /// Open a small sealed object held in memory.
    pub fn open_bytes(&self, obj: &Object, sealed: &Sealed) -> Result<Vec<u8>> {
        let key = obj.key();
        let mut plain = Vec::new();
        self.identities
            .decrypt(sealed.as_bytes(), &key)?
            .read_to_end(&mut plain)
            .map_err(|e| read_error(&key, e))?;
        Ok(plain)
    }

    /// Fetch, open and parse a small sealed JSON object (a manifest), without any check of its
    /// signature: a restore reads manifests through [`trust`].
    pub async fn open_json<T: DeserializeOwned>(&self, obj: &Object) -> Result<T> {
        let sealed = self.repo.get_sealed(obj).await?;
        parse_json(obj, &self.open_bytes(obj, &sealed)?)
    }

    /// Start reading the sealed object `obj` that a manifest describes as `pinned`: its key must
    /// be `obj`'s and its age header the one pinned (checked by [`Fetched::open`]).
    pub async fn fetch(&self, obj: &Object, pinned: &ObjectRef) -> Result<Fetched> {
        expect_sealed(obj)?;
        let key = obj.key();
        if pinned.key != key {
            return Err(Error::Corrupt {
                object: key,
                message: format!(
                    "the manifest names {:?} for it; a manifest names only its own snapshot's objects",
                    pinned.key
                ),
            });
        }
        self.fetch_key(key, pinned.header_mac.clone()).await
    }

    /// Start reading content object `id` (verified against its address by the caller).
    pub async fn fetch_content(&self, id: &ContentId) -> Result<Fetched> {
        self.fetch_key(id.key(), None).await
    }

    async fn fetch_key(&self, key: String, pin: Option<String>) -> Result<Fetched> {
        let raw = self.repo.store.reader(&key).await?;
        Ok(Fetched {
            raw,
            key,
            pin,
            identities: self.identities.clone(),
        })
    }
}

/// A sealed object on its way from the store, not opened yet. [`Fetched::open`] reads its header,
/// so it belongs on a blocking thread.
pub struct Fetched {
    raw: Box<dyn Read + Send + 'static>,
    key: String,
    pin: Option<String>,
    identities: Arc<Identities>,
}

impl Fetched {
    /// The object's key (for messages).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Read the age header with the identities and check it is the pinned one.
    pub fn open(self) -> Result<Unsealed> {
        let inner = self
            .identities
            .decrypt_pinned(self.raw, &self.key, self.pin.as_deref())?;
        Ok(Unsealed {
            inner,
            key: self.key,
        })
    }
}

/// The plaintext of a sealed object, authenticated chunk by chunk as it is read.
pub struct Unsealed {
    inner: Opened<BufReader<Box<dyn Read + Send + 'static>>>,
    key: String,
}

impl Unsealed {
    /// The object's key (for messages).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Our error for an I/O error met while reading this object: a chunk that fails
    /// authentication or a truncated object is a damaged object.
    pub fn error(&self, e: io::Error) -> Error {
        read_error(&self.key, e)
    }
}

impl Read for Unsealed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
