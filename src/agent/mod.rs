//! `immich-backup run`: the long-running agent (the Immich compose stack's backup sidecar).
//!
//! It backs up on `[schedule]`, and after each successful backup applies `[retention]` and prunes
//! (forget --prune), all with only the public recipients; on `[check]`'s schedules it checks the
//! store (`checks.rs`). It serves `/healthz` and `/metrics` when `[agent] listen` is set, and calls
//! healthchecks.io-style ping URLs on start, success and failure. Jobs run one at a time: one that
//! falls due while another runs starts right after it.
//!
//! Shutdown: on SIGTERM/SIGINT ([`run`]'s `shutdown` token) it takes no new work; a running backup
//! is abandoned where it is — its manifest is written last, so nothing partial becomes visible, and
//! the next backup reuses what was uploaded — its lock is removed, and `run` returns within a few
//! seconds.

mod checks;
pub mod daily;
pub mod health;
pub mod probe;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::backup::{self, BackupReport};
use crate::config::AgentConfig;
use crate::config::{Config, OnMissingOriginal};
use crate::crypto::Recipients;
use crate::db;
use crate::error::{Error, Result};
use crate::format::{Object, Summary};
use crate::maintenance;
use crate::notify::Notifier;
use crate::policy::schedule::{Clock, Planner, Schedule};
use crate::progress::Progress;
use crate::repo::snapshots;
use crate::repo::Repository;
use health::{AgentState, Failure, Shared, Success};

/// How long shutdown waits for lock removal and the last pings.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Calls the ping URLs; failures are logged, never fatal.
struct Pinger {
    client: Option<reqwest::Client>,
    start: Option<String>,
    success: Option<String>,
    failure: Option<String>,
}

