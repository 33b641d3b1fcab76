//! A small local Google Cloud Storage server speaking the parts of the GCS **XML API** that
//! object_store's `GoogleCloudStorage` client uses, over a real directory. Part of the shared test
//! helpers (`tests/common/`), used by tests/cloud.rs as `common::gcs`.
//!
//! No emulator from the registries accepts object_store's XML-API writes (fake-gcs-server answers
//! them with 400 "invalid uploadType"; gcp-storage-emulator fails on everything), so this is the
//! faithful stand-in. It follows Google's XML API documentation for:
//! - `PUT /BUCKET/OBJECT` (object upload), honouring `x-goog-if-generation-match` (`0` = only if
//!   absent → 412 PreconditionFailed otherwise), answering `ETag` and `x-goog-generation`;
//! - XML multipart uploads: `POST ?uploads` (InitiateMultipartUploadResult), `PUT ?partNumber&uploadId`
//!   (ETag per part), `POST ?uploadId` with a CompleteMultipartUpload body (parts checked by number
//!   and ETag, object appears atomically), `DELETE ?uploadId` (abort);
//! - `GET`/`HEAD` of an object with `Range: bytes=…` (206 + Content-Range), `ETag`, `Last-Modified`,
//!   `x-goog-generation`, `Content-Length`;
//! - `GET /BUCKET?list-type=2` (ListBucketResult with `prefix`, `delimiter`, `start-after`,
//!   `max-keys` and continuation tokens; pages are deliberately small so pagination is exercised);
//! - `DELETE /BUCKET/OBJECT`;
//! - errors as GCS sends them: 404 `NoSuchKey` / `NoSuchBucket`, 412 `PreconditionFailed`,
//!   401 `AuthenticationRequired` when the `Authorization: Bearer …` header is missing or wrong
//!   (with an empty expected token, as for `disable_oauth`, no header or an empty bearer passes).
//!
//! It does NOT cover: OAuth2 (service-account JWT → token exchange, the metadata server; tests use a
//! service-account file with `disable_oauth`, or a static bearer token), TLS, the JSON API and
//! resumable uploads (object_store does not use them), object versioning/generation history beyond
//! create-only, storage-class validation, and the real service's throttling (429/503) and retry
//! behaviour.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Keys per list page (GCS allows 1000; small here so that paging is exercised).
const PAGE: usize = 7;

struct State {
    root: PathBuf,
    /// Expected bearer token ("" for `disable_oauth`).
    token: String,
    lock: Mutex<()>,
    next_generation: AtomicU64,
    log: Mutex<Vec<String>>,
}

