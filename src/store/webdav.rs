//! WebDAV stores (`webdavs://user@host/path`: Nextcloud, Hetzner Storage Box, `rclone serve webdav`),
//! as object_store's trait over reqwest, so they sit behind [`crate::store::meter`] like every
//! cloud backend.
//!
//! WebDAV has no conditional create and no multipart upload, so writes keep the format's promises
//! with temporary names: every object is first PUT as `NAME.immich-backup-partial-RANDOM` in its folder, then
//! MOVEd onto its key with `Overwrite: F` (the server answers 412 when the key exists: the object is
//! never overwritten, and the temporary is deleted). A multipart upload is one streamed PUT of all
//! parts, in order, to the temporary name; only `complete` MOVEs it into place, so a killed or
//! abandoned upload never shows under its key. Listings hide these temporary names; `prune` deletes
//! the ones a killed upload left (`store/partial.rs`). Folders are created (MKCOL) as
//! needed. Apache's OpenDAL was not used: its object_store adapter writes in place and pulls a
//! second HTTP stack; this is the few requests we need.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, UploadPart,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use crate::config::StorageConfig;
use crate::error::{Error, Result};
use crate::store::partial::{
    head_result, partial_name, put_result, refuse_conditions, walk, Temporaries, PARTIAL,
};

const STORE: &str = "WebDAV";

/// One WebDAV folder as an object store.
#[derive(Clone)]
pub struct WebDav {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    /// The store's folder, ending in `/`.
    base: url::Url,
    user: String,
    password: String,
    /// Folders known to exist (created or seen), relative to `base`.
    /// Held while folders are made, so that two uploads never MKCOL one folder at once.
    folders: tokio::sync::Mutex<HashSet<String>>,
    max_retries: usize,
    retry_timeout: Duration,
}

impl fmt::Debug for WebDav {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebDav({})", self.inner.base)
    }
}

impl fmt::Display for WebDav {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebDAV at {}", self.inner.base)
    }
}

/// Whether `scheme` names a WebDAV store.
pub fn is_webdav(scheme: &str) -> bool {
    matches!(scheme, "webdav" | "webdavs")
}

/// The WebDAV store of `[storage]` and its URL (`webdav://` is plain HTTP and needs `allow_http`).
pub fn build(cfg: &StorageConfig, url: &url::Url, shown: &str) -> Result<WebDav> {
    let bad = |why: &str| Error::Config(format!("[storage] url {shown}: {why}"));
    if url.password().is_some() {
        return Err(bad("put the WebDAV password in [storage] password (or IMMICH_BACKUP__STORAGE__PASSWORD), not in the URL"));
    }
    let http = match url.scheme() {
        "webdavs" => "https",
        _ if cfg.allow_http => "http",
        _ => return Err(bad("webdav:// is plain HTTP, which sends the password unencrypted; use webdavs://, or set [storage] allow_http = true for a server on a trusted network")),
    };
    let host = url.host_str().ok_or_else(|| bad("no host"))?;
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let mut path = url.path().to_string();
    if !path.ends_with('/') {
        path.push('/');
    }
    let base = url::Url::parse(&format!("{http}://{host}{port}{path}"))
        .map_err(|e| bad(&e.to_string()))?;
    let user = if cfg.username.is_empty() {
        percent_encoding::percent_decode_str(url.username())
            .decode_utf8_lossy()
            .into_owned()
    } else {
        cfg.username.clone()
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(cfg.request_timeout_secs.max(1)))
        .build()
        .map_err(|e| bad(&e.to_string()))?;
    Ok(WebDav {
        inner: Arc::new(Inner {
            client,
            base,
            user,
            password: cfg.password.clone(),
            folders: tokio::sync::Mutex::new(HashSet::new()),
            max_retries: cfg.max_retries,
            retry_timeout: Duration::from_secs(cfg.retry_timeout_secs),
        }),
    })
}

fn generic(status: impl fmt::Display) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: status.to_string().into(),
    }
}

