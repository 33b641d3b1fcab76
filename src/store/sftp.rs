//! SFTP stores (`sftp://user@host[:port]/path`: Hetzner Storage Box, rsync.net, a NAS with OpenSSH),
//! as object_store's trait over one SSH connection (russh + russh-sftp, pure Rust), so they sit
//! behind [`crate::store::meter`] like every cloud backend.
//!
//! The server's host key is checked before anything is sent: against `[storage] ssh_host_key` when
//! pinned, else the known_hosts file (`[storage] known_hosts_file`, default `~/.ssh/known_hosts`,
//! hashed and `[host]:port` entries as OpenSSH writes them). An unknown or changed key is refused
//! with its fingerprint; nothing accepts an unknown key. Logging in tries `[storage] ssh_key_file`
//! (or, without one, the keys of ssh-agent), then `[storage] password`.
//!
//! Writes keep the format's promises as WebDAV's do ([`crate::store::webdav`]): every object is
//! written to `NAME.immich-backup-partial-RANDOM` in its folder (created exclusively), synced
//! (`fsync@openssh.com`), then renamed onto its key with plain SSH_FXP_RENAME, which never replaces
//! an existing file (OpenSSH's sftp-server links the new name, then unlinks the old: a second
//! writer of the key gets a failure, reported as AlreadyExists). Replacing writes use
//! `posix-rename@openssh.com`. A multipart upload writes each part at its offset in the temporary
//! file as it comes (several parts at once), and only `complete` renames it, so a killed upload
//! never shows under its key; listings hide temporary names, and `prune` deletes the ones a killed
//! upload left (`store/partial.rs`).
//!
//! Requests are pipelined: one SFTP session carries many reads and writes at once (each object's
//! data in chunks of up to 255 KiB, 16 in flight), so a long round trip does not bound throughput.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use russh::client;
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};

use crate::config::StorageConfig;
use crate::error::{Error, Result};
use crate::store::partial::{
    head_result, partial_name, put_result, refuse_conditions, walk, Temporaries, PARTIAL,
};

/// The store name in object_store errors (its generic errors are our own one-line messages).
pub(crate) const STORE: &str = "SFTP";
/// Largest chunk of one read or write request (OpenSSH's limit is 256 KiB a message).
const MAX_CHUNK: u64 = 255 * 1024;
/// Chunk size without the `limits@openssh.com` extension: every server takes 32 KiB.
const SAFE_CHUNK: u64 = 32 * 1024;
/// Read or write requests of one object in flight at once.
const IN_FLIGHT: usize = 16;

/// Whether `scheme` names an SFTP store.
pub fn is_sftp(scheme: &str) -> bool {
    scheme == "sftp"
}

/// One folder on an SFTP server as an object store.
#[derive(Clone)]
pub struct Sftp {
    inner: Arc<Inner>,
}

/// How the server's host key is checked.
#[derive(Clone)]
enum HostKey {
    Pinned(Box<PublicKey>),
    KnownHosts(PathBuf),
}

struct Inner {
    host: String,
    port: u16,
    user: String,
    /// The store's folder on the server, without a trailing `/` (relative: under the login folder).
    base: String,
    key_file: Option<PathBuf>,
    passphrase: String,
    password: String,
    host_key: HostKey,
    request_timeout: u64,
    max_retries: usize,
    retry_timeout: Duration,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// Folders known to exist (created or seen), relative to `base`.
    folders: tokio::sync::Mutex<HashSet<String>>,
}

/// One SSH connection with its SFTP session.
struct Conn {
    ssh: client::Handle<Checker>,
    sftp: RawSftpSession,
    posix_rename: bool,
    fsync: bool,
    statvfs: bool,
    chunk: u64,
}

impl fmt::Debug for Sftp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sftp({})", self.inner.shown())
    }
}

impl fmt::Display for Sftp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SFTP at {}", self.inner.shown())
    }
}

