//! Docker transport: `pg_dumpall` and `psql` run inside the Postgres container (`immich_postgres`)
//! through the Docker Engine API, as Immich's own backup docs do with `docker exec`.
//!
//! The tools in the container always match the server's version, and the host needs no Postgres
//! client. Every exec runs without a TTY (a TTY rewrites line endings), with stdout and stderr
//! attached separately: stdout is streamed as it arrives, stderr is collected, and once the stream
//! ends the exec is inspected for its exit code.
//!
//! The same transport knows the Immich server container (`immich_server`), so a restore can refuse
//! while it runs, or stop it and start it again.

use std::io;
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::{
    InspectContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio_util::io::StreamReader;

use super::local::explain_client_error;
use super::{Database, DumpRun, ReplayOutput, ReplayRun};
use crate::config::DatabaseConfig;
use crate::error::{Error, Result};

/// Where the Docker Engine listens when neither `[database] docker_host` nor `DOCKER_HOST` says.
pub(crate) const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// How long [`DockerDatabase::wait_ready`] polls `pg_isready` in the container.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two `pg_isready` probes.
const READY_POLL: Duration = Duration::from_millis(250);
/// Seconds Docker gives the Immich server to stop before it is killed.
const STOP_TIMEOUT_SECS: i32 = 30;
/// Timeout of one Engine API request (not of a streamed exec).
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// stdout chunks in flight between the exec's stream and its reader.
const STDOUT_CHUNKS: usize = 32;
/// How much of an exec's stderr is kept for messages and replay checks.
const STDERR_LIMIT: usize = 4 << 20;

/// Runs the client tools inside the Postgres container through the Docker Engine API.
pub(crate) struct DockerDatabase {
    cfg: DatabaseConfig,
    /// The Engine address actually used (config, else DOCKER_HOST, else the local socket).
    host: String,
    docker: OnceCell<Docker>,
}

impl DockerDatabase {
    /// A transport for `[database]`; nothing is contacted until the first call.
    pub fn new(cfg: DatabaseConfig) -> Self {
        let host = resolve_host(&cfg.docker_host);
        DockerDatabase {
            cfg,
            host,
            docker: OnceCell::new(),
        }
    }

    /// The Engine client, connected and version-negotiated on first use.
    pub(super) async fn docker(&self) -> Result<&Docker> {
        self.docker.get_or_try_init(|| connect(&self.host)).await
    }

    /// The Engine address used.
    pub(super) fn host(&self) -> &str {
        &self.host
    }

    /// Inspect a container; `None` when it does not exist.
    pub(super) async fn inspect(&self, name: &str) -> Result<Option<ContainerInspectResponse>> {
        let docker = self.docker().await?;
        match docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.api_error(&format!("inspecting container {name}"), e)),
        }
    }

    /// The Postgres container must exist and run.
    async fn running_container(&self) -> Result<ContainerInspectResponse> {
        let name = &self.cfg.container;
        let Some(c) = self.inspect(name).await? else {
            return Err(Error::Docker(format!(
                "container {name} does not exist (Docker at {}). Set [database] container to the name of Immich's Postgres container (see `docker ps -a`), or create the stack's containers with `docker compose create` and start the database with `docker start {name}`",
                self.host
            )));
        };
        let state = c.state.as_ref();
        if state.and_then(|s| s.paused).unwrap_or(false) {
            return Err(Error::Docker(format!(
                "container {name} is paused; resume it with `docker unpause {name}` and try again"
            )));
        }
        if !state.and_then(|s| s.running).unwrap_or(false) {
            let status = state
                .and_then(|s| s.status)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown".into());
            return Err(not_running(name, &status));
        }
        Ok(c)
    }

    /// Turn an Engine API error into a message with its cause and a remedy.
    fn api_error(&self, what: &str, e: BollardError) -> Error {
        match &e {
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } if message.contains("No such container") => Error::Docker(format!(
                "{what}: container {} does not exist; set [database] container, or create it with `docker compose create`",
                self.cfg.container
            )),
            BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            } if message.contains("not running") => {
                not_running(&self.cfg.container, message)
            }
            _ => engine_error(&self.host, what, &e),
        }
    }

    /// Create and start an exec of `cmd` in the Postgres container; `stdin` attaches its stdin.
    async fn start(&self, cmd: Vec<String>, stdin: bool) -> Result<Exec> {
        self.start_as(cmd, stdin, None).await
    }

    /// Run `cmd` in the container as OS user `user` (name or uid) and wait for it: its exit code,
    /// stdout and stderr. A tool that cannot run at all is a Docker error naming it.
    pub(super) async fn run_as(&self, user: &str, cmd: Vec<String>) -> Result<ExecOutput> {
        let tool = cmd.first().cloned().unwrap_or_default();
        let f = self
            .start_as(cmd, false, Some(user))
            .await?
            .finish(None)
            .await?;
        if let Some(e) = tool_missing(&tool, &self.cfg.container, &f) {
            return Err(e);
        }
        Ok(ExecOutput {
            code: f.exit_code,
            stdout: String::from_utf8_lossy(&f.stdout).into_owned(),
            stderr: f.stderr,
        })
    }

    /// [`DockerDatabase::start`] as OS user `user` (the container's own user when `None`).
    async fn start_as(&self, cmd: Vec<String>, stdin: bool, user: Option<&str>) -> Result<Exec> {
        self.running_container().await?;
        let docker = self.docker().await?.clone();
        let tool = cmd.first().cloned().unwrap_or_default();
        let mut env = vec!["PGCONNECT_TIMEOUT=15".to_string()];
        if let Some(pw) = self.cfg.effective_password() {
            env.push(format!("PGPASSWORD={pw}"));
        }
        let created = docker
            .create_exec(
                &self.cfg.container,
                CreateExecOptions {
                    attach_stdin: Some(stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    env: Some(env),
                    cmd: Some(cmd),
                    user: user.map(str::to_string),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.api_error(&format!("creating an exec of {tool}"), e))?;
        let started = docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(256 * 1024),
                }),
            )
            .await
            .map_err(|e| self.api_error(&format!("starting {tool}"), e))?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(Error::Docker(format!(
                "exec of {tool} in container {} started detached; expected an attached stream",
                self.cfg.container
            )));
        };
        Ok(Exec {
            handle: ExecHandle {
                docker,
                id: created.id,
                tool,
                container: self.cfg.container.clone(),
                host: self.host.clone(),
            },
            output,
            input,
        })
    }

    fn psql_base(&self, db: &str) -> Vec<String> {
        vec![
            "psql".into(),
            "-X".into(),
            format!("--username={}", self.cfg.username),
            format!("--dbname={db}"),
        ]
    }
}