pub struct FakeGcs {
    pub addr: SocketAddr,
    pub root: PathBuf,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl FakeGcs {
    /// Start on 127.0.0.1:<free port> with `buckets`; requests must carry `Bearer <token>`.
    pub fn start(buckets: &[&str], token: &str) -> FakeGcs {
        let dir = tempfile::Builder::new()
            .prefix("fake-gcs-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        for b in buckets {
            std::fs::create_dir_all(root.join("buckets").join(b)).unwrap();
        }
        std::fs::create_dir_all(root.join("uploads")).unwrap();
        let state = Arc::new(State {
            root: root.clone(),
            token: token.to_string(),
            lock: Mutex::new(()),
            next_generation: AtomicU64::new(1_700_000_000_000_000),
            log: Mutex::new(Vec::new()),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), svc)
                        .await;
                });
            }
        });
        FakeGcs {
            addr,
            root,
            state,
            runtime: Some(runtime),
            _dir: dir,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// "METHOD path?query" of every request so far.
    pub fn seen(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }

    /// Object keys stored in `bucket`.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        list_objects(&self.root.join("buckets").join(bucket))
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// A service-account file for object_store: no OAuth, requests go to this server.
    pub fn service_account_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("fake-gcs-service-account.json");
        let json = serde_json::json!({
            "gcs_base_url": self.base_url(),
            "disable_oauth": true,
            "client_email": "",
            "private_key": "",
            "private_key_id": ""
        });
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn xml(status: StatusCode, body: String) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/xml; charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    xml(
        status,
        format!(
            "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        ),
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn etag_of(data: &[u8]) -> String {
    format!("\"{}\"", &blake3::hash(data).to_hex()[..32])
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Metadata kept next to each object: `<file>.meta` holds "generation etag".
fn meta_path(object: &Path) -> PathBuf {
    let mut p = object.as_os_str().to_owned();
    p.push(".gcs-meta");
    PathBuf::from(p)
}

fn read_meta(object: &Path) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(meta_path(object)).ok()?;
    let (g, e) = text.split_once(' ')?;
    Some((g.parse().ok()?, e.to_string()))
}

fn mtime(path: &Path) -> DateTime<Utc> {
    let t = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::now());
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    DateTime::from_timestamp(d.as_secs() as i64, d.subsec_nanos()).unwrap()
}

/// Every object under `bucket_dir`, sorted by key, with its size.
fn list_objects(bucket_dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(bucket_dir).into_iter().flatten() {
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e
            .path()
            .strip_prefix(bucket_dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel.ends_with(".gcs-meta") || rel.contains(".gcs-tmp-") {
            continue;
        }
        out.push((rel, e.metadata().map(|m| m.len()).unwrap_or(0)));
    }
    out.sort();
    out
}

/// Write `data` as the object at `path` atomically, with a new generation; returns (generation, etag).
fn store_object(st: &State, path: &Path, data: &[u8]) -> std::io::Result<(u64, String)> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    let generation = st.next_generation.fetch_add(1, Ordering::SeqCst);
    let etag = etag_of(data);
    let tmp = path.with_file_name(format!(
        "{}.gcs-tmp-{generation}",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, data)?;
    std::fs::write(meta_path(path), format!("{generation} {etag}"))?;
    std::fs::rename(&tmp, path)?;
    Ok((generation, etag))
}

fn put_result(generation: u64, etag: &str) -> Resp {
    Response::builder()
        .status(StatusCode::OK)
        .header("etag", etag)
        .header("x-goog-generation", generation.to_string())
        .header("x-goog-hash", "crc32c=AAAAAA==")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn handle(st: &State, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    st.log.lock().unwrap().push(format!(
        "{method} {}",
        req.uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default()
    ));

    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string());
    // With `disable_oauth` object_store sends `Bearer ` on writes and no header on reads.
    let authorized = if st.token.is_empty() {
        matches!(auth.as_deref(), None | Some("Bearer"))
    } else {
        auth.as_deref() == Some(format!("Bearer {}", st.token).as_str())
    };
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "AuthenticationRequired",
            "Authentication required.",
        );
    }

    let trimmed = path.trim_start_matches('/');
    let (bucket, object) = match trimmed.split_once('/') {
        Some((b, o)) => (decode(b), Some(decode(o))),
        None => (decode(trimmed), None),
    };
    let bucket_dir = st.root.join("buckets").join(&bucket);
    if bucket.is_empty() || !bucket_dir.is_dir() {
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            "The specified bucket does not exist.",
        );
    }
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "IncompleteBody", "body cut short"),
    };

    let Some(object) = object.filter(|o| !o.is_empty()) else {
        return match method {
            Method::GET => list(&bucket, &bucket_dir, &query),
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "bucket ops",
            ),
        };
    };
    if object
        .split('/')
        .any(|p| p == ".." || p == "." || p.is_empty())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "bad object name",
        );
    }
    let obj_path = bucket_dir.join(&object);

    match (method, query.get("uploadId"), query.contains_key("uploads")) {
        (Method::POST, None, true) => {
            let id = format!("u{}", st.next_generation.fetch_add(1, Ordering::SeqCst));
            let dir = st.root.join("uploads").join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("target"), format!("{bucket}\n{object}")).unwrap();
            xml(
                StatusCode::OK,
                format!(
                    "<?xml version='1.0' encoding='UTF-8'?><InitiateMultipartUploadResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
                    esc(&bucket),
                    esc(&object)
                ),
            )
        }
        (Method::PUT, Some(id), _) => {
            let dir = st.root.join("uploads").join(id);
            let Some(n) = query.get("partNumber").and_then(|n| n.parse::<u32>().ok()) else {
                return error(StatusCode::BAD_REQUEST, "InvalidArgument", "partNumber");
            };
            if !dir.is_dir() || !(1..=10_000).contains(&n) {
                return error(
                    StatusCode::NOT_FOUND,
                    "NoSuchUpload",
                    "The specified upload does not exist.",
                );
            }
            std::fs::write(dir.join(format!("part-{n}")), &body).unwrap();
            Response::builder()
                .status(StatusCode::OK)
                .header("etag", etag_of(&body))
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        (Method::POST, Some(id), _) => complete(st, id, &bucket, &object, &obj_path, &body),
        (Method::DELETE, Some(id), _) => {
            let _ = std::fs::remove_dir_all(st.root.join("uploads").join(id));
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        (Method::PUT, None, _) => {
            let _guard = st.lock.lock().unwrap();
            let current = read_meta(&obj_path).filter(|_| obj_path.is_file());
            if let Some(want) = headers
                .get("x-goog-if-generation-match")
                .and_then(|v| v.to_str().ok())
            {
                let ok = match (want.parse::<u64>(), &current) {
                    (Ok(0), None) => true,
                    (Ok(g), Some((have, _))) => g == *have,
                    _ => false,
                };
                if !ok {
                    return error(
                        StatusCode::PRECONDITION_FAILED,
                        "PreconditionFailed",
                        "At least one of the pre-conditions you specified did not hold.",
                    );
                }
            }
            match store_object(st, &obj_path, &body) {
                Ok((g, e)) => put_result(g, &e),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &e.to_string(),
                ),
            }
        }
        (m @ (Method::GET | Method::HEAD), None, _) => get(&obj_path, m == Method::HEAD, &headers),
        (Method::DELETE, None, _) => {
            let _guard = st.lock.lock().unwrap();
            if !obj_path.is_file() {
                return error(
                    StatusCode::NOT_FOUND,
                    "NoSuchKey",
                    "The specified key does not exist.",
                );
            }
            let _ = std::fs::remove_file(&obj_path);
            let _ = std::fs::remove_file(meta_path(&obj_path));
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "unsupported request",
        ),
    }
}