/// The SFTP store of `[storage]` and its URL. Nothing is sent until the first request.
pub fn build(cfg: &StorageConfig, url: &url::Url, shown: &str) -> Result<Sftp> {
    let bad = |why: &str| Error::Config(format!("[storage] url {shown}: {why}"));
    if url.password().is_some() {
        return Err(bad("put the SFTP password in [storage] password (or IMMICH_BACKUP__STORAGE__PASSWORD), or better use a key ([storage] ssh_key_file), not in the URL"));
    }
    let host = url
        .host_str()
        .ok_or_else(|| bad("no host; write sftp://user@host[:port]/path"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let user = if cfg.username.is_empty() {
        percent_encoding::percent_decode_str(url.username())
            .decode_utf8_lossy()
            .into_owned()
    } else {
        cfg.username.clone()
    };
    if user.is_empty() {
        return Err(bad(
            "no user name; write sftp://USER@host/path (or set [storage] username)",
        ));
    }
    let path = percent_encoding::percent_decode_str(url.path())
        .decode_utf8_lossy()
        .into_owned();
    // `sftp://host/~/backup` is relative to the login folder, as in curl; otherwise absolute.
    let base = match path.strip_prefix("/~") {
        Some(rel) => rel.trim_matches('/').to_string(),
        None => format!("/{}", path.trim_matches('/')),
    };
    let host_key = if cfg.ssh_host_key.trim().is_empty() {
        let file = if cfg.known_hosts_file.is_empty() {
            let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).ok_or_else(|| {
                Error::Config("[storage] known_hosts_file is not set and HOME is not set: set known_hosts_file, or pin the server's key with [storage] ssh_host_key".into())
            })?;
            PathBuf::from(home).join(".ssh/known_hosts")
        } else {
            PathBuf::from(&cfg.known_hosts_file)
        };
        HostKey::KnownHosts(file)
    } else {
        let key = PublicKey::from_openssh(cfg.ssh_host_key.trim()).map_err(|e| {
            Error::Config(format!(
                "[storage] ssh_host_key: {e}; write the server's public key as `ssh-keyscan` prints it after the host name, e.g. \"ssh-ed25519 AAAA…\""
            ))
        })?;
        HostKey::Pinned(Box::new(key))
    };
    Ok(Sftp {
        inner: Arc::new(Inner {
            port: url.port().unwrap_or(22),
            host,
            user,
            base,
            key_file: (!cfg.ssh_key_file.is_empty()).then(|| PathBuf::from(&cfg.ssh_key_file)),
            passphrase: cfg.ssh_key_passphrase.clone(),
            password: cfg.password.clone(),
            host_key,
            request_timeout: cfg.request_timeout_secs.max(1),
            max_retries: cfg.max_retries,
            retry_timeout: Duration::from_secs(cfg.retry_timeout_secs),
            conn: tokio::sync::Mutex::new(None),
            folders: tokio::sync::Mutex::new(HashSet::new()),
        }),
    })
}

fn generic(text: impl fmt::Display) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: text.to_string().into(),
    }
}

/// object_store's error for an SFTP failure of `what` on `path`.
fn sftp_error(what: &str, path: &str, e: SftpError) -> object_store::Error {
    match e {
        SftpError::Status(s) => {
            let source = format!("{what} {path}: {} ({})", s.error_message, s.status_code).into();
            match s.status_code {
                StatusCode::NoSuchFile => object_store::Error::NotFound {
                    path: path.into(),
                    source,
                },
                StatusCode::PermissionDenied => object_store::Error::PermissionDenied {
                    path: path.into(),
                    source,
                },
                _ => object_store::Error::Generic {
                    store: STORE,
                    source,
                },
            }
        }
        SftpError::Timeout => generic(format!(
            "{what} {path}: the SFTP server did not answer within [storage] request_timeout_secs"
        )),
        other => generic(format!(
            "{what} {path}: {other} (the SSH connection was lost?)"
        )),
    }
}

fn is_status(e: &SftpError, code: StatusCode) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == code)
}

/// The SSH client's side of the connection: checks the host key, remembering why it refused one.
struct Checker {
    host: String,
    port: u16,
    expect: HostKey,
    refusal: Arc<Mutex<Option<String>>>,
}