fn not_running(name: &str, status: &str) -> Error {
    Error::Docker(format!(
        "container {name} is not running ({status}); start it with `docker start {name}` and try again"
    ))
}

/// `[database] docker_host`, else `DOCKER_HOST`, else the local socket.
pub(crate) fn resolve_host(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string())
}

/// The socket path of a `unix://` (or bare path) host, else `None`.
fn socket_path(host: &str) -> Option<&str> {
    if let Some(p) = host.strip_prefix("unix://") {
        Some(p)
    } else if host.starts_with('/') {
        Some(host)
    } else {
        None
    }
}

/// Connect to the Engine at `host` and agree on an API version.
async fn connect(host: &str) -> Result<Docker> {
    let docker = match socket_path(host) {
        Some(path) => {
            check_socket(path).await?;
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
        }
        None if host.starts_with("tcp://") || host.starts_with("http://") => {
            Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
        }
        None => {
            return Err(Error::Docker(format!(
                "unsupported Docker host {host:?}: use unix:///path/to/docker.sock or tcp://HOST:PORT in [database] docker_host or DOCKER_HOST"
            )))
        }
    }
    .map_err(|e| engine_error(host, "connecting", &e))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| engine_error(host, "asking the Engine for its version", &e))
}

/// A unix socket must exist and accept us; each failure has its own remedy.
async fn check_socket(path: &str) -> Result<()> {
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Ok(()),
        Err(e) => Err(socket_error(path, &e)),
    }
}