/// object_store's error for an unexpected answer to `what` on `path`.
fn status_error(what: &str, path: &str, status: StatusCode) -> object_store::Error {
    let source = format!("{what} {path}: HTTP status code: {}", status.as_u16()).into();
    match status {
        StatusCode::NOT_FOUND => object_store::Error::NotFound {
            path: path.into(),
            source,
        },
        StatusCode::UNAUTHORIZED => object_store::Error::Unauthenticated {
            path: path.into(),
            source,
        },
        StatusCode::FORBIDDEN => object_store::Error::PermissionDenied {
            path: path.into(),
            source,
        },
        StatusCode::PRECONDITION_FAILED => object_store::Error::AlreadyExists {
            path: path.into(),
            source,
        },
        _ => object_store::Error::Generic {
            store: STORE,
            source,
        },
    }
}

impl Inner {
    /// The URL of `path` (a folder URL ends in `/`).
    fn url(&self, path: &Path, folder: bool) -> url::Url {
        let mut u = self.base.clone();
        {
            let mut segs = u.path_segments_mut().expect("http URL");
            segs.pop_if_empty();
            for p in path.parts() {
                segs.push(p.as_ref());
            }
            if folder {
                segs.push("");
            }
        }
        u
    }

    fn request(&self, method: Method, url: url::Url) -> RequestBuilder {
        let r = self.client.request(method, url);
        if self.user.is_empty() && self.password.is_empty() {
            r
        } else {
            r.basic_auth(&self.user, Some(&self.password))
        }
    }