impl Checker {
    /// `Ok` when `key` is the server's known key, else the one-line cause and remedy.
    fn verdict(&self, key: &PublicKey) -> std::result::Result<(), String> {
        let (host, port) = (&self.host, self.port);
        let seen = format!(
            "{} {}",
            key.algorithm().as_str(),
            key.fingerprint(HashAlg::Sha256)
        );
        let keyscan = if port == 22 {
            format!("ssh-keyscan {host}")
        } else {
            format!("ssh-keyscan -p {port} {host}")
        };
        match &self.expect {
            HostKey::Pinned(pinned) if pinned.key_data() == key.key_data() => Ok(()),
            HostKey::Pinned(pinned) => Err(format!(
                "host key of {host}:{port} does not match [storage] ssh_host_key: the server presented {seen}, the pinned key is {}; if the server's key really changed (ask its provider for the new fingerprint), set ssh_host_key to the new key (`{keyscan}`), otherwise someone may be intercepting the connection",
                pinned.fingerprint(HashAlg::Sha256)
            )),
            HostKey::KnownHosts(file) => {
                match russh::keys::check_known_hosts_path(host, port, key, file) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "unknown host key: {host}:{port} is not in {} (the server presented {seen}); check that fingerprint with the server's provider, then add it with `{keyscan} >> {}`, or pin it with [storage] ssh_host_key",
                        file.display(),
                        file.display()
                    )),
                    Err(russh::keys::Error::KeyChanged { line }) => Err(format!(
                        "host key of {host}:{port} CHANGED: {} line {line} has another key, the server now presents {seen}; if the provider confirms the change, remove the old line (`ssh-keygen -R '{}' -f {}`) and add the new key (`{keyscan} >> {}`), otherwise someone may be intercepting the connection",
                        file.display(),
                        if port == 22 { host.to_string() } else { format!("[{host}]:{port}") },
                        file.display(),
                        file.display()
                    )),
                    Err(e) => Err(format!(
                        "cannot check the host key of {host}:{port} in {}: {e}; fix the file ([storage] known_hosts_file), or pin the key with [storage] ssh_host_key",
                        file.display()
                    )),
                }
            }
        }
    }

    /// The known key algorithms for this host: offered first, so the server shows a key we know.
    fn known_algorithms(&self) -> Vec<russh::keys::Algorithm> {
        match &self.expect {
            HostKey::Pinned(k) => vec![k.algorithm()],
            HostKey::KnownHosts(file) => {
                russh::keys::known_hosts::known_host_keys_path(&self.host, self.port, file)
                    .map(|keys| keys.into_iter().map(|(_, k)| k.algorithm()).collect())
                    .unwrap_or_default()
            }
        }
    }
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let verdict = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.verdict(key),
            PublicKeyOrCertificate::Certificate(_) => Err(format!(
                "{}:{} presented a host certificate, which is not supported; pin its plain key with [storage] ssh_host_key",
                self.host, self.port
            )),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                *self.refusal.lock().unwrap() = Some(why);
                Ok(false)
            }
        }
    }
}

/// Whether two key algorithms are the same family (RSA keys sign with any of three hashes).
fn same_family(a: &russh::keys::Algorithm, b: &russh::keys::Algorithm) -> bool {
    use russh::keys::Algorithm::Rsa;
    matches!((a, b), (Rsa { .. }, Rsa { .. })) || a == b
}

impl Inner {
    fn shown(&self) -> String {
        format!("sftp://{}@{}:{}{}", self.user, self.host, self.port, {
            if self.base.starts_with('/') {
                self.base.clone()
            } else {
                format!("/~/{}", self.base)
            }
        })
    }

    /// The server path of `path` (the store's folder for the empty path).
    fn full(&self, path: &Path) -> String {
        match (self.base.as_str(), path.as_ref()) {
            ("", "") => ".".into(),
            (b, "") => b.into(),
            ("", p) => p.into(),
            ("/", p) => format!("/{p}"),
            (b, p) => format!("{b}/{p}"),
        }
    }