impl Pinger {
    /// The pings of `cfg`; `more`: other URLs will be pinged too (`[check] ping_url`).
    fn new(cfg: &AgentConfig, more: bool) -> Result<Pinger> {
        let base = cfg.ping_url.trim_end_matches('/');
        let pick = |own: &str, suffix: &str| -> Option<String> {
            if !own.is_empty() {
                Some(own.to_string())
            } else if !base.is_empty() {
                Some(format!("{base}{suffix}"))
            } else {
                None
            }
        };
        let start = pick(&cfg.ping_start_url, "/start");
        let success = pick(&cfg.ping_success_url, "");
        let failure = pick(&cfg.ping_failure_url, "/fail");
        let client = if more || start.is_some() || success.is_some() || failure.is_some() {
            Some(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(cfg.ping_timeout_secs.max(1)))
                    .user_agent(concat!("immich-backup/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| Error::Config(format!("[agent] ping: {e}")))?,
            )
        } else {
            None
        };
        Ok(Pinger {
            client,
            start,
            success,
            failure,
        })
    }

    async fn ping(&self, url: &Option<String>, body: String) {
        let (Some(client), Some(url)) = (&self.client, url) else {
            return;
        };
        // The URL is a secret (its path is the check's key): log only where it goes.
        let shown = url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        match client.post(url).body(body).send().await {
            Ok(r) if r.status().is_success() => tracing::debug!(host = %shown, "pinged"),
            Ok(r) => {
                tracing::warn!(host = %shown, status = %r.status(), "ping answered with an error")
            }
            Err(e) => tracing::warn!(host = %shown, error = %e.without_url(), "ping failed"),
        }
    }
}

fn load_recipients(cfg: &Config) -> Result<Recipients> {
    let file = (!cfg.encryption.recipients_file.is_empty())
        .then(|| std::path::PathBuf::from(&cfg.encryption.recipients_file));
    Recipients::load(&cfg.encryption.recipients, file.as_deref())
}

/// Whether files the database names but the snapshot lacks make a backup partial.
fn missing_is_partial(cfg: &Config) -> bool {
    cfg.backup.on_missing_original == OnMissingOriginal::Warn
}

/// What makes a backup partial, for its ping: `; 2 file(s) could not be read`.
fn partial_text(report: &BackupReport) -> String {
    let mut out = String::new();
    if !report.skipped.is_empty() {
        out += &format!("; {} file(s) could not be read", report.skipped.len());
    }
    let c = &report.consistency;
    if report.partial && c.missing() > 0 {
        out += &format!(
            "; {} file(s) the database names are not in the snapshot",
            c.missing()
        );
    }
    if c.external_assets > 0 {
        out += &format!(
            "; {} asset(s) in external libraries not backed up",
            c.external_assets
        );
    }
    out
}

/// Fill the state from what the store holds (so a restarted agent reports the right health).
async fn load_store_state(
    repo: &Repository,
    shared: &Shared,
    missing_is_partial: bool,
) -> Result<()> {
    let ids = snapshots::list_ids(repo).await?;
    let complete: Vec<&String> = ids.iter().filter(|(_, c)| **c).map(|(id, _)| id).collect();
    let latest = match complete.last() {
        Some(id) => repo
            .get_json::<Summary>(&Object::Summary(id.to_string()))
            .await
            .ok(),
        None => None,
    };
    let (objects, bytes) = repo.usage().await?.total();
    shared.update(|s| {
        s.snapshots = complete.len() as u64;
        s.store_objects = objects;
        s.store_bytes = bytes;
        if let Some(sum) = latest {
            s.last_success = Some(Success {
                snapshot: sum.id,
                time: sum.time,
                duration_secs: None,
                files: sum.files,
                bytes: sum.bytes,
                skipped: sum.skipped,
                consistency: sum.consistency,
                missing_is_partial,
            });
        }
    });
    Ok(())
}

/// Run the agent until `shutdown` is cancelled.
pub async fn run(cfg: Config, clock: Arc<dyn Clock>, shutdown: CancellationToken) -> Result<()> {
    let schedule = Schedule::from_config(&cfg.schedule)?;
    let tz = maintenance::retention_timezone(&cfg)?;
    load_recipients(&cfg)?; // fail at start-up, not at the first backup
    let repo = Repository::open(&cfg.storage)?;
    let database = db::connect(&cfg.database)?;
    let pinger = Pinger::new(&cfg.agent, !cfg.check.ping_url.is_empty())?;
    let notifier = Notifier::new(&cfg.notify)?;
    let shared = Arc::new(Shared {
        state: std::sync::Mutex::new(AgentState::new(clock.now())),
        schedule: schedule.clone(),
        grace: cfg.agent.grace(),
    });
    if let Err(e) = load_store_state(&repo, &shared, missing_is_partial(&cfg)).await {
        tracing::warn!(error = %e, "could not read the store at start-up");
    }
    let server = if cfg.agent.listen.is_empty() {
        None
    } else {
        Some(health::start(&cfg.agent.listen, shared.clone(), shutdown.clone()).await?)
    };
    tracing::info!(
        schedule = schedule.expr(),
        timezone = %schedule.tz(),
        backup_on_start = cfg.schedule.backup_on_start,
        retention = %cfg.retention.describe(tz),
        store = repo.url(),
        "agent started"
    );

    let mut jobs = Jobs::new(&cfg, schedule)?;
    loop {
        let Some((job, next)) = jobs.next(clock.as_ref()) else {
            tracing::warn!("the schedule has no further run; waiting for a signal");
            shutdown.cancelled().await;
            break;
        };
        shared.update(|s| s.next_run = jobs.due[Job::Backup as usize]);
        tracing::info!(next = %next, job = ?job, "next job");
        if !wait_until(clock.as_ref(), next, &shutdown).await {
            break;
        }
        jobs.due[job as usize] = None;
        let finished = match job {
            Job::Backup => {
                shared.update(|s| {
                    s.running_since = Some(clock.now());
                    s.next_run = None;
                });
                let run = run_once(
                    &cfg,
                    database.as_ref(),
                    &repo,
                    tz,
                    &pinger,
                    &shared,
                    clock.as_ref(),
                    &notifier,
                );
                let finished = until_shutdown(run, &shutdown).await;
                shared.update(|s| s.running_since = None);
                finished
            }
            Job::Check | Job::ReadData => {
                let kind = if job == Job::Check {
                    checks::Kind::Check
                } else {
                    checks::Kind::ReadData
                };
                let clock = clock.as_ref();
                let run = checks::run(&cfg, &repo, kind, &shared, &pinger, clock, &notifier);
                until_shutdown(run, &shutdown).await
            }
        };
        shared.update(|s| s.traffic = repo.store().traffic());
        if !finished {
            tracing::warn!("shutting down: the running job was abandoned; nothing partial is visible, the next run resumes");
            break;
        }
    }
    tracing::info!("agent stopping");
    crate::repo::lock::settle(SHUTDOWN_GRACE).await;
    if let Some((_, task)) = server {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    Ok(())
}

/// The agent's jobs, in the order they go first when due at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Backup = 0,
    Check = 1,
    ReadData = 2,
}

/// When each job runs next: a time stays due until its job has run, so a job that fell due while
/// another ran is not skipped.
struct Jobs {
    planners: [Option<Planner>; 3],
    due: [Option<chrono::DateTime<Utc>>; 3],
}

impl Jobs {
    fn new(cfg: &Config, backups: Schedule) -> Result<Jobs> {
        let tz = &cfg.schedule.timezone;
        let check = |key: &str, expr: &str| -> Result<Option<Planner>> {
            if expr.is_empty() {
                return Ok(None);
            }
            Ok(Some(Planner::new(
                Schedule::parse_as(key, expr, tz)?,
                false,
            )))
        };
        Ok(Jobs {
            planners: [
                Some(Planner::new(backups, cfg.schedule.backup_on_start)),
                check("[check] cron", &cfg.check.cron)?,
                check("[check] read_data_cron", &cfg.check.read_data_cron)?,
            ],
            due: [None; 3],
        })
    }