    /// Send a request that can be repeated, retrying connection errors and 5xx answers.
    async fn send(&self, make: impl Fn() -> RequestBuilder) -> object_store::Result<Response> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            let r = make().send().await;
            let retry = match &r {
                Ok(resp) => resp.status().is_server_error(),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request(),
            };
            if !retry || tries >= self.max_retries || start.elapsed() + wait > self.retry_timeout {
                return r.map_err(|e| generic(crate::redact::error_chain(&e)));
            }
            tries += 1;
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(15));
        }
    }

    /// Make sure the folders above `path` exist (MKCOL from the top; 405 means it already does).
    async fn ensure_parents(&self, path: &Path) -> object_store::Result<()> {
        let parts: Vec<_> = path.parts().collect();
        let mut dir = Path::default();
        let mut known = self.folders.lock().await;
        // The store's own folder first (like a bucket prefix, it is created on first write; its
        // parent must exist), then the folders above `path`.
        let wanted =
            std::iter::once(None).chain(parts.iter().take(parts.len().saturating_sub(1)).map(Some));
        for p in wanted {
            if let Some(p) = p {
                dir = dir.join(p.as_ref());
            }
            let key = dir.to_string();
            if known.contains(&key) {
                continue;
            }
            let url = self.url(&dir, true);
            let r = self
                .send(|| self.request(Method::from_bytes(b"MKCOL").unwrap(), url.clone()))
                .await?;
            match r.status() {
                s if s.is_success() || s == StatusCode::METHOD_NOT_ALLOWED => {}
                StatusCode::CONFLICT if key.is_empty() => {
                    return Err(generic(format!(
                        "MKCOL {}: the folder above the store's folder does not exist (HTTP status code: 409); create it, or correct [storage] url",
                        self.base.path()
                    )))
                }
                s => return Err(status_error("MKCOL", &key, s)),
            }
            known.insert(key);
        }
        Ok(())
    }

    /// MOVE (or COPY) `from` onto `to`, never replacing `to` unless `overwrite`.
    async fn transfer(
        &self,
        method: &'static [u8],
        from: &Path,
        to: &Path,
        overwrite: bool,
    ) -> object_store::Result<()> {
        self.ensure_parents(to).await?;
        let dest = self.url(to, false);
        let src = self.url(from, false);
        let r = self
            .send(|| {
                self.request(Method::from_bytes(method).unwrap(), src.clone())
                    .header("Destination", dest.as_str())
                    .header("Overwrite", if overwrite { "T" } else { "F" })
            })
            .await?;
        match r.status() {
            s if s.is_success() => Ok(()),
            s => Err(status_error(
                std::str::from_utf8(method).unwrap_or("MOVE"),
                to.as_ref(),
                s,
            )),
        }
    }

    async fn delete(&self, path: &Path) -> object_store::Result<()> {
        let url = self.url(path, false);
        let r = self
            .send(|| self.request(Method::DELETE, url.clone()))
            .await?;
        match r.status() {
            s if s.is_success() => Ok(()),
            s => Err(status_error("DELETE", path.as_ref(), s)),
        }
    }

    /// Move a finished temporary object onto its key (create-only unless `overwrite`); the
    /// temporary is deleted when the key exists.
    async fn publish(
        &self,
        tmp: &Path,
        location: &Path,
        overwrite: bool,
    ) -> object_store::Result<PutResult> {
        match self.transfer(b"MOVE", tmp, location, overwrite).await {
            Ok(()) => Ok(put_result()),
            Err(e) => {
                let _ = self.delete(tmp).await;
                Err(e)
            }
        }
    }

    /// PROPFIND `dir` with `Depth: 1`: its files (its temporary files instead when `partial`) and
    /// subfolders (relative paths).
    async fn propfind(
        &self,
        dir: &Path,
        partial: bool,
    ) -> object_store::Result<(Vec<ObjectMeta>, Vec<Path>)> {
        let url = self.url(dir, true);
        const BODY: &str = r#"<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/><D:getcontentlength/><D:getlastmodified/><D:getetag/></D:prop></D:propfind>"#;
        let r = self
            .send(|| {
                self.request(Method::from_bytes(b"PROPFIND").unwrap(), url.clone())
                    .header("Depth", "1")
                    .header("Content-Type", "application/xml")
                    .body(BODY)
            })
            .await?;
        let status = r.status();
        if status != StatusCode::MULTI_STATUS {
            return Err(status_error("PROPFIND", dir.as_ref(), status));
        }
        let text = r.text().await.map_err(generic)?;
        let mut files = Vec::new();
        let mut folders = Vec::new();
        let own = url.path().trim_end_matches('/').to_string();
        for e in parse_multistatus(&text)? {
            let Ok(href) = url.join(&e.href) else {
                continue;
            };
            let full = percent_encoding::percent_decode_str(href.path().trim_end_matches('/'))
                .decode_utf8_lossy()
                .into_owned();
            let own_decoded = percent_encoding::percent_decode_str(&own)
                .decode_utf8_lossy()
                .into_owned();
            if full == own_decoded {
                continue;
            }
            let Some(name) = full.rsplit('/').next().filter(|n| !n.is_empty()) else {
                continue;
            };
            if !e.collection && name.contains(PARTIAL) != partial {
                continue;
            }
            let Ok(p) = Path::parse(format!("{dir}/{name}").trim_start_matches('/')) else {
                continue;
            };
            if e.collection {
                folders.push(p);
            } else {
                files.push(ObjectMeta {
                    location: p,
                    last_modified: e.modified.unwrap_or_default(),
                    size: e.size,
                    e_tag: e.etag,
                    version: None,
                });
            }
        }
        Ok((files, folders))
    }

    /// The files and subfolders of `dir` (the temporary files instead when `partial`); none when
    /// it does not exist.
    async fn listing(
        &self,
        dir: &Path,
        partial: bool,
    ) -> object_store::Result<(Vec<ObjectMeta>, Vec<Path>)> {
        match self.propfind(dir, partial).await {
            Err(object_store::Error::NotFound { .. }) => Ok((Vec::new(), Vec::new())),
            other => other,
        }
    }

    async fn head(&self, path: &Path) -> object_store::Result<ObjectMeta> {
        let url = self.url(path, false);
        let r = self
            .send(|| self.request(Method::HEAD, url.clone()))
            .await?;
        if !r.status().is_success() {
            return Err(status_error("HEAD", path.as_ref(), r.status()));
        }
        Ok(meta_of(path, &r, None))
    }
}