    /// The connection, made (again) when there is none or it was lost.
    async fn conn(&self) -> object_store::Result<Arc<Conn>> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.ssh.is_closed()) {
            return Ok(c.clone());
        }
        let start = Instant::now();
        let mut wait = Duration::from_millis(200);
        let mut tries = 0;
        let conn = loop {
            match self.connect().await {
                Ok(c) => break c,
                Err((e, retry)) => {
                    if !retry
                        || tries >= self.max_retries
                        || start.elapsed() + wait > self.retry_timeout
                    {
                        return Err(e);
                    }
                }
            }
            tries += 1;
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(15));
        };
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Connect, check the host key, log in and start SFTP; the error says whether to retry.
    async fn connect(&self) -> std::result::Result<Conn, (object_store::Error, bool)> {
        let (host, port) = (&self.host, self.port);
        let refusal = Arc::new(Mutex::new(None));
        let checker = Checker {
            host: host.clone(),
            port,
            expect: self.host_key.clone(),
            refusal: refusal.clone(),
        };
        let mut config = client::Config {
            window_size: 16 * 1024 * 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            nodelay: true,
            ..Default::default()
        };
        let known = checker.known_algorithms();
        if !known.is_empty() {
            let mut key: Vec<_> = config.preferred.key.to_vec();
            key.sort_by_key(|a| !known.iter().any(|k| same_family(a, k)));
            config.preferred.key = key.into();
        }
        let connecting = client::connect(Arc::new(config), (host.as_str(), port), checker);
        let ssh = match tokio::time::timeout(Duration::from_secs(30), connecting).await {
            Err(_) => {
                return Err((generic(format!(
                    "cannot connect to {host}:{port}: no answer in 30 s; check the host name and port in [storage] url (a Hetzner Storage Box listens on port 23), and that a firewall lets the connection through"
                )), true))
            }
            Ok(Ok(ssh)) => ssh,
            Ok(Err(e)) => {
                if let Some(why) = refusal.lock().unwrap().take() {
                    return Err((generic(why), false));
                }
                let retry = matches!(e, russh::Error::IO(_) | russh::Error::ConnectionTimeout);
                return Err((generic(format!(
                    "cannot connect to {host}:{port}: {}; check the host name and port in [storage] url (a Hetzner Storage Box listens on port 23), and that the server is reachable",
                    crate::redact::error_chain(&e)
                )), retry));
            }
        };
        let mut ssh = ssh;
        self.login(&mut ssh).await.map_err(|e| (e, false))?;
        let lost = |e: russh::Error| {
            (
                generic(format!(
                    "{host}:{port}: could not start SFTP: {e}; the account must allow SFTP (not only a shell)"
                )),
                false,
            )
        };
        let channel = ssh.channel_open_session().await.map_err(lost)?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(lost)?;
        let cfg = russh_sftp::client::Config {
            request_timeout_secs: self.request_timeout,
            max_packet_len: 264 * 1024,
            ..Default::default()
        };
        let mut sftp = RawSftpSession::new_with_config(channel.into_stream(), cfg);
        let version = sftp
            .init()
            .await
            .map_err(|e| (sftp_error("starting SFTP on", host, e), false))?;
        let has = |name: &str| version.extensions.contains_key(name);
        let mut chunk = SAFE_CHUNK;
        if has("limits@openssh.com") {
            if let Ok(l) = sftp.limits().await {
                let limits = russh_sftp::client::rawsession::Limits::from(l);
                chunk = [limits.read_len, limits.write_len]
                    .into_iter()
                    .flatten()
                    .chain([MAX_CHUNK])
                    .min()
                    .unwrap_or(SAFE_CHUNK)
                    .max(1024);
                sftp.set_limits(limits);
            }
        }
        Ok(Conn {
            posix_rename: has("posix-rename@openssh.com"),
            fsync: has("fsync@openssh.com"),
            statvfs: has("statvfs@openssh.com"),
            chunk,
            ssh,
            sftp,
        })
    }

    /// Log in: the key file (or ssh-agent's keys), then the password.
    async fn login(&self, ssh: &mut client::Handle<Checker>) -> object_store::Result<()> {
        let user = self.user.as_str();
        let denied = |why: String| object_store::Error::Unauthenticated {
            path: String::new(),
            source: why.into(),
        };
        let failed = |e: russh::Error| generic(format!("logging in: {e}"));
        let mut tried = Vec::new();
        if let Some(file) = &self.key_file {
            let passphrase = (!self.passphrase.is_empty()).then_some(self.passphrase.as_str());
            let key = russh::keys::load_secret_key(file, passphrase).map_err(|e| {
                let why = match e {
                    russh::keys::Error::KeyIsEncrypted => "it is protected by a passphrase: set [storage] ssh_key_passphrase (or IMMICH_BACKUP__STORAGE__SSH_KEY_PASSPHRASE)".to_string(),
                    other => format!("{other} (a wrong ssh_key_passphrase, or not an OpenSSH private key?)"),
                };
                generic(format!("cannot use [storage] ssh_key_file {}: {why}", file.display()))
            })?;
            let hash = ssh.best_supported_rsa_hash().await.ok().flatten().flatten();
            let key = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), hash);
            if ssh
                .authenticate_publickey(user, key)
                .await
                .map_err(failed)?
                .success()
            {
                return Ok(());
            }
            tried.push(format!("the key in {}", file.display()));
        } else if std::env::var_os("SSH_AUTH_SOCK").is_some() {
            if let Ok(mut agent) = russh::keys::agent::client::AgentClient::connect_env().await {
                let ids = agent.request_identities().await.unwrap_or_default();
                let hash = ssh.best_supported_rsa_hash().await.ok().flatten().flatten();
                for id in &ids {
                    let russh::keys::agent::AgentIdentity::PublicKey { key, .. } = id else {
                        continue;
                    };
                    if let Ok(r) = ssh
                        .authenticate_publickey_with(user, key.clone(), hash, &mut agent)
                        .await
                    {
                        if r.success() {
                            return Ok(());
                        }
                    }
                }
                tried.push(format!("ssh-agent's {} key(s)", ids.len()));
            }
        }
        if !self.password.is_empty() {
            if ssh
                .authenticate_password(user, &self.password)
                .await
                .map_err(failed)?
                .success()
            {
                return Ok(());
            }
            tried.push("[storage] password".into());
        }
        if tried.is_empty() {
            return Err(denied(format!(
                "no way to log in as {user}: set [storage] ssh_key_file, run an ssh-agent (SSH_AUTH_SOCK), or set [storage] password"
            )));
        }
        Err(denied(format!(
            "the server refused {} for user {user}",
            tried.join(" and ")
        )))
    }

    /// Make sure the store's folder and the folders above `path` exist.
    async fn ensure_parents(&self, conn: &Conn, path: &Path) -> object_store::Result<()> {
        let parts: Vec<_> = path.parts().collect();
        let mut dir = Path::default();
        let mut known = self.folders.lock().await;
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
            let full = self.full(&dir);
            if let Err(e) = conn
                .sftp
                .mkdir(full.as_str(), FileAttributes::empty())
                .await
            {
                // Already there (OpenSSH answers a plain failure), or a real error.
                match conn.sftp.stat(full.as_str()).await {
                    Ok(a) if a.attrs.is_dir() => {}
                    _ if key.is_empty() && is_status(&e, StatusCode::NoSuchFile) => {
                        return Err(generic(format!(
                            "creating the store's folder {full}: the folder above it does not exist; create it, or correct the path in [storage] url"
                        )))
                    }
                    _ => return Err(sftp_error("creating the folder", &full, e)),
                }
            }
            known.insert(key);
        }
        Ok(())
    }

    /// Write `data` at `offset` of the open file `handle`, in pipelined chunks.
    async fn write_at(
        &self,
        conn: &Conn,
        handle: &str,
        what: &str,
        offset: u64,
        data: Bytes,
    ) -> object_store::Result<()> {
        let chunk = conn.chunk as usize;
        let pieces = (0..data.len()).step_by(chunk.max(1)).map(|at| {
            let piece = data.slice(at..(at + chunk).min(data.len()));
            (offset + at as u64, piece)
        });
        let r = futures::stream::iter(pieces)
            .map(|(at, piece)| conn.sftp.write(handle, at, piece.to_vec()))
            .buffer_unordered(IN_FLIGHT)
            .try_for_each(|_| async { Ok(()) })
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) => Err(self.write_error(conn, what, e).await),
        }
    }

    /// A failed write: "no space left" when the server's disk is full, else the SFTP error.
    async fn write_error(&self, conn: &Conn, what: &str, e: SftpError) -> object_store::Error {
        if conn.statvfs && is_status(&e, StatusCode::Failure) {
            if let Ok(fs) = conn.sftp.statvfs(self.full(&Path::default())).await {
                let free = fs.blocks_avail.saturating_mul(fs.fragment_size.max(1));
                if free < 1024 * 1024 {
                    return generic(format!(
                        "writing {what}: no space left on the SFTP server ({free} bytes free); free space there (or prune old snapshots), or ask the provider for more"
                    ));
                }
            }
        }
        sftp_error("writing", what, e)
    }

    /// Create the temporary file `tmp` (exclusively) and return its handle.
    async fn create(&self, conn: &Conn, tmp: &Path) -> object_store::Result<String> {
        let flags = OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE;
        conn.sftp
            .open(self.full(tmp), flags, FileAttributes::empty())
            .await
            .map(|h| h.handle)
            .map_err(|e| sftp_error("creating", tmp.as_ref(), e))
    }

    /// Sync (when the server can) and close a written file.
    async fn finish(&self, conn: &Conn, handle: &str, what: &str) -> object_store::Result<()> {
        if conn.fsync {
            if let Err(e) = conn.sftp.fsync(handle).await {
                let _ = conn.sftp.close(handle).await;
                return Err(self.write_error(conn, what, e).await);
            }
        }
        conn.sftp
            .close(handle)
            .await
            .map(|_| ())
            .map_err(|e| sftp_error("closing", what, e))
    }

    /// Rename the finished temporary onto its key: never replacing it unless `overwrite`. The
    /// temporary is deleted when this fails.
    async fn publish(
        &self,
        conn: &Conn,
        tmp: &Path,
        location: &Path,
        overwrite: bool,
    ) -> object_store::Result<PutResult> {
        let (from, to) = (self.full(tmp), self.full(location));
        let r = if overwrite && conn.posix_rename {
            let mut data = Vec::new();
            for s in [&from, &to] {
                data.extend((s.len() as u32).to_be_bytes());
                data.extend(s.as_bytes());
            }
            match conn.sftp.extended("posix-rename@openssh.com", data).await {
                Ok(russh_sftp::protocol::Packet::Status(s)) if s.status_code == StatusCode::Ok => {
                    Ok(())
                }
                Ok(russh_sftp::protocol::Packet::Status(s)) => Err(SftpError::Status(s)),
                Ok(_) => Err(SftpError::UnexpectedPacket),
                Err(e) => Err(e),
            }
        } else {
            if overwrite {
                let _ = conn.sftp.remove(to.as_str()).await;
            }
            conn.sftp
                .rename(from.as_str(), to.as_str())
                .await
                .map(|_| ())
        };
        match r {
            Ok(()) => Ok(put_result()),
            Err(e) => {
                let _ = conn.sftp.remove(from.as_str()).await;
                if !overwrite && conn.sftp.lstat(to.as_str()).await.is_ok() {
                    return Err(object_store::Error::AlreadyExists {
                        path: location.to_string(),
                        source: format!("{location} exists (the rename onto it was refused)")
                            .into(),
                    });
                }
                Err(sftp_error("renaming onto", location.as_ref(), e))
            }
        }
    }

    /// The files and folders directly in `dir` (its temporary files instead when `partial`).
    async fn read_dir(
        &self,
        dir: &Path,
        partial: bool,
    ) -> object_store::Result<(Vec<ObjectMeta>, Vec<Path>)> {
        let conn = self.conn().await?;
        let full = self.full(dir);
        let handle = match conn.sftp.opendir(full.as_str()).await {
            Ok(h) => h.handle,
            Err(e) if is_status(&e, StatusCode::NoSuchFile) => return Ok((vec![], vec![])),
            Err(e) => return Err(sftp_error("listing", &full, e)),
        };
        let mut files = Vec::new();
        let mut folders = Vec::new();
        let r = loop {
            match conn.sftp.readdir(handle.as_str()).await {
                Ok(name) => {
                    for f in name.files {
                        let n = f.filename;
                        if n == "." || n == ".." {
                            continue;
                        }
                        let Ok(p) = Path::parse(format!("{dir}/{n}").trim_start_matches('/'))
                        else {
                            continue;
                        };
                        if f.attrs.is_dir() {
                            folders.push(p);
                        } else if f.attrs.is_regular() && n.contains(PARTIAL) == partial {
                            files.push(meta(p, &f.attrs));
                        }
                    }
                }
                Err(e) if is_status(&e, StatusCode::Eof) => break Ok(()),
                Err(e) => break Err(sftp_error("listing", &full, e)),
            }
        };
        let _ = conn.sftp.close(handle).await;
        r.map(|()| (files, folders))
    }
}