    /// The job due first, and when.
    fn next(&mut self, clock: &dyn Clock) -> Option<(Job, chrono::DateTime<Utc>)> {
        for (due, planner) in self.due.iter_mut().zip(&mut self.planners) {
            if let (None, Some(p)) = (&due, planner) {
                *due = p.next(clock);
            }
        }
        [Job::Backup, Job::Check, Job::ReadData]
            .into_iter()
            .filter_map(|j| self.due[j as usize].map(|t| (j, t)))
            .min_by_key(|(_, t)| *t)
    }
}

/// Run `job` unless shut down first; false when shut down.
async fn until_shutdown(
    job: impl std::future::Future<Output = ()>,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = job => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Sleep until `clock` reaches `at`, in steps (a suspended machine or a changed clock is noticed);
/// false when shut down meanwhile.
async fn wait_until(
    clock: &dyn Clock,
    at: chrono::DateTime<Utc>,
    shutdown: &CancellationToken,
) -> bool {
    loop {
        let left = at.signed_duration_since(clock.now());
        if left <= chrono::Duration::zero() {
            return !shutdown.is_cancelled();
        }
        let step = left
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(30));
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(step) => {}
        }
    }
}

/// One scheduled job: ping, back up (between the hooks, then notify), record, apply retention
/// and prune, ping.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    cfg: &Config,
    database: &dyn db::Database,
    repo: &Repository,
    tz: chrono_tz::Tz,
    pinger: &Pinger,
    shared: &Shared,
    clock: &dyn Clock,
    notifier: &Notifier,
) {
    pinger.ping(&pinger.start, String::new()).await;
    let started = Instant::now();
    let missing_is_partial = missing_is_partial(cfg);
    let run = async {
        let recipients = load_recipients(cfg)?;
        backup::run(cfg, database, repo, recipients, Progress::hidden()).await
    };
    let result = daily::backup(cfg, notifier, run).await;
    let report: BackupReport = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "backup failed");
            shared.update(|s| {
                s.failures_total += 1;
                s.last_failure = Some(Failure {
                    time: clock.now(),
                    error: e.to_string(),
                });
            });
            pinger
                .ping(
                    &pinger.failure,
                    format!("immich-backup: backup failed: {e}\n"),
                )
                .await;
            return;
        }
    };
    let summary_time = repo
        .get_json::<Summary>(&Object::Summary(report.snapshot.clone()))
        .await
        .ok()
        .map(|s| s.time)
        .or_else(|| maintenance::id_time(&report.snapshot))
        .unwrap_or_else(|| clock.now());
    shared.update(|s| {
        s.successes_total += 1;
        s.last_failure = None;
        s.last_success = Some(Success {
            snapshot: report.snapshot.clone(),
            time: summary_time,
            duration_secs: Some(started.elapsed().as_secs_f64()),
            files: report.files,
            bytes: report.bytes_total,
            skipped: report.skipped.len() as u64,
            consistency: Some(report.consistency.counts_only()),
            missing_is_partial,
        });
    });
    tracing::info!(snapshot = %report.snapshot, files = report.files, new = report.files_new, "scheduled backup done");

    // Retention and prune; a failure here does not undo the backup.
    match maintenance::forget(repo, &cfg.retention, tz, &cfg.lock, false, true).await {
        Ok(f) => {
            let p = f.prune.as_ref();
            tracing::info!(
                kept = f.kept,
                forgotten = f.removed.len(),
                content_removed = p.map(|p| p.content_removed).unwrap_or(0),
                bytes_removed = p.map(|p| p.bytes_removed).unwrap_or(0),
                "retention applied"
            );
            shared.update(|s| {
                s.snapshots = f.kept as u64;
                if let Some(p) = p {
                    s.store_objects = p.store_objects;
                    s.store_bytes = p.store_bytes;
                }
            });
        }
        Err(e) => {
            tracing::error!(error = %e, "retention/prune failed; the backup itself is fine");
            shared.update(|s| s.prune_failures_total += 1);
            if let Ok((objects, bytes)) = repo.usage().await.map(|u| u.total()) {
                shared.update(|s| {
                    s.store_objects = objects;
                    s.store_bytes = bytes;
                });
            }
        }
    }

    let body = format!(
        "immich-backup: snapshot {} — {} files ({} new), {} bytes stored, {:.1}s{}\n",
        report.snapshot,
        report.files,
        report.files_new,
        report.bytes_stored,
        report.duration_secs,
        partial_text(&report)
    );
    if report.partial {
        pinger.ping(&pinger.failure, body).await;
    } else {
        pinger.ping(&pinger.success, body).await;
    }
}
