//! Local transport: the Postgres client binaries on this machine (`pg_dumpall`, `psql`), for
//! installs that do not run Postgres in Docker. The binaries must be at least the server's version.

use std::path::PathBuf;
use std::process::Stdio;

use futures::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::{Database, DumpRun, ReplayOutput, ReplayRun};
use crate::config::DatabaseConfig;
use crate::error::{Error, Result};

/// Runs the client tools from `[database] bin_dir` (or PATH) over TCP or a socket.
pub(crate) struct LocalDatabase {
    cfg: DatabaseConfig,
}

impl LocalDatabase {
    pub fn new(cfg: DatabaseConfig) -> Self {
        LocalDatabase { cfg }
    }

    fn program(&self, name: &str) -> PathBuf {
        if self.cfg.bin_dir.is_empty() {
            PathBuf::from(name)
        } else {
            PathBuf::from(&self.cfg.bin_dir).join(name)
        }
    }

    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.program(name));
        cmd.arg("--host")
            .arg(&self.cfg.host)
            .arg("--port")
            .arg(self.cfg.port.to_string())
            .arg(format!("--username={}", self.cfg.username))
            .arg("--no-password")
            .env("PGCONNECT_TIMEOUT", "15")
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(pw) = self.cfg.effective_password() {
            cmd.env("PGPASSWORD", pw);
        }
        cmd
    }

    fn spawn(&self, mut cmd: Command, name: &str) -> Result<Child> {
        cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Database(format!(
                    "{} not found; install the PostgreSQL client matching the server, set [database] bin_dir, or use mode = \"docker\"",
                    self.program(name).display()
                ))
            } else {
                Error::Database(format!("cannot start {}: {e}", self.program(name).display()))
            }
        })
    }
}

/// Turn a client's stderr into one line with a remedy where the cause is known.
pub(crate) fn explain_client_error(tool: &str, stderr: &str) -> Error {
    let text = stderr
        .trim()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    let remedy = if text.contains("role \"") && text.contains("\" does not exist") {
        " (no such database user: set [database] username to Immich's DB_USERNAME)"
    } else if text.contains("database \"") && text.contains("\" does not exist") {
        " (no such database: set [database] database to Immich's DB_DATABASE_NAME)"
    } else if text.contains("server version mismatch") {
        " (the client is older than the server: install the matching PostgreSQL client or use mode = \"docker\")"
    } else if text.contains("Connection refused")
        || text.contains("could not connect")
        || text.contains("No such file or directory")
    {
        " (is Postgres running, and are [database] host and port right?)"
    } else if text.contains("password authentication failed")
        || text.contains("no password supplied")
    {
        " (set [database] password or PGPASSWORD)"
    } else if text.contains("server closed the connection unexpectedly")
        || text.contains("terminating connection")
        || text.contains("connection to server was lost")
        || text.contains("the database system is shutting down")
    {
        " (the database server stopped or restarted while it was being read: make sure Postgres stays up (`docker logs immich_postgres`, or the server's log), then run the backup again; no snapshot was made)"
    } else {
        ""
    };
    Error::Database(format!("{tool} failed: {text}{remedy}"))
}

async fn read_all(mut r: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[async_trait::async_trait]
impl Database for LocalDatabase {
    fn describe(&self) -> String {
        format!("local Postgres at {}:{}", self.cfg.host, self.cfg.port)
    }

    async fn dump_all(&self) -> Result<DumpRun> {
        let mut cmd = self.command("pg_dumpall");
        cmd.arg("--clean").arg("--if-exists");
        let mut child = self.spawn(cmd, "pg_dumpall")?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let done = async move {
            let err = read_all(stderr).await;
            let status = child
                .wait()
                .await
                .map_err(|e| Error::Database(format!("pg_dumpall: {e}")))?;
            if status.success() {
                Ok(())
            } else {
                Err(explain_client_error("pg_dumpall", &err))
            }
        }
        .boxed();
        Ok(DumpRun {
            stdout: Box::pin(stdout),
            done,
        })
    }

    async fn query(&self, db: &str, sql: &str) -> Result<String> {
        let mut cmd = self.command("psql");
        cmd.arg("-X")
            .arg("-A")
            .arg("-t")
            .arg("-q")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg(format!("--dbname={db}"))
            .arg("-c")
            .arg(sql);
        let child = self.spawn(cmd, "psql")?;
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Error::Database(format!("psql: {e}")))?;
        if !out.status.success() {
            return Err(explain_client_error(
                "psql",
                &String::from_utf8_lossy(&out.stderr),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn replay(&self) -> Result<ReplayRun> {
        let mut cmd = self.command("psql");
        cmd.arg("-X")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg("--dbname=postgres")
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        // psql dies with this process, even a killed one (kill_on_drop covers the rest).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = self.spawn(cmd, "psql")?;
        let stdin = child.stdin.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let done = async move {
            let err = read_all(stderr).await;
            let status = child
                .wait()
                .await
                .map_err(|e| Error::Database(format!("psql: {e}")))?;
            Ok(ReplayOutput {
                success: status.success(),
                stderr: err,
            })
        }
        .boxed();
        Ok(ReplayRun {
            stdin: Box::pin(stdin),
            done,
        })
    }

    async fn client_version(&self) -> Result<String> {
        let mut cmd = Command::new(self.program("psql"));
        cmd.arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = self
            .spawn(cmd, "psql")?
            .wait_with_output()
            .await
            .map_err(|e| Error::Database(format!("psql --version: {e}")))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    async fn wait_ready(&self) -> Result<()> {
        self.query("postgres", "SELECT 1").await.map(|_| ())
    }

    fn ready_waits(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_stopped_mid_dump_is_told_with_what_to_do() {
        let e = explain_client_error(
            "pg_dumpall",
            "pg_dump: error: Dumping the contents of table \"asset\" failed: PQgetResult() failed.\npg_dump: detail: Error message from server: server closed the connection unexpectedly",
        );
        let text = e.to_string();
        assert!(text.contains("server closed the connection"), "{text}");
        assert!(text.contains("run the backup again"), "{text}");
        assert_eq!(e.exit_code(), crate::error::exit::DATABASE);
        assert_eq!(text.lines().count(), 1);
    }
}
