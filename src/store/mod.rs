//! The store: every backend behind object_store's one trait, plus the small helpers our format needs.
//! It knows keys and bytes, not what they mean: that is [`crate::repo`]'s.
//!
//! Objects are named by relative keys under the configured prefix (`data/ab/abcd…`, `snapshots/…`).
//! Writes never overwrite: content objects and snapshot objects are created with `PutMode::Create`
//! where the object fits one request, and large ones go up as multipart uploads, which become visible
//! only when complete. [`ObjectWriter`] and [`Store::reader`] are synchronous adapters for the
//! encryption threads, so a whole object never sits in memory.
//!
//! A `file://` store bypasses object_store on the data path: objects are plain files, staged per
//! backup and synced once per snapshot ([`crate::store::local`]); listings, locks and small objects
//! still go through object_store's `LocalFileSystem`. ([`ObjectWriter`]: the writer; [`cloud`]: the cloud
//! builders; [`check`]: what `init` tests.)
//!
//! Memory stays bounded: a writer buffers at most one part ([`PART_SIZE`]); each object has at most
//! `PARTS_IN_FLIGHT` parts uploading, and the whole store at most `[storage] concurrency` parts
//! (they wait for a slot), so peak upload memory is about (writers + concurrency) × `PART_SIZE`.
//!
//! Errors never show secrets: everything object_store reports passes through [`Redactor`], which
//! removes the configured secrets and URL query strings (SAS tokens), keeps only the code and first
//! line of an XML error body, and makes it one line.

pub mod check;
pub mod cloud;
pub mod directio;
pub mod local;
pub mod meter;
mod partial;
pub mod sftp;
pub mod webdav;
mod writer;

pub use writer::ObjectWriter;

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions,
    PutPayload,
};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::config::StorageConfig;
use crate::error::{Error, Result};
use crate::format::ContentId;
use crate::redact::{error_chain, redact_url, Redactor};
pub use crate::store::cloud::Backend;
use crate::store::local::LocalDir;
use crate::store::meter::{Limiter, Metered, Traffic, TrafficCounts};

/// Size of one multipart part, and the largest object sent in a single request: the part size of
/// every object whose length is not known ahead (the dump) or fits [`MAX_PARTS`] such parts (78 GiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one object uploaded at once (fewer when its parts are larger than [`PART_SIZE`]).
pub(crate) const PARTS_IN_FLIGHT: usize = 4;
/// Most parts of one multipart upload: S3's and GCS's limit (Azure allows 50,000 blocks).
pub const MAX_PARTS: u64 = 10_000;
/// Largest part S3 accepts (5 GiB). S3's largest object, 5 TiB, takes 10,000 parts of 525 MiB.
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// The part size for an object of `len` bytes that must fit `max_parts` parts: [`PART_SIZE`] while
/// that fits, else the smallest whole MiB that does (a 5 TiB object: 525 MiB parts). All parts of
/// one object have the same size (Cloudflare R2 requires it).
pub fn part_size_for(len: u64, max_parts: u64) -> usize {
    const MIB: u64 = 1024 * 1024;
    let needed = len.div_ceil(max_parts.max(1)).div_ceil(MIB) * MIB;
    needed.clamp(PART_SIZE as u64, MAX_PART_SIZE) as usize
}

/// Parts of `part_size` bytes one object may have uploading at once: [`PARTS_IN_FLIGHT`] of the
/// usual size, fewer of larger ones (at least one), so an object's memory stays near
/// `PARTS_IN_FLIGHT × PART_SIZE` until its parts alone exceed that.
pub(crate) fn parts_in_flight(part_size: usize) -> usize {
    (PARTS_IN_FLIGHT * PART_SIZE / part_size.max(1)).clamp(1, PARTS_IN_FLIGHT)
}

/// A configured store with its key prefix.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    backend: Backend,
    bucket: String,
    redactor: Arc<Redactor>,
    attributes: Attributes,
    conditional: bool,
    part_slots: Arc<Semaphore>,
    /// Most parts of one multipart upload ([`MAX_PARTS`]; lowered only by tests).
    max_parts: u64,
    /// The requests sent to a cloud store, by kind ([`meter`]).
    traffic: Arc<Traffic>,
    /// The local-folder fast path ([`crate::store::local`]), for `file://` stores.
    local: Option<Arc<LocalDir>>,
    /// The temporary upload names of a WebDAV or SFTP store ([`partial::Temporaries`]).
    temporaries: Option<Arc<dyn partial::Temporaries>>,
    /// How long a create-only put cut off in transit is tried again ([`Store::put_new`]).
    retry: Retry,
}