fn meta(location: Path, attrs: &FileAttributes) -> ObjectMeta {
    let modified = attrs
        .mtime
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.into()))
        .unwrap_or(UNIX_EPOCH);
    ObjectMeta {
        location,
        last_modified: DateTime::<Utc>::from(modified),
        size: attrs.size.unwrap_or(0),
        e_tag: None,
        version: None,
    }
}

/// Closes an open file when dropped (a download dropped half way, an abandoned upload).
struct OpenFile {
    conn: Arc<Conn>,
    handle: Option<String>,
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        if let (Some(h), Ok(rt)) = (self.handle.take(), tokio::runtime::Handle::try_current()) {
            let conn = self.conn.clone();
            rt.spawn(async move {
                let _ = conn.sftp.close(h).await;
            });
        }
    }
}

/// Read exactly `len` bytes at `offset` (a server may answer a read with fewer).
async fn read_exact(
    conn: &Conn,
    handle: &str,
    what: &str,
    offset: u64,
    len: u64,
) -> object_store::Result<Bytes> {
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let at = offset + out.len() as u64;
        let want = (len - out.len() as u64) as u32;
        match conn.sftp.read(handle, at, want).await {
            Ok(d) if !d.data.is_empty() => out.extend_from_slice(&d.data),
            Ok(_) => return Err(generic(format!("reading {what}: the file ended early"))),
            Err(e) if is_status(&e, StatusCode::Eof) => {
                return Err(generic(format!(
                    "reading {what}: the file ended early (changed while read?)"
                )))
            }
            Err(e) => return Err(sftp_error("reading", what, e)),
        }
    }
    Ok(Bytes::from(out))
}