fn socket_error(path: &str, e: &io::Error) -> Error {
    let remedy = match e.kind() {
        io::ErrorKind::NotFound => format!(
            "the Docker socket {path} does not exist: is Docker running on this machine? Start it (`systemctl start docker`), set [database] docker_host (or DOCKER_HOST) to the Engine's address, mount the socket into this container (`-v /var/run/docker.sock:/var/run/docker.sock`), or use [database] mode = \"local\""
        ),
        io::ErrorKind::PermissionDenied => format!(
            "permission denied on the Docker socket {path}: run as a member of the `docker` group (`sudo usermod -aG docker $USER`, then log in again) or as root, or mount the socket with a group this user has"
        ),
        io::ErrorKind::ConnectionRefused => format!(
            "nothing listens on the Docker socket {path} (connection refused): the Docker daemon is not running; start it (`systemctl start docker`)"
        ),
        _ => format!("cannot connect to the Docker socket {path}: {e}"),
    };
    Error::Docker(remedy)
}

/// An Engine error that is not about a particular container.
pub(super) fn engine_error(host: &str, what: &str, e: &BollardError) -> Error {
    if let BollardError::SocketNotFoundError(path) = e {
        return socket_error(path, &io::Error::from(io::ErrorKind::NotFound));
    }
    if let Some(io) = find_io_error(e) {
        if let Some(path) = socket_path(host) {
            if matches!(
                io.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::PermissionDenied
                    | io::ErrorKind::ConnectionRefused
            ) {
                return socket_error(path, io);
            }
        }
    }
    if socket_path(host).is_none() && matches!(e, BollardError::HyperLegacyError { .. }) {
        let cause = find_io_error(e)
            .map(|io| io.to_string())
            .unwrap_or_else(|| crate::redact::error_chain(e));
        return Error::Docker(format!(
            "the Docker Engine at {host} ([database] docker_host, or DOCKER_HOST) is unreachable ({cause}): check the address and port, that the Engine listens there and that no firewall is in the way, or use [database] mode = \"local\""
        ));
    }
    Error::Docker(format!("{what} (Docker at {host}): {e}"))
}

/// The first `io::Error` in an error's source chain.
fn find_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

type OutputStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = std::result::Result<LogOutput, BollardError>> + Send>,
>;