/// `[storage] max_retries` and `retry_timeout_secs`, for the retries object_store leaves to us.
#[derive(Debug, Clone, Copy)]
struct Retry {
    max_retries: usize,
    timeout: std::time::Duration,
}

impl Retry {
    fn of(cfg: &StorageConfig) -> Retry {
        Retry {
            max_retries: cfg.max_retries,
            timeout: std::time::Duration::from_secs(cfg.retry_timeout_secs),
        }
    }
}

/// Whether `e` is a failure of the transport (a connection refused, cut or timed out), not an
/// answer of the server.
fn is_transport(e: &object_store::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return true;
        }
        source = s.source();
    }
    false
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// The service's error code (`NoSuchBucket`, `SignatureDoesNotMatch`, …) in an error text, if any.
fn error_code(text: &str) -> Option<String> {
    let a = text.find("<Code>")? + "<Code>".len();
    let b = text[a..].find("</Code>")? + a;
    Some(text[a..b].trim().to_string())
}

/// The HTTP status in an object_store error text, if it names one.
fn http_status(text: &str) -> Option<u16> {
    let marker = "status code: ";
    let at = text.find(marker)? + marker.len();
    text.get(at..at + 3)?.parse().ok()
}

/// The folder of a folder store: a plain absolute path (`/mnt/nas/backup`) or
/// `file:///absolute/path`; `None` for any other URL. The spellings that would not mean what they
/// seem (`file:store`, `file://./store`, `file://tmp/x`, a relative path) are refused, naming
/// what was typed and the right spelling.
pub fn folder_of(url: &str) -> Result<Option<std::path::PathBuf>> {
    let bad = |why: String| Error::Config(format!("[storage] url = {url:?}: {why}"));
    if url.starts_with('/') {
        return Ok(Some(std::path::PathBuf::from(url)));
    }
    let Some(rest) = url
        .get(..5)
        .filter(|s| s.eq_ignore_ascii_case("file:"))
        .map(|_| &url[5..])
    else {
        if !url.is_empty() && !url.contains(':') {
            return Err(bad("a relative path, which would depend on the folder the command runs in; write the absolute path of the folder (\"/mnt/nas/backup\") or file:///absolute/path".into()));
        }
        return Ok(None);
    };
    let path = match rest.strip_prefix("//") {
        Some(abs) if abs.starts_with('/') => abs,
        Some(host_first) => {
            let host = host_first.split('/').next().unwrap_or_default();
            return Err(bad(format!(
                "{host:?} after file:// is read as a host name, not a folder; a folder store is file:///absolute/path (three slashes) or the plain absolute path, e.g. \"/{host_first}\" if that is what you mean"
            )));
        }
        None => {
            let guess = if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/absolute/path/to/{rest}")
            };
            return Err(bad(format!(
                "ambiguous (file: without //); write file:///absolute/path or the plain absolute path, e.g. \"{guess}\""
            )));
        }
    };
    let parsed = url::Url::parse(&format!("file://{path}")).map_err(|e| bad(e.to_string()))?;
    parsed.to_file_path().map(Some).map_err(|_| {
        bad("not a local path; write file:///absolute/path or the plain absolute path".into())
    })
}

