//! A backup with what surrounds it in daily use, for `backup` and the agent alike: the
//! `[hooks] before_backup` command (its failure aborts the run before anything is read or
//! written), the backup, then `after_backup` or `on_failure`, then the `[notify]` channels.
//!
//! Nothing after the backup changes its outcome: a failing `after_backup`/`on_failure` hook or an
//! undelivered notification is a warning.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::backup::BackupReport;
use crate::config::{Config, RunStatus};
use crate::error::{exit, Result};
use crate::hooks::{self, Facts, Hook};
use crate::notify::{Event, Notifier};

/// Run `backup` between the hooks, and notify.
pub async fn backup<F>(cfg: &Config, notifier: &Notifier, backup: F) -> Result<BackupReport>
where
    F: Future<Output = Result<BackupReport>>,
{
    let started = Instant::now();
    let result = match hooks::run(&cfg.hooks, Hook::BeforeBackup, &Facts::default()).await {
        Ok(()) => backup.await,
        Err(e) => Err(e),
    };
    let facts = facts(&result);
    let hook = match &result {
        Ok(_) => Hook::AfterBackup,
        Err(_) => Hook::OnFailure,
    };
    if let Err(e) = hooks::run(&cfg.hooks, hook, &facts).await {
        tracing::warn!(error = %e, "the backup's outcome stands");
    }
    notifier.notify(&event(&result, started.elapsed())).await;
    result
}

/// The status of a backup's result, and its exit code.
fn status(result: &Result<BackupReport>) -> (RunStatus, i32) {
    match result {
        Ok(r) if r.partial => (RunStatus::Partial, exit::PARTIAL),
        Ok(_) => (RunStatus::Success, exit::OK),
        Err(e) => (RunStatus::Failure, e.exit_code()),
    }
}

/// What the `after_backup`/`on_failure` hooks are told.
fn facts(result: &Result<BackupReport>) -> Facts {
    let (status, exit_code) = status(result);
    Facts {
        snapshot: result.as_ref().ok().map(|r| r.snapshot.clone()),
        status: Some(status),
        exit_code: Some(exit_code),
        error: result.as_ref().err().map(|e| e.to_string()),
    }
}

/// The notification of a backup's result.
fn event(result: &Result<BackupReport>, elapsed: Duration) -> Event {
    let (status, exit_code) = status(result);
    let mut event = Event::new("backup", status, exit_code, elapsed);
    match result {
        Ok(r) => {
            event.snapshot = Some(r.snapshot.clone());
            event.files = Some(r.files);
            event.files_new = Some(r.files_new);
            event.bytes = Some(r.bytes_total);
            event.bytes_stored = Some(r.bytes_stored);
            let why = super::partial_text(r);
            let why = why.trim_start_matches("; ");
            event.reason = (r.partial && !why.is_empty()).then(|| why.to_string());
        }
        Err(e) => event.reason = Some(e.to_string()),
    }
    event
}