/// One attached exec: its output stream and stdin.
struct Exec {
    handle: ExecHandle,
    output: OutputStream,
    input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

/// What identifies an exec, for reading its exit code.
struct ExecHandle {
    docker: Docker,
    id: String,
    tool: String,
    container: String,
    host: String,
}

/// What an exec of [`DockerDatabase::run_as`] printed, and how it ended.
pub(super) struct ExecOutput {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// How an exec ended.
struct Finished {
    exit_code: i64,
    stderr: String,
    /// stdout, when it was collected rather than streamed.
    stdout: Vec<u8>,
}

impl Exec {
    /// Drain the output stream: stdout goes to `sink` when given (else it is kept, up to a limit),
    /// stderr is kept; then the exit code is read.
    async fn finish(self, sink: Option<mpsc::Sender<io::Result<Bytes>>>) -> Result<Finished> {
        let Exec {
            handle,
            mut output,
            input,
        } = self;
        let mut stderr = Vec::new();
        let mut stdout = Vec::new();
        let mut sink = sink;
        let mut stream_error = None;
        while let Some(item) = output.next().await {
            match item {
                Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                    match &sink {
                        Some(tx) => {
                            if tx.send(Ok(message)).await.is_err() {
                                // The reader is gone: stop reading, so the tool sees a closed pipe.
                                sink = None;
                                stream_error = Some("the reader of its output stopped".into());
                                break;
                            }
                        }
                        None => keep(&mut stdout, &message),
                    }
                }
                Ok(LogOutput::StdErr { message }) => keep(&mut stderr, &message),
                Ok(LogOutput::StdIn { .. }) => {}
                Err(e) => {
                    stream_error = Some(e.to_string());
                    break;
                }
            }
        }
        drop(output);
        drop(input);
        let stderr_text = String::from_utf8_lossy(&stderr).into_owned();
        let exit_code = match handle.exit_code().await {
            Ok(code) => code,
            Err(e) => {
                if let Some(tx) = sink {
                    let _ = tx
                        .send(Err(io::Error::other(format!("{} failed", handle.tool))))
                        .await;
                }
                return Err(e);
            }
        };
        if let Some(msg) = stream_error.filter(|_| exit_code == 0) {
            return Err(Error::Docker(format!(
                "the output stream of {} in container {} broke: {msg}",
                handle.tool, handle.container
            )));
        }
        if exit_code != 0 {
            if let Some(tx) = sink {
                // The reader sees an error instead of a clean end of a truncated dump.
                let _ = tx
                    .send(Err(io::Error::other(format!(
                        "{} exited with code {exit_code}",
                        handle.tool
                    ))))
                    .await;
            }
        }
        Ok(Finished {
            exit_code,
            stderr: stderr_text,
            stdout,
        })
    }
}

impl ExecHandle {
    /// The exec's exit code, once Docker has recorded it.
    async fn exit_code(&self) -> Result<i64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.docker.inspect_exec(&self.id).await.map_err(|e| {
                engine_error(
                    &self.host,
                    &format!("inspecting the exec of {}", self.tool),
                    &e,
                )
            })?;
            match (info.running, info.exit_code) {
                (Some(true), _) | (_, None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (_, Some(code)) => return Ok(code),
                _ => {
                    return Err(Error::Docker(format!(
                        "the exec of {} in container {} did not report an exit code",
                        self.tool, self.container
                    )))
                }
            }
        }
    }
}

