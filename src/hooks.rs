//! `[hooks]`: the user's commands around a backup (`before_backup`, `after_backup`, `on_failure`),
//! e.g. to pause Immich's jobs while the database is dumped.
//!
//! Each runs as `sh -c COMMAND` in a process group of its own, with the run's facts in its
//! environment; its output goes to the log line by line. A hook that runs past
//! `[hooks] timeout_secs` is killed with its whole group (so a `sleep` it started goes too), and a
//! hook abandoned half-way (the agent shutting down) is killed the same way. The command text is
//! never logged: it may carry an API key; and the hook does not inherit our own settings from the
//! environment (`IMMICH_BACKUP__…`, the passphrase), which carry secrets.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::config::{HooksConfig, RunStatus};
use crate::error::{Error, Result};

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    BeforeBackup,
    AfterBackup,
    OnFailure,
}

impl Hook {
    /// Its key in `[hooks]`, also its `IMMICH_BACKUP_HOOK`.
    pub fn key(self) -> &'static str {
        match self {
            Hook::BeforeBackup => "before_backup",
            Hook::AfterBackup => "after_backup",
            Hook::OnFailure => "on_failure",
        }
    }

    fn command(self, cfg: &HooksConfig) -> &str {
        match self {
            Hook::BeforeBackup => &cfg.before_backup,
            Hook::AfterBackup => &cfg.after_backup,
            Hook::OnFailure => &cfg.on_failure,
        }
    }
}

/// What a hook is told about the run (unset fields are left out of its environment).
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// `IMMICH_BACKUP_SNAPSHOT`: the snapshot made, when there is one.
    pub snapshot: Option<String>,
    /// `IMMICH_BACKUP_STATUS`: success, partial or failure (not for `before_backup`).
    pub status: Option<RunStatus>,
    /// `IMMICH_BACKUP_EXIT_CODE`: the run's exit code (not for `before_backup`).
    pub exit_code: Option<i32>,
    /// `IMMICH_BACKUP_ERROR`: the failure's one-line text.
    pub error: Option<String>,
}

impl Facts {
    fn env(&self, hook: Hook) -> Vec<(&'static str, String)> {
        let mut env = vec![("IMMICH_BACKUP_HOOK", hook.key().to_string())];
        let mut add = |k, v: Option<String>| env.extend(v.map(|v| (k, v)));
        add("IMMICH_BACKUP_SNAPSHOT", self.snapshot.clone());
        add(
            "IMMICH_BACKUP_STATUS",
            self.status.map(|s| s.as_str().into()),
        );
        add(
            "IMMICH_BACKUP_EXIT_CODE",
            self.exit_code.map(|c| c.to_string()),
        );
        add("IMMICH_BACKUP_ERROR", self.error.clone());
        env
    }
}

/// Our own settings in the environment (`IMMICH_BACKUP__…`, which carry store keys, database and
/// SMTP passwords, tokens) and the identity's passphrase: a hook is not given them, so that one
/// printing its environment does not put them in the log.
fn our_settings() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("IMMICH_BACKUP__") || k == "IMMICH_BACKUP_PASSPHRASE"
        })
        .collect()
}

/// Run `hook` if it is configured; `Err(Error::Hook)` when it exits non-zero, is killed by a
/// signal or times out, with its last line on stderr.
pub async fn run(cfg: &HooksConfig, hook: Hook, facts: &Facts) -> Result<()> {
    let command = hook.command(cfg);
    if command.trim().is_empty() {
        return Ok(());
    }
    let key = hook.key();
    let failed = |what: String| Error::Hook(format!("[hooks] {key} {what}"));
    let mut child = Command::new("sh");
    for name in our_settings() {
        child.env_remove(name);
    }
    let mut child = child
        .arg("-c")
        .arg(command)
        .envs(facts.env(hook))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("could not be started: sh: {e}")))?;
    let mut group = Group(child.id());
    tracing::info!(hook = key, "hook started");
    let out = tokio::spawn(log_lines(child.stdout.take(), key, false));
    let err = tokio::spawn(log_lines(child.stderr.take(), key, true));
    let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
    let status = tokio::time::timeout(timeout, child.wait()).await;
    if status.is_err() {
        group.kill();
        let _ = child.wait().await;
    }
    // Finished (or killed): what it left running in the background is its own business.
    group.0 = None;
    // A background process the hook left behind may hold its output open: read what is there.
    let grace = Duration::from_secs(1);
    let _ = tokio::time::timeout(grace, out).await;
    let last = match tokio::time::timeout(grace, err).await {
        Ok(Ok(last)) => last,
        _ => None,
    };
    let last = last.map(|l| format!(": {l}")).unwrap_or_default();
    match status {
        Err(_) => Err(failed(format!(
            "timed out after {}s and was killed ([hooks] timeout_secs){last}",
            timeout.as_secs()
        ))),
        Ok(Err(e)) => Err(failed(format!("could not be waited for: {e}"))),
        Ok(Ok(s)) if s.success() => {
            tracing::info!(hook = key, "hook finished");
            Ok(())
        }
        Ok(Ok(s)) => Err(failed(format!("failed ({s}){last}"))),
    }
}

/// Log each line of a hook's stdout or stderr; the last non-empty stderr line is returned.
async fn log_lines(
    pipe: Option<impl AsyncRead + Unpin>,
    hook: &'static str,
    stderr: bool,
) -> Option<String> {
    let mut lines = BufReader::new(pipe?).lines();
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        if stderr {
            tracing::warn!(hook, stream = "stderr", "{line}");
            last = Some(line.chars().take(300).collect());
        } else {
            tracing::info!(hook, stream = "stdout", "{line}");
        }
    }
    last
}

/// A hook's process group while the hook runs: killed on timeout, and when the run is abandoned
/// (dropped) half-way.
struct Group(Option<u32>);

impl Group {
    fn kill(&self) {
        let Some(pid) = self
            .0
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        else {
            return;
        };
        // The group may be gone already (ESRCH): nothing to do then.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}