#[async_trait]
impl ObjectStore for Sftp {
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
        let conn = inner.conn().await?;
        inner.ensure_parents(&conn, location).await?;
        let tmp = partial_name(location);
        let handle = inner.create(&conn, &tmp).await?;
        let what = location.as_ref();
        let written = async {
            inner
                .write_at(&conn, &handle, what, 0, Bytes::from(payload))
                .await?;
            inner.finish(&conn, &handle, what).await
        }
        .await;
        if let Err(e) = written {
            let _ = conn.sftp.close(handle.as_str()).await;
            let _ = conn.sftp.remove(inner.full(&tmp)).await;
            return Err(e);
        }
        inner.publish(&conn, &tmp, location, overwrite).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.clone();
        let conn = inner.conn().await?;
        inner.ensure_parents(&conn, location).await?;
        let tmp = partial_name(location);
        let handle = inner.create(&conn, &tmp).await?;
        Ok(Box::new(SftpUpload {
            inner,
            file: Arc::new(OpenFile {
                conn,
                handle: Some(handle),
            }),
            location: location.clone(),
            tmp,
            offset: 0,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        refuse_conditions(&options, STORE)?;
        let inner = &self.inner;
        let conn = inner.conn().await?;
        let full = inner.full(location);
        if options.head {
            let attrs = conn
                .sftp
                .stat(full.as_str())
                .await
                .map_err(|e| sftp_error("reading", location.as_ref(), e))?
                .attrs;
            return Ok(head_result(meta(location.clone(), &attrs)));
        }
        let handle = conn
            .sftp
            .open(full.as_str(), OpenFlags::READ, FileAttributes::empty())
            .await
            .map_err(|e| sftp_error("reading", location.as_ref(), e))?
            .handle;
        let file = Arc::new(OpenFile {
            conn: conn.clone(),
            handle: Some(handle.clone()),
        });
        let attrs = conn
            .sftp
            .fstat(handle.as_str())
            .await
            .map_err(|e| sftp_error("reading", location.as_ref(), e))?
            .attrs;
        let meta = meta(location.clone(), &attrs);
        let range = match &options.range {
            Some(r) => r
                .as_range(meta.size)
                .map_err(|e| generic(format!("reading {location}: {e} (range not satisfiable)")))?,
            None => 0..meta.size,
        };
        let chunk = conn.chunk;
        let what = location.to_string();
        let (start, end) = (range.start, range.end);
        let pieces = (start..end)
            .step_by(chunk as usize)
            .map(move |at| (at, chunk.min(end - at)));
        let stream = futures::stream::iter(pieces)
            .map(move |(at, len)| {
                let (file, handle, what) = (file.clone(), handle.clone(), what.clone());
                async move { read_exact(&file.conn, &handle, &what, at, len).await }
            })
            .buffered(IN_FLIGHT)
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
                    let conn = inner.conn().await?;
                    conn.sftp
                        .remove(inner.full(&p))
                        .await
                        .map_err(|e| sftp_error("deleting", p.as_ref(), e))?;
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
            async move { inner.read_dir(&dir, false).await }
        })
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let dir = prefix.cloned().unwrap_or_default();
        let (objects, common_prefixes) = self.inner.read_dir(&dir, false).await?;
        Ok(ListResult {
            common_prefixes,
            objects,
            extensions: Default::default(),
        })
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        _to: &Path,
        _options: CopyOptions,
    ) -> object_store::Result<()> {
        Err(object_store::Error::NotImplemented {
            operation: "copy".into(),
            implementer: STORE.into(),
        })
    }
}