fn keep(buf: &mut Vec<u8>, bytes: &[u8]) {
    let room = STDERR_LIMIT.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

/// An exec that did not run its tool at all (not found, not executable): a Docker error that
/// names the tool; `None` when the tool ran. The Postgres tools themselves never exit with 126 or
/// 127, so those codes (Docker's "cannot run the command") are unambiguous.
fn tool_missing(tool: &str, container: &str, f: &Finished) -> Option<Error> {
    let said = format!("{}{}", String::from_utf8_lossy(&f.stdout), f.stderr);
    let cannot_run = f.exit_code == 126
        || f.exit_code == 127
        || f.exit_code != 0 && said.contains("executable file not found");
    if !cannot_run {
        return None;
    }
    Some(Error::Docker(format!(
        "{tool} was not found in container {container} (exit code {}{}): it is not a Postgres container, or its PATH lacks the PostgreSQL client tools. Set [database] container to Immich's Postgres container (immich_postgres, image ghcr.io/immich-app/postgres), or use [database] mode = \"local\"",
        f.exit_code,
        first_line(said.trim())
            .map(|l| format!(": {l}"))
            .unwrap_or_default()
    )))
}

fn first_line(s: &str) -> Option<&str> {
    s.lines().map(str::trim).find(|l| !l.is_empty())
}

/// Failure of a tool that ran: its stderr, explained.
fn tool_failed(tool: &str, container: &str, f: &Finished) -> Error {
    if let Some(e) = tool_missing(tool, container, f) {
        return e;
    }
    let text = if f.stderr.trim().is_empty() {
        format!("exit code {} in container {container}", f.exit_code)
    } else {
        f.stderr.clone()
    };
    explain_client_error(tool, &text)
}

#[async_trait::async_trait]
impl Database for DockerDatabase {
    fn describe(&self) -> String {
        format!("container {} (Docker at {})", self.cfg.container, self.host)
    }

    async fn dump_all(&self) -> Result<DumpRun> {
        let cmd = vec![
            "pg_dumpall".to_string(),
            "--clean".into(),
            "--if-exists".into(),
            format!("--username={}", self.cfg.username),
        ];
        let exec = self.start(cmd, false).await?;
        let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(STDOUT_CHUNKS);
        let (done_tx, done_rx) = oneshot::channel();
        let container = self.cfg.container.clone();
        tokio::spawn(async move {
            let result = exec.finish(Some(tx)).await.and_then(|f| {
                if f.exit_code == 0 {
                    Ok(())
                } else {
                    Err(tool_failed("pg_dumpall", &container, &f))
                }
            });
            let _ = done_tx.send(result);
        });
        let stdout = StreamReader::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let done = async move {
            done_rx
                .await
                .unwrap_or_else(|_| Err(Error::Docker("the pg_dumpall exec task stopped".into())))
        }
        .boxed();
        Ok(DumpRun {
            stdout: Box::pin(stdout),
            done,
        })
    }

    async fn query(&self, db: &str, sql: &str) -> Result<String> {
        let mut cmd = self.psql_base(db);
        cmd.extend(
            ["-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql]
                .into_iter()
                .map(String::from),
        );
        let f = self.start(cmd, false).await?.finish(None).await?;
        if f.exit_code != 0 {
            return Err(tool_failed("psql", &self.cfg.container, &f));
        }
        String::from_utf8(f.stdout)
            .map_err(|e| Error::Database(format!("psql printed text that is not UTF-8: {e}")))
    }

    async fn client_version(&self) -> Result<String> {
        let cmd = vec!["psql".to_string(), "--version".to_string()];
        let f = self.start(cmd, false).await?.finish(None).await?;
        if f.exit_code != 0 {
            return Err(tool_failed("psql", &self.cfg.container, &f));
        }
        Ok(String::from_utf8_lossy(&f.stdout).trim().to_string())
    }

    async fn replay(&self) -> Result<ReplayRun> {
        let mut cmd = self.psql_base("postgres");
        cmd.extend(["-v".to_string(), "ON_ERROR_STOP=1".to_string()]);
        let mut exec = self.start(cmd, true).await?;
        let stdin = std::mem::replace(&mut exec.input, Box::pin(tokio::io::sink()));
        let container = self.cfg.container.clone();
        let done = async move {
            let f = exec.finish(None).await?;
            if let Some(e) = tool_missing("psql", &container, &f) {
                return Err(e);
            }
            Ok(ReplayOutput {
                success: f.exit_code == 0,
                stderr: f.stderr,
            })
        }
        .boxed();
        Ok(ReplayRun {
            stdin: Box::pin(stdin),
            done,
        })
    }

    async fn wait_ready(&self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        loop {
            let cmd = vec![
                "pg_isready".to_string(),
                format!("--username={}", self.cfg.username),
                "--dbname=postgres".into(),
                "--timeout=2".into(),
            ];
            let f = self.start(cmd, false).await?.finish(None).await?;
            if let Some(e) = tool_missing("pg_isready", &self.cfg.container, &f) {
                return Err(e);
            }
            match f.exit_code {
                0 => {
                    tracing::debug!(waited = ?started.elapsed(), "Postgres in the container accepts connections");
                    return Ok(());
                }
                // 1: rejecting connections (starting up), 2: no response yet.
                1 | 2 if Instant::now() < deadline => tokio::time::sleep(READY_POLL).await,
                code => {
                    let said = format!("{}{}", String::from_utf8_lossy(&f.stdout), f.stderr);
                    return Err(Error::Database(format!(
                        "Postgres in container {} did not accept connections within {}s (pg_isready exit code {code}: {}); check `docker logs {}`",
                        self.cfg.container,
                        READY_TIMEOUT.as_secs(),
                        said.trim(),
                        self.cfg.container
                    )));
                }
            }
        }
    }

    async fn image(&self) -> Option<String> {
        match self.inspect(&self.cfg.container).await {
            Ok(Some(c)) => {
                let name = c.config.as_ref().and_then(|c| c.image.clone());
                match (name, c.image) {
                    (Some(n), Some(id)) if n != id => Some(format!("{n} ({id})")),
                    (Some(n), _) => Some(n),
                    (None, id) => id,
                }
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    "cannot read the image of container {}: {e}",
                    self.cfg.container
                );
                None
            }
        }
    }

    async fn running_server(&self) -> Result<Option<String>> {
        let name = &self.cfg.server_container;
        if name.is_empty() {
            return Ok(None);
        }
        let running = self
            .inspect(name)
            .await?
            .and_then(|c| c.state)
            .and_then(|s| s.running)
            .unwrap_or(false);
        Ok(running.then(|| name.clone()))
    }

    async fn set_server_running(&self, running: bool) -> Result<()> {
        let name = &self.cfg.server_container;
        let docker = self.docker().await?;
        let r = if running {
            docker
                .start_container(name, None::<StartContainerOptions>)
                .await
        } else {
            docker
                .stop_container(
                    name,
                    Some(StopContainerOptions {
                        t: Some(STOP_TIMEOUT_SECS),
                        signal: None,
                    }),
                )
                .await
        };
        r.map_err(|e| {
            engine_error(
                &self.host,
                &format!(
                    "{} the Immich server container {name}",
                    if running { "starting" } else { "stopping" }
                ),
                &e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(code: i64, stdout: &str, stderr: &str) -> Finished {
        Finished {
            exit_code: code,
            stderr: stderr.into(),
            stdout: stdout.as_bytes().to_vec(),
        }
    }

    #[test]
    fn hosts_resolve_config_first() {
        assert_eq!(resolve_host("tcp://10.0.0.2:2375"), "tcp://10.0.0.2:2375");
        assert_eq!(
            socket_path("unix:///run/docker.sock"),
            Some("/run/docker.sock")
        );
        assert_eq!(socket_path("/run/docker.sock"), Some("/run/docker.sock"));
        assert_eq!(socket_path("tcp://h:2375"), None);
    }

    #[test]
    fn a_missing_tool_is_told_apart_from_a_failing_one() {
        let oci = "OCI runtime exec failed: exec failed: unable to start container process: exec: \"pg_dumpall\": executable file not found in $PATH: unknown";
        for f in [
            finished(126, oci, ""),
            finished(127, "", ""),
            finished(126, "", ""),
        ] {
            let e = tool_missing("pg_dumpall", "pg", &f).expect("missing");
            assert!(matches!(e, Error::Docker(_)), "{e}");
            assert!(e
                .to_string()
                .contains("pg_dumpall was not found in container pg"));
        }
        let failed = finished(1, "", "pg_dumpall: error: connection to server failed");
        assert!(tool_missing("pg_dumpall", "pg", &failed).is_none());
        assert!(matches!(
            tool_failed("pg_dumpall", "pg", &failed),
            Error::Database(_)
        ));
        assert!(tool_missing("psql", "pg", &finished(0, "1\n", "")).is_none());
    }

    #[test]
    fn socket_errors_name_their_remedy() {
        let e = socket_error("/s", &io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(e.to_string().contains("docker` group"), "{e}");
        assert_eq!(e.exit_code(), crate::error::exit::DOCKER);
        let e = socket_error("/s", &io::Error::from(io::ErrorKind::NotFound));
        assert!(e.to_string().contains("/s does not exist"), "{e}");
        let e = socket_error("/s", &io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(e.to_string().contains("daemon is not running"), "{e}");
    }
}