fn meta_of(path: &Path, r: &Response, size: Option<u64>) -> ObjectMeta {
    let h = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok());
    ObjectMeta {
        location: path.clone(),
        last_modified: h("last-modified")
            .and_then(|v| DateTime::parse_from_rfc2822(v).ok())
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default(),
        size: size
            .or_else(|| h("content-length").and_then(|v| v.parse().ok()))
            .unwrap_or(0),
        e_tag: h("etag").map(str::to_string),
        version: None,
    }
}

/// One `<response>` of a PROPFIND answer.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct DavEntry {
    pub href: String,
    pub collection: bool,
    pub size: u64,
    pub modified: Option<DateTime<Utc>>,
    pub etag: Option<String>,
}

/// The entries of a `207 Multi-Status` body, whatever namespace prefixes the server uses.
pub(crate) fn parse_multistatus(xml: &str) -> object_store::Result<Vec<DavEntry>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    let mut cur: Option<DavEntry> = None;
    let mut field = String::new();
    let mut text = String::new();
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| generic(format!("bad PROPFIND answer: {e}")))?;
        match ev {
            Event::Start(s) | Event::Empty(s) => {
                let name = String::from_utf8_lossy(s.local_name().as_ref()).to_string();
                match name.as_str() {
                    "response" => cur = Some(DavEntry::default()),
                    "collection" => {
                        if let Some(c) = cur.as_mut() {
                            c.collection = true;
                        }
                    }
                    _ => {}
                }
                field = name;
                text.clear();
            }
            Event::Text(t) => text.push_str(&t.decode().unwrap_or_default()),
            Event::CData(t) => text.push_str(&String::from_utf8_lossy(&t)),
            Event::GeneralRef(r) => {
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    text.push(c);
                } else {
                    let name = r.decode().unwrap_or_default();
                    text.push_str(match name.as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "",
                    });
                }
            }
            Event::End(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).to_string();
                if let Some(c) = cur.as_mut() {
                    let v = text.trim();
                    match name.as_str() {
                        "href" if c.href.is_empty() => c.href = v.to_string(),
                        "getcontentlength" => c.size = v.parse().unwrap_or(0),
                        "getlastmodified" => {
                            c.modified = DateTime::parse_from_rfc2822(v)
                                .ok()
                                .map(|d| d.with_timezone(&Utc))
                        }
                        "getetag" if !v.is_empty() => c.etag = Some(v.to_string()),
                        "response" => out.extend(cur.take()),
                        _ => {}
                    }
                }
                let _ = &field;
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

fn range_header(r: &GetRange) -> String {
    match r {
        GetRange::Bounded(b) => format!("bytes={}-{}", b.start, b.end.saturating_sub(1)),
        GetRange::Offset(o) => format!("bytes={o}-"),
        GetRange::Suffix(s) => format!("bytes=-{s}"),
    }
}

/// The byte range a `206` answer holds, from its `Content-Range: bytes A-B/N`.
fn content_range(r: &Response) -> Option<(Range<u64>, u64)> {
    let v = r.headers().get("content-range")?.to_str().ok()?;
    let v = v.strip_prefix("bytes ")?;
    let (range, total) = v.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let a: u64 = a.parse().ok()?;
    let b: u64 = b.parse().ok()?;
    Some((a..b + 1, total.parse().ok()?))
}

