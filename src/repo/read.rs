//! The read side of a repository, what a restore or a check holds: the identities that open sealed
//! objects.
//!
//! A small object (a manifest) is opened in memory; a large one is fetched ([`Fetched`]) and then
//! opened on a blocking thread ([`Unsealed`]), pinned to the age header its manifest names.

use std::io::{self, BufReader, Read};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::crypto::unseal::Opened;
use crate::crypto::Identities;
use crate::error::{Error, Result};
use crate::format::{ContentId, Object, ObjectRef};

use super::{expect_sealed, parse_json, read_error, Repository, Sealed};

/// The read side of a repository: what a restore (or a check), holding the identities, needs.
#[derive(Clone, Debug)]
pub struct Reader {
    repo: Repository,
    identities: Arc<Identities>,
}

impl Reader {
    pub(super) fn new(repo: Repository, identities: Arc<Identities>) -> Reader {
        Reader { repo, identities }
    }

    /// The repository read from.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Open a small sealed object held in memory.
    pub(crate) fn open_bytes(&self, obj: &Object, sealed: &Sealed) -> Result<Vec<u8>> {
        open_bytes_with(&self.identities, obj, sealed)
    }

    /// Fetch, open and parse a small sealed JSON object (a manifest), without any check of its
    /// signature: a restore reads manifests through [`crate::repo::trust`].
    pub(crate) async fn open_json<T: DeserializeOwned>(&self, obj: &Object) -> Result<T> {
        let sealed = self.repo.get_sealed(obj).await?;
        parse_json(obj, &self.open_bytes(obj, &sealed)?)
    }

    /// Start reading the sealed object `obj` that a manifest describes as `pinned`: its key must
    /// be `obj`'s and its age header the one pinned (checked by [`Fetched::open`]).
    pub(crate) async fn fetch(&self, obj: &Object, pinned: &ObjectRef) -> Result<Fetched> {
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
    pub(crate) async fn fetch_content(&self, id: &ContentId) -> Result<Fetched> {
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

/// Open a small sealed object held in memory with `identities` (a manifest; a key file or a
/// machine file, [`super::keys`]).
pub(super) fn open_bytes_with(
    identities: &Identities,
    obj: &Object,
    sealed: &Sealed,
) -> Result<Vec<u8>> {
    let key = obj.key();
    let mut plain = Vec::new();
    identities
        .decrypt(sealed.as_bytes(), &key)?
        .read_to_end(&mut plain)
        .map_err(|e| read_error(&key, e))?;
    Ok(plain)
}

/// A sealed object on its way from the store, not opened yet. [`Fetched::open`] reads its header,
/// so it belongs on a blocking thread.
pub struct Fetched {
    raw: Box<dyn Read + Send + 'static>,
    key: String,
    pin: Option<String>,
    identities: Arc<Identities>,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fetched({})", self.key)
    }
}

impl Fetched {
    /// Read the age header with the identities and check it is the pinned one.
    pub fn open(self) -> Result<Unsealed> {
        let inner = self
            .identities
            .decrypt_pinned(self.raw, &self.key, self.pin.as_deref())?;
        Ok(Unsealed { inner })
    }
}

/// The plaintext of a sealed object, authenticated chunk by chunk as it is read.
pub struct Unsealed {
    inner: Opened<BufReader<Box<dyn Read + Send + 'static>>>,
}

impl Unsealed {
    /// Read content object `id` (a file of `len` bytes) to its end in chunks, handing each to
    /// `out` as it is read, while hashing it with the content `key`; an error naming the object
    /// (and `path`, the file it holds) when its length or keyed BLAKE3 hash is not what its address
    /// says. What `out` was handed before that is not verified: callers that must not let wrong bytes
    /// out keep them until this returns (a restore's unnamed file, `dump`'s buffer).
    pub fn copy_content(
        mut self,
        key: &[u8; 32],
        id: &ContentId,
        len: u64,
        path: &str,
        mut out: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let object = id.key();
        let mut hasher = blake3::Hasher::new_keyed(key);
        let mut buf = vec![0u8; 256 * 1024];
        let mut read = 0u64;
        loop {
            let n = self.read(&mut buf).map_err(|e| read_error(&object, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
            out(&buf[..n])?;
        }
        if read != len || ContentId(*hasher.finalize().as_bytes()) != *id {
            let file = match path {
                "" => format!("a {len}-byte file"),
                p => format!("{p}, {len} bytes"),
            };
            return Err(Error::Corrupt {
                object,
                message: format!("its content ({read} bytes) does not match its address ({file})"),
            });
        }
        Ok(())
    }
}

impl Read for Unsealed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
