//! The agent's scheduled checks (`[check]`): `check` on `cron`, and a slice of the data read back
//! on `read_data_cron`, the slice moving on by one each run so that `read_data_slices` runs read
//! everything once.
//!
//! The identity is used only when `[check] identity_file` is set (reading data back needs it; the
//! structural check does not). Results go to the health state (a problem makes `/healthz` 503),
//! `/metrics`, the pings and the `[notify]` channels. The next slice to read is remembered in the cache folder, so a
//! restarted agent goes on where it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::health::{CheckResult, Shared};
use super::Pinger;
use crate::config::Config;
use crate::config::RunStatus;
use crate::crypto::Identities;
use crate::error::{exit, Result};
use crate::notify::{Event, Notifier};
use crate::policy::schedule::Clock;
use crate::progress::Progress;
use crate::repo::trust::Trust;
use crate::repo::Repository;
use crate::verify::{self, CheckOptions, CheckReport, Deep, Subset};

/// Which of the two scheduled checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Check,
    ReadData,
}

/// Run one scheduled check and record what it found.
pub(super) async fn run(
    cfg: &Config,
    repo: &Repository,
    kind: Kind,
    shared: &Shared,
    pinger: &Pinger,
    clock: &dyn Clock,
    notifier: &Notifier,
) {
    let started = Instant::now();
    let time = clock.now();
    let slices = cfg.check.read_data_slices.max(1);
    let slice = (kind == Kind::ReadData).then(|| next_slice(&cfg.cache_dir(), slices));
    let what = match (slice, cfg.check.identity_file.is_empty()) {
        (Some(n), _) => format!("read-data {n}/{slices}"),
        (None, true) => "check".to_string(),
        (None, false) => "check --identity".to_string(),
    };
    tracing::info!(check = %what, "scheduled check starting");
    let read = slice.map(|n| Subset::Slice { n, m: slices });
    let result = match options(cfg, repo, read).await {
        Ok(opts) => verify::check(repo, opts).await,
        Err(e) => Err(e),
    };
    let outcome = outcome(time, what, started, result);
    if outcome.ok {
        tracing::info!(check = %outcome.what, bytes_verified = outcome.bytes_verified, "scheduled check found no problem");
    } else {
        tracing::error!(check = %outcome.what, problems = outcome.problems, "scheduled check: {}", outcome.reason);
    }
    if let Some(n) = slice {
        save_slice(&cfg.cache_dir(), n % slices + 1);
    }
    record(shared, kind, slice, outcome.clone());
    ping(cfg, pinger, &outcome).await;
    notifier.notify(&event(&outcome)).await;
}

/// The notification of a scheduled check: a failure when it found a problem or could not run.
fn event(c: &CheckResult) -> Event {
    let (status, code) = match (c.ok, c.problems) {
        (true, _) => (RunStatus::Success, exit::OK),
        (false, 0) => (RunStatus::Failure, exit::FAILURE), // it could not run
        (false, _) => (RunStatus::Failure, exit::DAMAGED), // as `check` exits
    };
    let took = std::time::Duration::from_secs_f64(c.duration_secs.max(0.0));
    let mut event = Event::new("check", status, code, took);
    event.reason = (!c.ok).then(|| format!("{}: {}", c.what, c.reason));
    event
}

/// The check's options: with the identity when `[check] identity_file` is set.
async fn options(cfg: &Config, repo: &Repository, read: Option<Subset>) -> Result<CheckOptions> {
    let deep = if cfg.check.identity_file.is_empty() {
        None
    } else {
        let file = cfg.existing_file("[check] identity_file", &cfg.check.identity_file)?;
        let identities = Arc::new(Identities::load(&file)?);
        let trust = Trust::new(&identities, cfg.encryption.verify_keys()?, false);
        Some(Deep {
            reader: repo.unlock(identities).await?,
            trust,
            read,
            concurrency: cfg.storage.concurrency,
            progress: Progress::hidden(),
        })
    };
    Ok(CheckOptions {
        lock: Some(cfg.lock.clone()),
        deep,
    })
}

fn outcome(
    time: chrono::DateTime<chrono::Utc>,
    what: String,
    started: Instant,
    result: Result<CheckReport>,
) -> CheckResult {
    let mut c = CheckResult {
        time,
        what,
        ok: false,
        problems: 0,
        reason: String::new(),
        bytes_verified: 0,
        duration_secs: started.elapsed().as_secs_f64(),
    };
    match result {
        Ok(r) => {
            c.ok = r.ok;
            c.problems = r.problems.len() as u64;
            c.bytes_verified = r.read_data.map(|d| d.bytes).unwrap_or(0);
            c.reason = match r.problems.first() {
                None => "no problem".into(),
                Some(p) => format!(
                    "{} problem(s); first: {}: {} (snapshots {}); run `immich-backup check` for all",
                    r.problems.len(),
                    p.object,
                    p.problem,
                    p.snapshots.join(", ")
                ),
            };
        }
        Err(e) => c.reason = format!("the check could not run: {e}"),
    }
    c
}

fn record(shared: &Shared, kind: Kind, slice: Option<u32>, c: CheckResult) {
    shared.update(|s| {
        s.checks_total += 1;
        s.check_failures_total += u64::from(!c.ok);
        s.bytes_verified_total += c.bytes_verified;
        match (kind, slice) {
            (Kind::ReadData, Some(n)) => {
                if c.ok {
                    s.damaged_slices.remove(&n);
                } else {
                    s.damaged_slices.insert(n, c.clone());
                }
                s.last_read = Some(c);
            }
            _ => s.last_check = Some(c),
        }
    });
}

/// `[check] ping_url` (`/fail` on a problem); without it, problems go to the failure ping.
async fn ping(cfg: &Config, pinger: &Pinger, c: &CheckResult) {
    let body = format!("immich-backup: {}: {}\n", c.what, c.reason);
    let base = cfg.check.ping_url.trim_end_matches('/');
    let url = match (base.is_empty(), c.ok) {
        (false, true) => Some(base.to_string()),
        (false, false) => Some(format!("{base}/fail")),
        (true, true) => None,
        (true, false) => pinger.failure.clone(),
    };
    pinger.ping(&url, body).await;
}

/// The file that remembers the next read-data slice.
fn slice_file(cache: &Path) -> PathBuf {
    cache.join("check-next-slice")
}

/// The slice to read now (1 when nothing is remembered, or the slice count changed below it).
fn next_slice(cache: &Path, slices: u32) -> u32 {
    std::fs::read_to_string(slice_file(cache))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|n| (1..=slices).contains(n))
        .unwrap_or(1)
}

fn save_slice(cache: &Path, next: u32) {
    let written = std::fs::create_dir_all(cache)
        .and_then(|()| std::fs::write(slice_file(cache), format!("{next}\n")));
    if let Err(e) = written {
        tracing::warn!(error = %e, folder = %cache.display(), "could not remember the next read-data slice; the next run reads slice 1");
    }
}
