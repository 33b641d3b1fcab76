//! An S3 server in this test process: s3s-fs (a real S3 implementation over a directory, which checks
//! SigV4 signatures: a wrong secret gets 403) behind a thin layer that records every request and can
//! misbehave on purpose (stall part uploads, ignore or reject conditional writes).
//!
//! Part of the shared test helpers (`tests/common/`), used by tests/cloud.rs as `common::s3`
//! ([`super::s3_storage`] makes the `[storage]` config for it). It uses nothing from the rest of the
//! tree, and must stay that way: examples/bench_storage.rs compiles this file on its own (by path).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

pub const ACCESS_KEY: &str = "AKIAIMMICHBACKUPTEST";
pub const SECRET_KEY: &str = "immich-backup-test-secret/Kx7PqZ2wQ9rT4vY8mN3bL6";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub status: u16,
}

impl Seen {
    /// A part upload (`PUT …?partNumber=N&uploadId=…`).
    pub fn is_part(&self) -> bool {
        self.method == "PUT" && self.target.contains("partNumber=")
    }
    /// A plain object write (not a part).
    pub fn is_put_object(&self) -> bool {
        self.method == "PUT" && !self.target.contains("partNumber=") && !self.target.contains('?')
    }
    /// Completing a multipart upload.
    pub fn is_complete(&self) -> bool {
        self.method == "POST" && self.target.contains("uploadId=")
    }
}

/// What the layer in front of s3s does.
#[derive(Default)]
pub struct Behaviour {
    /// Hold part uploads of `data/` objects forever (until the client goes away).
    pub stall_data_parts: AtomicBool,
    /// Part uploads held so far.
    pub stalled: AtomicUsize,
    /// Act like a server that ignores `If-None-Match` (create-only writes overwrite).
    pub ignore_if_none_match: AtomicBool,
    /// Act like a server that rejects `If-None-Match` with 501 NotImplemented.
    pub reject_if_none_match: AtomicBool,
    /// Answer every write of a `data/` object with 503 SlowDown.
    pub fail_data_puts: AtomicBool,
    /// Part uploads running right now, and the most at once.
    pub parts_now: AtomicUsize,
    pub parts_max: AtomicUsize,
    /// Answer each plain write of a `data/` object this many milliseconds late (a far server).
    pub data_put_delay_ms: std::sync::atomic::AtomicU64,
    /// Plain writes of `data/` objects running right now, and the most at once.
    pub puts_now: AtomicUsize,
    pub puts_max: AtomicUsize,
}

pub struct S3Server {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub log: Arc<Mutex<Vec<Seen>>>,
    pub behaviour: Arc<Behaviour>,
    serving: Arc<Mutex<Serving>>,
    service: s3s::service::S3Service,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

/// The accept loop and the connections it serves, so that an outage can stop them all.
#[derive(Default)]
struct Serving {
    tasks: Vec<tokio::task::AbortHandle>,
}

impl S3Server {
    /// Start on 127.0.0.1:<free port> with `buckets` created.
    pub fn start(buckets: &[&str]) -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("s3s-fs-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).unwrap();
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Behaviour::default());
        let fs = s3s_fs::FileSystem::new(&root).unwrap();
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = S3Server {
            addr,
            root,
            log,
            behaviour,
            serving: Arc::new(Mutex::new(Serving::default())),
            service,
            runtime: Some(runtime),
            _dir: dir,
        };
        server.serve(listener);
        server
    }