impl Store {
    /// Open the store named by `[storage] url`.
    pub fn open(cfg: &StorageConfig) -> Result<Store> {
        let shown = redact_url(&cfg.url);
        if let Some(dir) = folder_of(&cfg.url)? {
            if !cfg.storage_class.is_empty() {
                return Err(Error::Config(
                    "[storage] storage_class applies to cloud stores only".into(),
                ));
            }
            let mut store = Self::open_local(&dir, shown, cfg.direct_io)?;
            store.part_slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
            return Ok(store);
        }
        let url = url::Url::parse(&cfg.url).map_err(|e| {
            Error::Config(format!(
                "[storage] url {shown:?}: {e}; use /absolute/path, file:///absolute/path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, webdavs://user@host/path or sftp://user@host/path"
            ))
        })?;
        let unknown = || {
            Error::Config(format!(
                "[storage] url {shown}: unknown scheme; use /absolute/path, file:///absolute/path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, webdavs://user@host/path or sftp://user@host/path"
            ))
        };
        if webdav::is_webdav(url.scheme()) {
            let dav = webdav::build(cfg, &url, &shown)?;
            let temporaries = Arc::new(dav.clone());
            let mut store = Self::open_cloud(
                cfg,
                &url,
                Backend::WebDav,
                ObjectPath::default(),
                shown,
                |_| Ok(Arc::new(dav)),
            )?;
            store.temporaries = Some(temporaries);
            return Ok(store);
        }
        if sftp::is_sftp(url.scheme()) {
            let sftp = sftp::build(cfg, &url, &shown)?;
            let temporaries = Arc::new(sftp.clone());
            let mut store = Self::open_cloud(
                cfg,
                &url,
                Backend::Sftp,
                ObjectPath::default(),
                shown,
                |_| Ok(Arc::new(sftp)),
            )?;
            store.temporaries = Some(temporaries);
            return Ok(store);
        }
        let (scheme, prefix) = ObjectStoreScheme::parse(&url).map_err(|_| unknown())?;
        let backend = match scheme {
            ObjectStoreScheme::Local => return Err(unknown()),
            ObjectStoreScheme::AmazonS3 => Backend::S3,
            ObjectStoreScheme::GoogleCloudStorage => Backend::Gcs,
            ObjectStoreScheme::MicrosoftAzure => Backend::Azure,
            _ => {
                return Err(Error::Config(format!(
                    "[storage] url {shown}: plain http(s) stores are not supported; for an S3-compatible service use s3://bucket/prefix with [storage] endpoint = \"{}://{}\"",
                    url.scheme(),
                    url.host_str().unwrap_or("host")
                )))
            }
        };
        let shown_for_build = shown.clone();
        Self::open_cloud(cfg, &url, backend, prefix, shown, |redactor| {
            crate::store::cloud::build(cfg, &url, backend, &shown_for_build, redactor)
        })
    }

    /// A cloud (or WebDAV) store: `build` makes the client, which is wrapped by [`Metered`].
    fn open_cloud(
        cfg: &StorageConfig,
        url: &url::Url,
        backend: Backend,
        prefix: ObjectPath,
        shown: String,
        build: impl FnOnce(&Redactor) -> Result<Arc<dyn ObjectStore>>,
    ) -> Result<Store> {
        let redactor = Arc::new(Redactor::new(cfg.secrets()));
        let traffic = Arc::new(Traffic::default());
        let (up, down) = cfg.limits()?;
        let inner: Arc<dyn ObjectStore> = Arc::new(Metered::new(
            build(&redactor)?,
            traffic.clone(),
            up.map(|r| Arc::new(Limiter::new(r))),
            down.map(|r| Arc::new(Limiter::new(r))),
        ));
        let mut attributes = Attributes::new();
        if !cfg.storage_class.is_empty() {
            attributes.insert(Attribute::StorageClass, cfg.storage_class.clone().into());
        }
        // For messages: az://CONTAINER@ACCOUNT…, s3://BUCKET/…, https://HOST/BUCKET/…, the
        // WebDAV folder.
        let bucket = if matches!(backend, Backend::WebDav | Backend::Sftp) {
            format!("{}{}", url.host_str().unwrap_or_default(), url.path())
        } else if !url.username().is_empty() {
            url.username().to_string()
        } else if url.scheme() == "https" {
            url.path_segments()
                .and_then(|mut s| s.next())
                .unwrap_or_default()
                .to_string()
        } else {
            url.host_str().unwrap_or_default().to_string()
        };
        Ok(Store {
            inner,
            prefix,
            url: shown,
            backend,
            bucket,
            redactor,
            attributes,
            conditional: cfg.conditional_create,
            part_slots: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            max_parts: MAX_PARTS,
            traffic,
            local: None,
            temporaries: None,
            retry: Retry::of(cfg),
        })
    }