#[async_trait]
impl ObjectStore for WebDav {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let overwrite = match opts.mode {
            PutMode::Overwrite => true,
            PutMode::Create => false,
            PutMode::Update(_) => {
                return Err(object_store::Error::NotImplemented {
                    operation: "conditional update".into(),
                    implementer: STORE.into(),
                })
            }
        };
        let inner = &self.inner;
        inner.ensure_parents(location).await?;
        let tmp = partial_name(location);
        let url = inner.url(&tmp, false);
        let body = Bytes::from(payload);
        let r = inner
            .send(|| inner.request(Method::PUT, url.clone()).body(body.clone()))
            .await?;
        if !r.status().is_success() {
            return Err(status_error("PUT", location.as_ref(), r.status()));
        }
        inner.publish(&tmp, location, overwrite).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.clone();
        inner.ensure_parents(location).await?;
        let tmp = partial_name(location);
        let (tx, rx) = futures::channel::mpsc::channel::<Chunk>(0);
        let body = rx.map(|(bytes, done)| {
            let _ = done.send(());
            Ok::<Bytes, std::io::Error>(bytes)
        });
        let req = inner
            .request(Method::PUT, inner.url(&tmp, false))
            .body(reqwest::Body::wrap_stream(body));
        let tmp_shown = location.to_string();
        let put = tokio::spawn(async move {
            let r = req
                .send()
                .await
                .map_err(|e| generic(crate::redact::error_chain(&e)))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(status_error("PUT", &tmp_shown, r.status()))
            }
        });
        Ok(Box::new(DavUpload {
            inner,
            location: location.clone(),
            tmp,
            parts: Arc::new(tokio::sync::Mutex::new(Some(tx))),
            order: Arc::new(Mutex::new(Vec::new())),
            put: Some(put),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        refuse_conditions(&options, STORE)?;
        let inner = &self.inner;
        if options.head {
            return Ok(head_result(inner.head(location).await?));
        }
        let url = inner.url(location, false);
        let range = options.range.clone();
        let r = inner
            .send(|| {
                let mut req = inner.request(Method::GET, url.clone());
                if let Some(r) = &range {
                    req = req.header("Range", range_header(r));
                }
                req
            })
            .await?;
        let status = r.status();
        let (range, meta) = match status {
            StatusCode::OK => {
                let meta = meta_of(location, &r, None);
                if range.is_some() {
                    return Err(generic(format!(
                        "GET {location}: the server ignored the byte range asked for"
                    )));
                }
                (0..meta.size, meta)
            }
            StatusCode::PARTIAL_CONTENT => {
                let (range, total) = content_range(&r).ok_or_else(|| {
                    generic(format!("GET {location}: 206 without a Content-Range"))
                })?;
                (range, meta_of(location, &r, Some(total)))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(generic(format!(
                    "GET {location}: range not satisfiable (HTTP status code: 416)"
                )))
            }
            s => return Err(status_error("GET", location.as_ref(), s)),
        };
        let stream = r
            .bytes_stream()
            .map_err(|e| generic(crate::redact::error_chain(&e)))
            .boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream),
            meta,
            range,
            attributes: Default::default(),
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = self.inner.clone();
        locations
            .map(move |p| {
                let inner = inner.clone();
                async move {
                    let p = p?;
                    inner.delete(&p).await?;
                    Ok(p)
                }
            })
            .buffered(8)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let inner = self.inner.clone();
        walk(prefix, move |dir| {
            let inner = inner.clone();
            async move { inner.listing(&dir, false).await }
        })
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let dir = prefix.cloned().unwrap_or_default();
        let (objects, common_prefixes) = self.inner.listing(&dir, false).await?;
        Ok(ListResult {
            common_prefixes,
            objects,
            extensions: Default::default(),
        })
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let overwrite = matches!(options.mode, CopyMode::Overwrite);
        self.inner.transfer(b"COPY", from, to, overwrite).await
    }
}

impl Temporaries for WebDav {
    fn temporaries(&self) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let inner = self.inner.clone();
        walk(None, move |dir| {
            let inner = inner.clone();
            async move { inner.listing(&dir, true).await }
        })
    }
}

/// One part for the streamed PUT, and who to tell when the request has taken it.
type Chunk = (Bytes, futures::channel::oneshot::Sender<()>);