impl Temporaries for Sftp {
    fn temporaries(&self) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let inner = self.inner.clone();
        walk(None, move |dir| {
            let inner = inner.clone();
            async move { inner.read_dir(&dir, true).await }
        })
    }
}

/// A multipart upload: each part is written at its offset of the temporary file as it comes.
struct SftpUpload {
    inner: Arc<Inner>,
    file: Arc<OpenFile>,
    location: Path,
    tmp: Path,
    /// Where the next part starts.
    offset: u64,
}

impl fmt::Debug for SftpUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SftpUpload({})", self.location)
    }
}

impl SftpUpload {
    fn handle(&self) -> object_store::Result<String> {
        self.file
            .handle
            .clone()
            .ok_or_else(|| generic("upload already finished"))
    }
}

#[async_trait]
impl MultipartUpload for SftpUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let bytes = Bytes::from(data);
        let at = self.offset;
        self.offset += bytes.len() as u64;
        let (inner, file, what) = (
            self.inner.clone(),
            self.file.clone(),
            self.location.to_string(),
        );
        // Spawned, so that it is written even while the caller awaits a later part first.
        let task = tokio::spawn(async move {
            let handle = file
                .handle
                .clone()
                .ok_or_else(|| generic("upload already finished"))?;
            inner.write_at(&file.conn, &handle, &what, at, bytes).await
        });
        Box::pin(async move { task.await.map_err(generic)? })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let handle = self.handle()?;
        let conn = self.file.conn.clone();
        let what = self.location.to_string();
        if let Err(e) = self.inner.finish(&conn, &handle, &what).await {
            let _ = conn.sftp.remove(self.inner.full(&self.tmp)).await;
            return Err(e);
        }
        // Closed: nothing for the guard to close.
        if let Some(f) = Arc::get_mut(&mut self.file) {
            f.handle = None;
        }
        self.inner
            .publish(&conn, &self.tmp, &self.location, false)
            .await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let handle = self.handle()?;
        let conn = self.file.conn.clone();
        let _ = conn.sftp.close(handle.as_str()).await;
        if let Some(f) = Arc::get_mut(&mut self.file) {
            f.handle = None;
        }
        match conn.sftp.remove(self.inner.full(&self.tmp)).await {
            Err(e) if !is_status(&e, StatusCode::NoSuchFile) => {
                Err(sftp_error("deleting", self.tmp.as_ref(), e))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(url: &str) -> Inner {
        let cfg = StorageConfig {
            url: url.into(),
            known_hosts_file: "/nonexistent/known_hosts".into(),
            ..StorageConfig::default()
        };
        let u = url::Url::parse(url).unwrap();
        Arc::try_unwrap(build(&cfg, &u, url).unwrap().inner)
            .ok()
            .unwrap()
    }

    #[test]
    fn urls_give_user_host_port_and_folder() {
        let s = store("sftp://u123@u123.your-storagebox.de:23/backups/immich/");
        assert_eq!((s.user.as_str(), s.port), ("u123", 23));
        assert_eq!(s.base, "/backups/immich");
        assert_eq!(
            s.full(&Path::from("data/ab/x")),
            "/backups/immich/data/ab/x"
        );
        let home = store("sftp://me@nas/~/immich");
        assert_eq!(home.base, "immich");
        assert_eq!(home.port, 22);
        assert_eq!(home.full(&Path::from("config")), "immich/config");
        let login = store("sftp://me@nas/~");
        assert_eq!(login.full(&Path::default()), ".");
        assert_eq!(login.full(&Path::from("config")), "config");
    }

    #[test]
    fn url_mistakes_are_config_errors() {
        let cfg = |url: &str| StorageConfig {
            url: url.into(),
            known_hosts_file: "/x".into(),
            ..StorageConfig::default()
        };
        let open = |url: &str| {
            let shown = crate::redact::redact_url(url);
            build(&cfg(url), &url::Url::parse(url).unwrap(), &shown)
                .unwrap_err()
                .to_string()
        };
        assert!(open("sftp://nas/x").contains("no user name"));
        let e = open("sftp://me:hunter2pass@nas/x");
        assert!(
            e.contains("[storage] password") && !e.contains("hunter2pass"),
            "{e}"
        );
        let pinned = StorageConfig {
            ssh_host_key: "ssh-ed25519 notbase64".into(),
            ..cfg("sftp://me@nas/x")
        };
        let u = url::Url::parse(&pinned.url).unwrap();
        let e = build(&pinned, &u, "x").unwrap_err().to_string();
        assert!(e.contains("ssh_host_key"), "{e}");
    }
}