    fn open_local(dir: &std::path::Path, shown: String, direct_io: bool) -> Result<Store> {
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
            backend: Backend::Local,
            bucket: dir.display().to_string(),
            redactor: Arc::new(Redactor::default()),
            attributes: Attributes::new(),
            conditional: true,
            part_slots: Arc::new(Semaphore::new(8)),
            max_parts: MAX_PARTS,
            traffic: Arc::new(Traffic::default()),
            local: Some(Arc::new(LocalDir::new(dir, direct_io))),
            temporaries: None,
            retry: Retry::of(&StorageConfig::default()),
        })
    }

    /// Wrap an already built object store (unit tests: an in-memory or plain folder store).
    #[cfg(test)]
    pub(crate) fn from_object_store(inner: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Store {
        Store {
            inner,
            prefix: ObjectPath::from(prefix),
            url: redact_url(url),
            backend: Backend::Local,
            bucket: String::new(),
            redactor: Arc::new(Redactor::default()),
            attributes: Attributes::new(),
            conditional: true,
            part_slots: Arc::new(Semaphore::new(8)),
            max_parts: MAX_PARTS,
            traffic: Arc::new(Traffic::default()),
            local: None,
            temporaries: None,
            retry: Retry::of(&StorageConfig::default()),
        }
    }

    /// Whether the store is across a network (not a local folder): small objects then wait on
    /// the round trip more than on bandwidth, and more of them go at once.
    pub fn is_remote(&self) -> bool {
        self.local.is_none()
    }

    /// The requests sent to the store so far, by kind (cloud stores; a folder store counts none).
    pub fn traffic(&self) -> TrafficCounts {
        self.traffic.counts()
    }

    /// The store's URL with secrets removed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which service this is.
    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    /// The bucket (or container, or folder) name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Whether new objects are created with conditional writes.
    pub fn conditional_create(&self) -> bool {
        self.conditional
    }

    /// The underlying object store and the full path of `key` (for checks that need the raw API).
    pub fn raw(&self, key: &str) -> (Arc<dyn ObjectStore>, ObjectPath) {
        (self.inner.clone(), self.path(key))
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
        let raw = error_chain(&e);
        let code = error_code(&raw);
        let missing_bucket = matches!(
            code.as_deref(),
            Some("NoSuchBucket" | "ContainerNotFound" | "ContainerBeingDeleted")
        );
        let denied = matches!(http_status(&raw), Some(401 | 403));
        if self.backend == Backend::Local {
            if let Some(io) = crate::redact::io_error_in(&e) {
                if let Some(e) = self.local_io_error(key, io) {
                    return e;
                }
            }
        }
        match e {
            _ if missing_bucket => Error::Storage {
                url: self.url.clone(),
                message: format!(
                    "{} {:?} does not exist ({}); create it, or correct [storage] url",
                    self.backend.bucket_word(),
                    self.bucket,
                    code.unwrap_or_default()
                ),
            },
            // The SFTP store words its own causes and remedies (host key, connection, disk full).
            object_store::Error::Generic {
                store: sftp::STORE,
                source,
            } => Error::Storage {
                url: self.url.clone(),
                message: self.redactor.scrub(&source.to_string()),
            },
            object_store::Error::NotFound { .. } => Error::Missing {
                object: key.to_string(),
                hint: "the store is incomplete or was pruned; try another snapshot, and run a new backup to store it again"
                    .into(),
            },
            object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. } => self.denied(key, code),
            _ if denied => self.denied(key, code),
            other => Error::StorageObject {
                object: key.to_string(),
                message: self.redactor.clean(&error_chain(&other)),
            },
        }
    }

    /// A folder store's file-system refusal, naming the folder and what to do.
    fn local_io_error(&self, key: &str, io: &io::Error) -> Option<Error> {
        let why = match io.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => format!(
                "permission denied writing {key} in the folder {}: give the user running immich-backup (uid {}) write access to the folder and everything in it (chown/chmod, or the NAS share's permissions), or run as a user that has it",
                self.bucket,
                // SAFETY: geteuid(2) has no arguments and cannot fail.
                unsafe { libc::geteuid() }
            ),
            Some(libc::EROFS) => format!(
                "the folder {} is on a read-only file system (writing {key}): mount it read-write, or choose another [storage] url",
                self.bucket
            ),
            _ => return None,
        };
        Some(Error::Storage {
            url: self.url.clone(),
            message: why,
        })
    }

    fn denied(&self, key: &str, code: Option<String>) -> Error {
        Error::Storage {
            url: self.url.clone(),
            message: format!(
                "access to {key} denied{}: the store refused the credentials; {}",
                code.map(|c| format!(" ({c})")).unwrap_or_default(),
                self.backend.credentials_hint()
            ),
        }
    }

    /// Create a small object; `Ok(false)` when it already exists (it is left as it was).
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        let path = self.path(key);
        if !self.conditional {
            // The server does not do conditional writes: check, then write (a race can only
            // rewrite the same content, or a snapshot id nobody else generates).
            match self.inner.head(&path).await {
                Ok(_) => return Ok(false),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(key, e)),
            }
        }
        let opts = self.put_options(if self.conditional {
            PutMode::Create
        } else {
            PutMode::Overwrite
        });
        // object_store retries a put cut off in transit only when it is idempotent, which a
        // create-only one is not (it may have landed): try it again here, and when it then exists,
        // it is ours if it holds our bytes.
        let started = std::time::Instant::now();
        let mut wait = std::time::Duration::from_secs(1);
        let mut tries = 0;
        loop {
            let put = self
                .inner
                .put_opts(&path, PutPayload::from(data.clone()), opts.clone());
            match put.await {
                Ok(_) => return Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) if tries == 0 => return Ok(false),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return Ok(self.get_bytes(key).await? == data)
                }
                Err(e)
                    if is_transport(&e)
                        && tries < self.retry.max_retries
                        && started.elapsed() + wait <= self.retry.timeout =>
                {
                    tracing::warn!(object = key, error = %self.redactor.scrub(&e.to_string()), "a write was cut off; trying again in {}s", wait.as_secs());
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(15));
                    tries += 1;
                }
                Err(e) => return Err(self.error(key, e)),
            }
        }
    }

    /// Our error for an I/O error on `key` of a local store.
    fn local_error(&self, key: &str, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::NotFound {
            return self.error(
                key,
                object_store::Error::NotFound {
                    path: key.to_string(),
                    source: Box::new(e),
                },
            );
        }
        Error::StorageObject {
            object: key.to_string(),
            message: e.to_string(),
        }
    }

    /// Read a whole small object.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes> {
        if let Some(local) = &self.local {
            return match tokio::fs::read(local.path(key)).await {
                Ok(b) => Ok(Bytes::from(b)),
                Err(e) => Err(self.local_error(key, e)),
            };
        }
        let res = self.get(key).await?;
        res.bytes().await.map_err(|e| self.error(key, e))
    }

    /// Start reading `key` through object_store.
    async fn get(&self, key: &str) -> Result<object_store::GetResult> {
        self.inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.error(key, e))
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

    /// The same store with a lower multipart part limit than [`MAX_PARTS`]: for tests, which
    /// cannot write 78 GiB to see the part size grow.
    #[doc(hidden)]
    pub fn with_max_parts(mut self, max_parts: u64) -> Store {
        self.max_parts = max_parts.max(1);
        self
    }

    /// A synchronous writer for `key`, to be used on a blocking thread.
    pub fn writer(&self, key: &str) -> ObjectWriter {
        self.object_writer(key, false)
    }

    fn object_writer(&self, key: &str, replace: bool) -> ObjectWriter {
        let local = self.local.as_ref().map(|l| {
            if replace {
                l.create_replacing(key)
            } else {
                l.create(key)
            }
        });
        ObjectWriter {
            store: self.clone(),
            key: key.to_string(),
            handle: Handle::current(),
            buf: Vec::new(),
            upload: None,
            written: 0,
            part_size: PART_SIZE,
            parts: 0,
            local,
            replace,
        }
    }

    /// A writer that replaces the object `key` when complete, in one step (`backup --repair`): on a
    /// folder store a synced temporary file renamed over it, on a cloud store an overwriting put
    /// (or a multipart upload, which replaces the object only when complete).
    pub(crate) fn replacing_writer(&self, key: &str) -> ObjectWriter {
        self.object_writer(key, true)
    }

    /// Options of a single-request put in `mode`, with the configured attributes (storage class).
    fn put_options(&self, mode: PutMode) -> PutOptions {
        PutOptions {
            mode,
            attributes: self.attributes.clone(),
            ..Default::default()
        }
    }

    /// Replace a small object in one request.
    async fn put_overwrite(&self, key: &str, data: Bytes) -> Result<()> {
        let opts = self.put_options(PutMode::Overwrite);
        self.inner
            .put_opts(&self.path(key), PutPayload::from(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.error(key, e))
    }

    /// A writer for a content object that is named only once complete ([`ObjectWriter::name`]):
    /// local stores during a backup only, so a new file is read once, hashed as it is encrypted.
    pub(crate) fn unnamed_writer(&self) -> Option<ObjectWriter> {
        let local = self.local.as_ref()?.create_unnamed()?;
        Some(ObjectWriter {
            store: self.clone(),
            key: format!("{}/(new)", crate::format::DATA_DIR),
            handle: Handle::current(),
            buf: Vec::new(),
            upload: None,
            written: 0,
            part_size: PART_SIZE,
            parts: 0,
            local: Some(local),
            replace: false,
        })
    }

    /// A synchronous streaming reader of `key`, to be used on a blocking thread.
    pub async fn reader(&self, key: &str) -> Result<Box<dyn Read + Send + 'static>> {
        if let Some(local) = &self.local {
            // Buffered: age parses the header in small reads (its chunks, larger than the
            // buffer, pass straight through).
            return match std::fs::File::open(local.path(key)) {
                Ok(f) => Ok(Box::new(io::BufReader::with_capacity(64 * 1024, f))),
                Err(e) => Err(self.local_error(key, e)),
            };
        }
        let res = self.get(key).await?;
        let stream = res.into_stream().map_err(io::Error::other);
        Ok(Box::new(SyncIoBridge::new(StreamReader::new(stream))))
    }

    /// Every content address in `data/` (a local store reads only folder names).
    pub(crate) async fn content_ids(&self) -> Result<Vec<ContentId>> {
        if let Some(local) = self.local.clone() {
            return tokio::task::spawn_blocking(move || local.content_ids())
                .await
                .map_err(|e| Error::Other(format!("listing: {e}")))?
                .map_err(|e| self.local_error(crate::format::DATA_DIR, e));
        }
        self.content_sizes()
            .map_ok(|(id, _)| id)
            .try_collect()
            .await
    }

    /// Every content object in `data/` with its stored size.
    pub(crate) fn content_sizes(
        &self,
    ) -> impl futures::Stream<Item = Result<(ContentId, u64)>> + '_ {
        self.list(crate::format::DATA_DIR)
            .try_filter_map(
                |(k, size)| async move { Ok(ContentId::from_key(&k).map(|id| (id, size))) },
            )
    }

    /// Run blocking work on the local folder, mapping its I/O error to one on `what`.
    async fn on_local<T: Send + 'static>(
        &self,
        what: &str,
        work: impl FnOnce(&LocalDir) -> io::Result<T> + Send + 'static,
    ) -> Result<Option<T>> {
        let Some(local) = self.local.clone() else {
            return Ok(None);
        };
        let out = tokio::task::spawn_blocking(move || work(&local))
            .await
            .map_err(|e| Error::Other(format!("{what}: {e}")))?;
        out.map(Some).map_err(|e| self.local_error(what, e))
    }

    /// A backup starts: content it writes to a local store is staged until [`Store::publish`].
    pub(crate) async fn begin_staging(&self) -> Result<()> {
        self.on_local(crate::store::local::STAGING_DIR, |l| l.begin_staging())
            .await
            .map(|_| ())
    }

    /// Whether this run stages its content (a local store during a backup).
    pub(crate) fn is_staging(&self) -> bool {
        self.local.as_ref().is_some_and(|l| l.is_staging())
    }

    /// Whether this run has staged content object `id` (always false when not staging).
    pub(crate) fn is_staged(&self, id: &ContentId) -> bool {
        self.local.as_ref().is_some_and(|l| l.is_staged(id))
    }

    /// Make this run's staged content durable and visible in `data/`, and everything written before
    /// durable; returns how many objects were new.
    pub(crate) async fn publish(&self) -> Result<u64> {
        let n = self
            .on_local(crate::store::local::STAGING_DIR, |l| l.publish())
            .await?;
        Ok(n.unwrap_or(0))
    }

    /// The staging folders of other runs (local stores), with their owners.
    pub(crate) async fn other_staging(
        &self,
    ) -> Result<Vec<(String, Option<crate::store::local::Owner>, bool)>> {
        let found = self
            .on_local(crate::store::local::STAGING_DIR, |l| l.other_staging())
            .await?;
        Ok(found.unwrap_or_default())
    }

    /// Publish the staging folder `name` of a run that died; returns how many objects were new.
    pub(crate) async fn adopt_staging(&self, name: &str) -> Result<u64> {
        let name = name.to_string();
        let n = self
            .on_local(crate::store::local::STAGING_DIR, move |l| l.adopt(&name))
            .await?;
        Ok(n.unwrap_or(0))
    }

    /// Remove the staging folder `name` of a run whose bytes cannot be trusted.
    pub(crate) async fn discard_staging(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.on_local(crate::store::local::STAGING_DIR, move |l| l.discard(&name))
            .await
            .map(|_| ())
    }

    /// Keys of the objects directly under the prefix (not in `data/`, `snapshots/`, …).
    pub(crate) async fn list_top(&self) -> Result<Vec<String>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listed = self
            .inner
            .list_with_delimiter(prefix)
            .await
            .map_err(|e| self.error("", e))?;
        Ok(listed
            .objects
            .iter()
            .map(|m| self.key_of(&m.location))
            .collect())
    }

    /// The temporary upload names (WebDAV, SFTP: `NAME.immich-backup-partial-…`) last written more
    /// than `older_than` ago, as (key, size): what killed uploads left. None on other stores.
    pub(crate) async fn stale_temporaries(
        &self,
        older_than: std::time::Duration,
    ) -> Result<Vec<(String, u64)>> {
        let Some(temporaries) = &self.temporaries else {
            return Ok(Vec::new());
        };
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        temporaries
            .temporaries()
            .try_filter(|m| futures::future::ready(m.last_modified < cutoff))
            .map_ok(|m| (self.key_of(&m.location), m.size))
            .map_err(|e| self.error("", e))
            .try_collect()
            .await
    }

    /// Keys of every object under `dir`, collected (for small listings).
    pub async fn list_keys(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        self.list(dir).try_collect().await
    }
}