fn complete(
    st: &State,
    id: &str,
    bucket: &str,
    object: &str,
    obj_path: &Path,
    body: &[u8],
) -> Resp {
    let dir = st.root.join("uploads").join(id);
    let target = std::fs::read_to_string(dir.join("target")).unwrap_or_default();
    if target != format!("{bucket}\n{object}") {
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchUpload",
            "The specified upload does not exist.",
        );
    }
    let text = String::from_utf8_lossy(body);
    // <CompleteMultipartUpload><Part><ETag>"…"</ETag><PartNumber>1</PartNumber></Part>…
    let mut data = Vec::new();
    let mut expected = 1u32;
    for part in text.split("<Part>").skip(1) {
        let field = |name: &str| -> Option<String> {
            let a = part.find(&format!("<{name}>"))? + name.len() + 2;
            let b = part[a..].find(&format!("</{name}>"))? + a;
            Some(part[a..b].replace("&quot;", "\""))
        };
        let (Some(etag), Some(n)) = (
            field("ETag"),
            field("PartNumber").and_then(|n| n.parse::<u32>().ok()),
        ) else {
            return error(
                StatusCode::BAD_REQUEST,
                "MalformedXML",
                "part without ETag or PartNumber",
            );
        };
        if n != expected {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidPartOrder",
                "parts must be listed in ascending order",
            );
        }
        expected += 1;
        let Ok(bytes) = std::fs::read(dir.join(format!("part-{n}"))) else {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidPart",
                "a listed part was not uploaded",
            );
        };
        if etag_of(&bytes) != etag {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidPart",
                "a part's ETag does not match",
            );
        }
        data.extend_from_slice(&bytes);
    }
    if expected == 1 {
        return error(StatusCode::BAD_REQUEST, "MalformedXML", "no parts");
    }
    let _guard = st.lock.lock().unwrap();
    match store_object(st, obj_path, &data) {
        Ok((g, etag)) => {
            let _ = std::fs::remove_dir_all(&dir);
            Response::builder()
                .status(StatusCode::OK)
                .header("x-goog-generation", g.to_string())
                .header("content-type", "application/xml; charset=UTF-8")
                .body(Full::new(Bytes::from(format!(
                    "<?xml version='1.0' encoding='UTF-8'?><CompleteMultipartUploadResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'><Location>/{}/{}</Location><Bucket>{}</Bucket><Key>{}</Key><ETag>{}</ETag></CompleteMultipartUploadResult>",
                    esc(bucket), esc(object), esc(bucket), esc(object), esc(&etag)
                ))))
                .unwrap()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &e.to_string(),
        ),
    }
}