/// A multipart upload: parts stream, in order, into one PUT of the temporary name.
struct DavUpload {
    inner: Arc<Inner>,
    location: Path,
    tmp: Path,
    parts: Arc<tokio::sync::Mutex<Option<futures::channel::mpsc::Sender<Chunk>>>>,
    /// The turn of each part: a part is sent after the one before it.
    order: Arc<Mutex<Vec<futures::channel::oneshot::Receiver<()>>>>,
    put: Option<tokio::task::JoinHandle<object_store::Result<()>>>,
}

impl fmt::Debug for DavUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DavUpload({})", self.location)
    }
}

#[async_trait]
impl MultipartUpload for DavUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        // Parts may be awaited in any order, but the body must carry them in the order given:
        // each part waits for the previous one to be handed to the request.
        let previous = self.order.lock().unwrap().pop();
        let (turn_tx, turn_rx) = futures::channel::oneshot::channel();
        self.order.lock().unwrap().push(turn_rx);
        let parts = self.parts.clone();
        let bytes = Bytes::from(data);
        // Spawned, so that it runs even while the caller awaits a later part first.
        let task = tokio::spawn(async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
            let (done_tx, done_rx) = futures::channel::oneshot::channel();
            let sent = {
                let mut guard = parts.lock().await;
                match guard.as_mut() {
                    Some(tx) => tx.send((bytes, done_tx)).await.is_ok(),
                    None => false,
                }
            };
            let _ = turn_tx.send(());
            if !sent || done_rx.await.is_err() {
                return Err(generic("the WebDAV upload request ended early"));
            }
            Ok(())
        });
        Box::pin(async move { task.await.map_err(generic)? })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let last = self.order.lock().unwrap().pop();
        if let Some(p) = last {
            let _ = p.await;
        }
        self.parts.lock().await.take();
        let put = self
            .put
            .take()
            .ok_or_else(|| generic("upload already finished"))?;
        let r = put.await.map_err(generic)?;
        if let Err(e) = r {
            let _ = self.inner.delete(&self.tmp).await;
            return Err(e);
        }
        self.inner.publish(&self.tmp, &self.location, false).await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.parts.lock().await.take();
        if let Some(put) = self.put.take() {
            put.abort();
            let _ = put.await;
        }
        // The server may still hold the cut-off upload for a moment (423 Locked): try a few
        // times; a leftover temporary is hidden from listings and harmless.
        for _ in 0..20 {
            match self.inner.delete(&self.tmp).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) if e.to_string().contains("status code: 423") => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(e) => return Err(e),
            }
        }
        tracing::warn!(
            "could not delete the temporary {} of an aborted upload; it is hidden from listings and may be deleted by hand",
            self.tmp
        );
        Ok(())
    }
}

impl Drop for DavUpload {
    fn drop(&mut self) {
        // Dropped without complete: the request ends without its last chunk, so the server
        // discards or keeps a partial *temporary*; the key itself never appears.
        if let Some(put) = self.put.take() {
            put.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multistatus_with_any_prefix() {
        let xml = r#"<?xml version="1.0"?><d:multistatus xmlns:d="DAV:"><d:response><d:href>/dav/store/</d:href><d:propstat><d:prop><d:resourcetype><d:collection/></d:resourcetype></d:prop></d:propstat></d:response><d:response><d:href>/dav/store/a%20b&amp;c</d:href><d:propstat><d:prop><d:resourcetype/><d:getcontentlength>42</d:getcontentlength><d:getlastmodified>Tue, 15 Nov 1994 08:12:31 GMT</d:getlastmodified><d:getetag>"e1"</d:getetag></d:prop></d:propstat></d:response></d:multistatus>"#;
        let e = parse_multistatus(xml).unwrap();
        assert_eq!(e.len(), 2);
        assert!(e[0].collection);
        assert_eq!(e[1].href, "/dav/store/a%20b&c");
        assert_eq!(e[1].size, 42);
        assert_eq!(e[1].etag.as_deref(), Some("\"e1\""));
        assert_eq!(
            e[1].modified.unwrap().to_rfc3339(),
            "1994-11-15T08:12:31+00:00"
        );
    }
}
