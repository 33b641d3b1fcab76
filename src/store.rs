//! The store: every backend behind object_store's one trait, plus the small helpers our format needs.
//!
//! Objects are named by relative keys under the configured prefix (`data/ab/abcd…`, `snapshots/…`).
//! Writes never overwrite: content objects and snapshot objects are created with `PutMode::Create`
//! where the object fits one request, and large ones go up as multipart uploads, which become visible
//! only when complete. [`ObjectWriter`] and [`Store::reader`] are synchronous adapters for the
//! encryption threads, so a whole object never sits in memory.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use tokio::runtime::Handle;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::config::StorageConfig;
use crate::error::{Error, Result};

/// Size of one multipart part, and the largest object sent in a single request.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one object uploaded at once.
const PARTS_IN_FLIGHT: usize = 2;

/// A configured store with its key prefix.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// Hide credentials (user:password@ and query strings) in a store URL before it is shown.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            if u.query().is_some() {
                u.set_query(Some("<redacted>"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable url>".to_string(),
    }
}

impl Store {
    /// Open the store named by `[storage] url`.
    pub fn open(cfg: &StorageConfig) -> Result<Store> {
        let shown = redact_url(&cfg.url);
        let url = url::Url::parse(&cfg.url).map_err(|e| {
            Error::Config(format!("[storage] url {shown:?}: {e}; use file:///path"))
        })?;
        match url.scheme() {
            "file" => {
                let dir = url.to_file_path().map_err(|_| {
                    Error::Config(format!("[storage] url {shown}: not a local path"))
                })?;
                Self::open_local(&dir, shown)
            }
            other => Err(Error::Config(format!(
                "[storage] url scheme {other}:// is not supported yet; use file:///path"
            ))),
        }
    }

    fn open_local(dir: &std::path::Path, shown: String) -> Result<Store> {
        if !dir.is_dir() {
            return Err(Error::Storage {
                url: shown,
                message: format!(
                    "{} is not a directory; create it (or mount the NAS) and run `immich-backup init`",
                    dir.display()
                ),
            });
        }
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| Error::Storage {
                url: shown.clone(),
                message: e.to_string(),
            })?
            .with_fsync(true);
        Ok(Store {
            inner: Arc::new(fs),
            prefix: ObjectPath::default(),
            url: shown,
        })
    }

    /// Wrap an already built object store (used by tests and other backends).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Store {
        Store {
            inner,
            prefix: ObjectPath::from(prefix),
            url: redact_url(url),
        }
    }

    /// The store's URL with secrets removed.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjectPath {
        let mut p = self.prefix.clone();
        for part in key.split('/') {
            p = p.join(part);
        }
        p
    }

    fn key_of(&self, path: &ObjectPath) -> String {
        match path.prefix_match(&self.prefix) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.to_string(),
        }
    }

    /// Map an object_store error on `key` to ours.
    pub fn error(&self, key: &str, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { .. } => Error::Missing {
                object: key.to_string(),
                hint: "the store is incomplete or was pruned; try another snapshot, and run a new backup to store it again"
                    .into(),
            },
            object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. } => Error::Storage {
                url: self.url.clone(),
                message: format!("access to {key} denied: check the credentials and permissions"),
            },
            other => Error::StorageObject {
                object: key.to_string(),
                message: other.to_string(),
            },
        }
    }

    /// Create a small object; `Ok(false)` when it already exists (it is left as it was).
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&self.path(key), PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// Read a whole small object.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes> {
        let res = self
            .inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.error(key, e))?;
        res.bytes().await.map_err(|e| self.error(key, e))
    }

    /// Size of an object, or `None` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// Every object under `dir` (a key prefix ending without `/`), as (key, size).
    pub fn list(&self, dir: &str) -> impl futures::Stream<Item = Result<(String, u64)>> + '_ {
        let base = self.path(dir);
        let dir = dir.to_string();
        self.inner.list(Some(&base)).map(move |item| {
            item.map(|meta| (self.key_of(&meta.location), meta.size))
                .map_err(|e| self.error(&dir, e))
        })
    }

    /// Delete one object; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// A synchronous writer for `key`, to be used on a blocking thread.
    pub fn writer(&self, key: &str) -> ObjectWriter {
        ObjectWriter {
            store: self.clone(),
            key: key.to_string(),
            handle: Handle::current(),
            buf: Vec::new(),
            upload: None,
            written: 0,
        }
    }

    /// A synchronous streaming reader of `key`, to be used on a blocking thread.
    pub async fn reader(&self, key: &str) -> Result<impl Read + Send + 'static> {
        let res = self
            .inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.error(key, e))?;
        let stream = res.into_stream().map_err(io::Error::other);
        Ok(SyncIoBridge::new(StreamReader::new(stream)))
    }

    /// Keys of every object under `dir`, collected (for small listings).
    pub async fn list_keys(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        self.list(dir).try_collect().await
    }
}

/// Writes one object from a blocking thread: a single conditional put when it is small, a multipart
/// upload (visible only once complete) when it is not. Call [`ObjectWriter::finish`]; dropping it
/// abandons the object.
pub struct ObjectWriter {
    store: Store,
    key: String,
    handle: Handle,
    buf: Vec<u8>,
    upload: Option<WriteMultipart>,
    written: u64,
}

impl ObjectWriter {
    fn send_part(&mut self) -> io::Result<()> {
        if self.upload.is_none() {
            let path = self.store.path(&self.key);
            let inner = self.store.inner.clone();
            let upload = self
                .handle
                .block_on(inner.put_multipart(&path))
                .map_err(io::Error::other)?;
            self.upload = Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE));
        }
        let upload = self.upload.as_mut().expect("started above");
        {
            let _guard = self.handle.enter();
            upload.write(&self.buf);
        }
        self.buf.clear();
        self.handle
            .block_on(upload.wait_for_capacity(PARTS_IN_FLIGHT))
            .map_err(io::Error::other)
    }

    /// Complete the object. Returns the number of bytes stored; 0 when an object with this key
    /// already existed (content addresses make that the same content).
    pub fn finish(mut self) -> Result<u64> {
        let written = self.written;
        match self.upload.take() {
            None => {
                let data = Bytes::from(std::mem::take(&mut self.buf));
                let created = self.handle.block_on(self.store.put_new(&self.key, data))?;
                Ok(if created { written } else { 0 })
            }
            Some(mut upload) => {
                {
                    let _guard = self.handle.enter();
                    upload.write(&self.buf);
                }
                self.handle
                    .block_on(upload.finish())
                    .map_err(|e| self.store.error(&self.key, e))?;
                Ok(written)
            }
        }
    }

    /// Abandon the object: a multipart upload is aborted, nothing becomes visible.
    pub fn abort(mut self) {
        if let Some(upload) = self.upload.take() {
            let _ = self.handle.block_on(upload.abort());
        }
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        if self.buf.len() >= PART_SIZE {
            self.send_part()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            // Best effort: an abandoned multipart upload never becomes a visible object anyway.
            let handle = self.handle.clone();
            handle.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

/// Keys of every object under `dir` in a stream of pages, for large listings.
pub async fn count_objects(store: &Store, dir: &str) -> Result<(u64, u64)> {
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