    /// Accept and serve connections on `listener` until an [`S3Server::outage`].
    fn serve(&self, listener: TcpListener) {
        let (log2, beh2, root2, service) = (
            self.log.clone(),
            self.behaviour.clone(),
            self.root.clone(),
            self.service.clone(),
        );
        let serving = self.serving.clone();
        let accept =
            self.runtime.as_ref().unwrap().spawn(async move {
                loop {
                    let Ok((socket, _)) = listener.accept().await else {
                        continue;
                    };
                    let (service, log, beh, root) =
                        (service.clone(), log2.clone(), beh2.clone(), root2.clone());
                    let conn = tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let (service, log, beh, root) =
                                (service.clone(), log.clone(), beh.clone(), root.clone());
                            async move {
                                Ok::<_, Infallible>(handle(service, log, beh, root, req).await)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(socket), svc)
                            .await;
                    });
                    serving.lock().unwrap().tasks.push(conn.abort_handle());
                }
            });
        self.serving
            .lock()
            .unwrap()
            .tasks
            .push(accept.abort_handle());
    }

    /// The server goes away for `down`, as a dropped link or a restarting server does: its port is
    /// closed (new connections are refused) and every open connection is cut mid-request; then it
    /// listens on the same port again.
    pub fn outage(&self, down: Duration) {
        for t in self.serving.lock().unwrap().tasks.drain(..) {
            t.abort();
        }
        std::thread::sleep(down);
        let rt = self.runtime.as_ref().unwrap();
        let listener = rt.block_on(TcpListener::bind(self.addr)).unwrap();
        self.serve(listener);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Files under a bucket's prefix, as keys.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let base = self.root.join(bucket);
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(base.join(prefix))
            .into_iter()
            .flatten()
        {
            if e.file_type().is_file() {
                let rel = e
                    .path()
                    .strip_prefix(&base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push(rel);
            }
        }
        out.sort();
        out
    }

    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn xml_error(status: StatusCode, code: &str, message: &str) -> Response<s3s::Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(s3s::Body::from(body))
        .unwrap()
}

async fn handle(
    service: s3s::service::S3Service,
    log: Arc<Mutex<Vec<Seen>>>,
    beh: Arc<Behaviour>,
    root: PathBuf,
    req: Request<Incoming>,
) -> Response<s3s::Body> {
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let is_part = method == "PUT" && target.contains("partNumber=");
    let conditional = req.headers().contains_key("if-none-match");
    let record = |status: u16| {
        log.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            status,
        })
    };
    // Real S3 answers any request on a bucket that does not exist with 404 NoSuchBucket; s3s-fs
    // 0.14 checks that only for bucket operations (it would create the folder on a PUT).
    let bucket = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    if !bucket.is_empty() && !root.join(decode(bucket)).is_dir() {
        record(404);
        return xml_error(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            "The specified bucket does not exist",
        );
    }
    if is_part && target.contains("/data/") && beh.stall_data_parts.load(Ordering::SeqCst) {
        record(0);
        beh.stalled.fetch_add(1, Ordering::SeqCst);
        // Never answer (the client is killed meanwhile).
        let _keep = req;
        std::future::pending::<()>().await;
        unreachable!();
    }
    if method == "PUT" && target.contains("/data/") && beh.fail_data_puts.load(Ordering::SeqCst) {
        record(503);
        return xml_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            "Please reduce your request rate.",
        );
    }
    if conditional && method == "PUT" && beh.reject_if_none_match.load(Ordering::SeqCst) {
        record(501);
        return xml_error(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "A header you provided implies functionality that is not implemented: If-None-Match",
        );
    }
    if conditional && method == "PUT" && beh.ignore_if_none_match.load(Ordering::SeqCst) {
        // Behave like a server that does not know If-None-Match: the write always goes through.
        let path = req.uri().path().trim_start_matches('/');
        let _ = std::fs::remove_file(root.join(decode(path)));
    }
    if is_part {
        let now = beh.parts_now.fetch_add(1, Ordering::SeqCst) + 1;
        beh.parts_max.fetch_max(now, Ordering::SeqCst);
    }
    let data_put = method == "PUT" && !is_part && target.contains("/data/");
    if data_put {
        let now = beh.puts_now.fetch_add(1, Ordering::SeqCst) + 1;
        beh.puts_max.fetch_max(now, Ordering::SeqCst);
        let delay = beh.data_put_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let resp = hyper::service::Service::call(&service, req).await;
    if is_part {
        beh.parts_now.fetch_sub(1, Ordering::SeqCst);
    }
    if data_put {
        beh.puts_now.fetch_sub(1, Ordering::SeqCst);
    }
    match resp {
        Ok(r) => {
            record(r.status().as_u16());
            r
        }
        Err(_) => {
            record(500);
            xml_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "s3s failed",
            )
        }
    }
}

fn decode(path: &str) -> PathBuf {
    PathBuf::from(
        percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned(),
    )
}