fn get(obj_path: &Path, head: bool, headers: &hyper::HeaderMap) -> Resp {
    let Ok(data) = std::fs::read(obj_path) else {
        return error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    let (generation, etag) = read_meta(obj_path).unwrap_or((1, etag_of(&data)));
    let len = data.len() as u64;
    let modified = mtime(obj_path)
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let mut b = Response::builder()
        .header("etag", &etag)
        .header("last-modified", modified)
        .header("x-goog-generation", generation.to_string())
        .header("x-goog-stored-content-length", len.to_string())
        .header("content-type", "application/octet-stream")
        .header("accept-ranges", "bytes");
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .map(str::to_string);
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(r) => {
            let (a, z) = r.split_once('-').unwrap_or((&r, ""));
            let (s, e) = match (a.parse::<u64>().ok(), z.parse::<u64>().ok()) {
                (Some(s), Some(e)) => (s, (e + 1).min(len)),
                (Some(s), None) => (s, len),
                (None, Some(n)) => (len.saturating_sub(n), len),
                (None, None) => return error(StatusCode::BAD_REQUEST, "InvalidRange", "bad range"),
            };
            if s >= len || s >= e {
                return error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "InvalidRange",
                    "The requested range cannot be satisfied.",
                );
            }
            b = b.header("content-range", format!("bytes {s}-{}/{len}", e - 1));
            (StatusCode::PARTIAL_CONTENT, s, e)
        }
    };
    b = b
        .status(status)
        .header("content-length", (end - start).to_string());
    let body = if head {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&data[start as usize..end as usize])
    };
    b.body(Full::new(body)).unwrap()
}

fn list(bucket: &str, bucket_dir: &Path, q: &BTreeMap<String, String>) -> Resp {
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let delimiter = q.get("delimiter").cloned().filter(|d| !d.is_empty());
    let after = q
        .get("continuation-token")
        .or_else(|| q.get("start-after"))
        .cloned()
        .unwrap_or_default();
    let max = q
        .get("max-keys")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(PAGE)
        .clamp(1, PAGE);
    // Entries in key order: objects, or common prefixes when a delimiter folds them.
    let mut entries: Vec<(String, Option<(u64, PathBuf)>)> = Vec::new();
    for (key, size) in list_objects(bucket_dir) {
        if !key.starts_with(&prefix) {
            continue;
        }
        if let Some(d) = &delimiter {
            if let Some(i) = key[prefix.len()..].find(d.as_str()) {
                let cp = key[..prefix.len() + i + d.len()].to_string();
                if entries.last().map(|(k, _)| k != &cp).unwrap_or(true) {
                    entries.push((cp, None));
                }
                continue;
            }
        }
        let path = bucket_dir.join(&key);
        entries.push((key, Some((size, path))));
    }
    let rest: Vec<_> = entries.into_iter().filter(|(k, _)| *k > after).collect();
    let truncated = rest.len() > max;
    let page = &rest[..rest.len().min(max)];
    let mut out = format!(
        "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult xmlns='http://doc.s3.amazonaws.com/2006-03-01'><Name>{}</Name><Prefix>{}</Prefix><KeyCount>{}</KeyCount><MaxKeys>{max}</MaxKeys><IsTruncated>{truncated}</IsTruncated>",
        esc(bucket),
        esc(&prefix),
        page.len()
    );
    for (key, obj) in page {
        match obj {
            Some((size, path)) => {
                let etag = read_meta(path).map(|(_, e)| e).unwrap_or_default();
                out.push_str(&format!(
                    "<Contents><Key>{}</Key><Generation>1</Generation><LastModified>{}</LastModified><ETag>{}</ETag><Size>{size}</Size></Contents>",
                    esc(key),
                    mtime(path).format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                    esc(&etag)
                ));
            }
            None => out.push_str(&format!(
                "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
                esc(key)
            )),
        }
    }
    if truncated {
        out.push_str(&format!(
            "<NextContinuationToken>{}</NextContinuationToken>",
            esc(&page.last().unwrap().0)
        ));
    }
    out.push_str("</ListBucketResult>");
    xml(StatusCode::OK, out)
}