/// Our error back out of an `io::Error` that an [`ObjectWriter`] (possibly through the encryption
/// layers) returned; other I/O errors become a storage error on `key`.
pub(crate) fn error_from_io(key: &str, e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        let inner = e.into_inner().expect("checked above");
        return *inner.downcast::<Error>().expect("checked above");
    }
    Error::StorageObject {
        object: key.to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_grow_only_past_the_part_limit() {
        const MIB: u64 = 1024 * 1024;
        const GIB: u64 = 1024 * MIB;
        assert_eq!(part_size_for(0, MAX_PARTS), PART_SIZE);
        let most_at_8 = MAX_PARTS * PART_SIZE as u64; // 78 GiB
        assert_eq!(part_size_for(most_at_8, MAX_PARTS), PART_SIZE);
        assert_eq!(part_size_for(most_at_8 + 1, MAX_PARTS), 9 * MIB as usize);
        // S3's largest object fits its 10,000 parts, in parts S3 accepts.
        let tib5 = 5 * 1024 * GIB;
        let part = part_size_for(tib5, MAX_PARTS) as u64;
        assert!(
            tib5.div_ceil(part) <= MAX_PARTS && part <= 5 * GIB,
            "{part}"
        );
        assert_eq!(part, 525 * MIB);
        assert_eq!(part_size_for(u64::MAX, MAX_PARTS) as u64, 5 * GIB);
        assert_eq!(parts_in_flight(PART_SIZE), PARTS_IN_FLIGHT);
        assert_eq!(parts_in_flight(2 * PART_SIZE), 2);
        assert_eq!(parts_in_flight(525 * MIB as usize), 1);
    }

    #[test]
    fn status_and_code_are_found_in_error_text() {
        assert_eq!(
            http_status("Server returned non-2xx status code: 403 Forbidden: x"),
            Some(403)
        );
        assert_eq!(http_status("connection refused"), None);
        assert_eq!(
            error_code("... <Error><Code>NoSuchBucket</Code> ...").as_deref(),
            Some("NoSuchBucket")
        );
    }
}
