//! The agent's state, its health verdict, Prometheus metrics, and the HTTP endpoint serving them.
//!
//! `/healthz` answers 200 when the last backup succeeded, the next one is not overdue and the last
//! checks (`[check]`) found nothing, 503 with the reason otherwise; `/metrics` answers in the Prometheus text format. The verdict is a pure
//! function of the state, the schedule and `now` ([`status`]), so it is tested without a server or
//! a clock. The server is hyper's HTTP/1 server, off unless `[agent] listen` is set.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::parse_listen;
use crate::error::{Error, Result};
use crate::format::{Consistency, Verdict};
use crate::policy::schedule::Schedule;

/// A successful backup.
#[derive(Debug, Clone, Serialize)]
pub struct Success {
    pub snapshot: String,
    /// The snapshot's time (when its backup started).
    pub time: DateTime<Utc>,
    /// Seconds the backup took; `None` for a snapshot found in the store at start-up.
    pub duration_secs: Option<f64>,
    pub files: u64,
    pub bytes: u64,
    /// Files that could not be read (the snapshot is partial when > 0).
    pub skipped: u64,
    /// The snapshot's consistency counts; `None` for a snapshot of an older version.
    pub consistency: Option<Consistency>,
    /// Missing files make the snapshot partial (`[backup] on_missing_original = "warn"`).
    pub missing_is_partial: bool,
}

impl Success {
    /// Files the database names that the snapshot lacks (missing, or left out by `[immich]
    /// exclude`), when they make it partial.
    fn partial_missing(&self) -> u64 {
        match &self.consistency {
            Some(c) if self.missing_is_partial => c.missing() + c.excluded,
            _ => 0,
        }
    }
}

/// A failed backup.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub time: DateTime<Utc>,
    pub error: String,
}

/// What one scheduled check found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub time: DateTime<Utc>,
    /// `check`, `check --identity`, or `read-data 3/7`.
    pub what: String,
    pub ok: bool,
    pub problems: u64,
    /// The first problem, or why the check could not run.
    pub reason: String,
    /// Content bytes read back and verified.
    pub bytes_verified: u64,
    pub duration_secs: f64,
}

/// What the agent knows; updated by the agent loop, read by the endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct AgentState {
    pub started: DateTime<Utc>,
    /// A backup (or its retention and prune) is running since then.
    pub running_since: Option<DateTime<Utc>>,
    pub next_run: Option<DateTime<Utc>>,
    pub last_success: Option<Success>,
    /// The last failure, if it came after the last success.
    pub last_failure: Option<Failure>,
    pub successes_total: u64,
    pub failures_total: u64,
    pub prune_failures_total: u64,
    /// Complete snapshots in the store after the last retention run.
    pub snapshots: u64,
    /// Objects and bytes in the store (`data/` and `snapshots/`).
    pub store_objects: u64,
    pub store_bytes: u64,
    /// The last `[check] cron` run.
    pub last_check: Option<CheckResult>,
    /// The last `[check] read_data_cron` run.
    pub last_read: Option<CheckResult>,
    /// Read-data slices that found damage, by slice number, until a later read of the same slice
    /// finds none (another slice passing says nothing of them).
    pub damaged_slices: std::collections::BTreeMap<u32, CheckResult>,
    pub checks_total: u64,
    pub check_failures_total: u64,
    pub bytes_verified_total: u64,
    /// The requests sent to the store since the agent started, by kind, after the last job.
    pub traffic: crate::store::meter::TrafficCounts,
}

impl AgentState {
    pub fn new(started: DateTime<Utc>) -> AgentState {
        AgentState {
            started,
            running_since: None,
            next_run: None,
            last_success: None,
            last_failure: None,
            successes_total: 0,
            failures_total: 0,
            prune_failures_total: 0,
            snapshots: 0,
            store_objects: 0,
            store_bytes: 0,
            last_check: None,
            last_read: None,
            damaged_slices: Default::default(),
            checks_total: 0,
            check_failures_total: 0,
            bytes_verified_total: 0,
            traffic: Default::default(),
        }
    }
}

/// The health verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub ok: bool,
    pub reason: String,
}

fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// Healthy when the last backup succeeded (fully) and the backup due after it is not overdue: the
/// first scheduled time after the last successful snapshot (or after the agent started, when there
/// is none) plus `grace` (`None`: one schedule interval) has not passed.
pub fn status(
    state: &AgentState,
    schedule: &Schedule,
    grace: Option<Duration>,
    now: DateTime<Utc>,
) -> Health {
    if let Some(f) = &state.last_failure {
        return Health {
            ok: false,
            reason: format!("last backup failed at {}: {}", ts(f.time), f.error),
        };
    }
    if let Some(s) = state.last_success.as_ref().filter(|s| s.skipped > 0) {
        return Health {
            ok: false,
            reason: format!(
                "last backup {} is partial: {} file(s) could not be read (see `immich-backup backup` output or the logs)",
                s.snapshot, s.skipped
            ),
        };
    }
    if let Some(s) = state
        .last_success
        .as_ref()
        .filter(|s| s.partial_missing() > 0)
    {
        return Health {
            ok: false,
            reason: format!(
                "last backup {} is partial: {} file(s) Immich's database names are not in it (see `immich-backup backup` output or the logs; [backup] on_missing_original = \"ignore\" accepts them)",
                s.snapshot,
                s.partial_missing()
            ),
        };
    }
    if let Some(c) = state
        .last_check
        .iter()
        .chain(state.damaged_slices.values())
        .find(|c| !c.ok)
    {
        return Health {
            ok: false,
            reason: format!("{} at {} found a problem: {}", c.what, ts(c.time), c.reason),
        };
    }
    let reference = state
        .last_success
        .as_ref()
        .map(|s| s.time)
        .unwrap_or(state.started);
    let Some(due) = schedule.next_after(reference) else {
        return Health {
            ok: true,
            reason: "ok: the schedule has no further run".into(),
        };
    };
    let grace = match grace {
        Some(g) => chrono::Duration::from_std(g).unwrap_or(chrono::Duration::MAX),
        None => schedule
            .next_after(due)
            .map(|n| n - due)
            .unwrap_or(chrono::Duration::zero()),
    };
    let deadline = due + grace;
    let last = match &state.last_success {
        Some(s) => format!("last successful backup {} at {}", s.snapshot, ts(s.time)),
        None => "no successful backup yet".into(),
    };
    if now > deadline {
        return Health {
            ok: false,
            reason: format!(
                "overdue: {last}; a backup was due at {} and has not succeeded by {}",
                ts(due),
                ts(deadline)
            ),
        };
    }
    let next = match (state.running_since, state.next_run) {
        (Some(r), _) => format!("a backup is running since {}", ts(r)),
        (None, Some(n)) => format!("next run at {}", ts(n)),
        (None, None) => String::new(),
    };
    Health {
        ok: true,
        reason: format!("ok: {last}; {next}"),
    }
}

/// Every metric: name, type, help; one a line. Values come from [`metric_value`].
const METRICS: &str = "\
immich_backup_up gauge 1 when /healthz reports healthy.
immich_backup_last_success_timestamp_seconds gauge Unix time of the last successful backup's snapshot (0: none).
immich_backup_last_duration_seconds gauge How long the last successful backup took.
immich_backup_last_files gauge Files in the last successful snapshot.
immich_backup_last_bytes gauge Bytes of files in the last successful snapshot.
immich_backup_last_skipped_files gauge Files the last successful snapshot could not read.
immich_backup_last_consistency_checked gauge 1 when the last successful backup compared the database with its files.
immich_backup_last_assets gauge Assets whose original the last successful snapshot should hold.
immich_backup_last_missing_originals gauge Assets whose original is not in the last successful snapshot.
immich_backup_last_missing_sidecars gauge Sidecars the database names that are not in the last successful snapshot.
immich_backup_last_orphan_files gauge Files under library/ and upload/ that no asset names, in the last successful snapshot.
immich_backup_last_external_assets gauge Assets outside UPLOAD_LOCATION and every backed-up external library (not in the snapshot).
immich_backup_store_bytes gauge Bytes stored in the store (content and snapshots).
immich_backup_store_objects gauge Objects in the store (content and snapshots).
immich_backup_snapshots gauge Complete snapshots kept in the store.
immich_backup_successes_total counter Backups that succeeded since the agent started.
immich_backup_failures_total counter Backups that failed since the agent started.
immich_backup_prune_failures_total counter Retention or prune runs that failed since the agent started.
immich_backup_running gauge 1 while a backup, retention or prune runs.
immich_backup_next_run_timestamp_seconds gauge Unix time of the next scheduled backup (0: none).
immich_backup_check_last_timestamp_seconds gauge Unix time of the last [check] cron run (0: none yet).
immich_backup_check_last_ok gauge 1 when the last [check] cron run found no problem (or none ran yet).
immich_backup_check_last_problems gauge Problems the last [check] cron run found.
immich_backup_read_data_last_timestamp_seconds gauge Unix time of the last [check] read_data_cron run (0: none yet).
immich_backup_read_data_last_ok gauge 1 when the last [check] read_data_cron run found no problem (or none ran yet).
immich_backup_read_data_last_problems gauge Problems the last [check] read_data_cron run found.
immich_backup_read_data_damaged_slices gauge Read-data slices whose last read found damage.
immich_backup_checks_total counter Checks (of both kinds) run since the agent started.
immich_backup_check_failures_total counter Checks that found a problem or could not run, since the agent started.
immich_backup_verified_bytes_total counter Content bytes read back and verified by checks since the agent started.
immich_backup_store_put_requests_total counter Single-request object writes sent to the store since the agent started.
immich_backup_store_part_requests_total counter Multipart parts sent to the store since the agent started.
immich_backup_store_multipart_requests_total counter Multipart uploads created, completed or aborted since the agent started.
immich_backup_store_get_requests_total counter Downloads from the store since the agent started.
immich_backup_store_head_requests_total counter HEAD requests to the store since the agent started.
immich_backup_store_list_requests_total counter Listing pages requested from the store since the agent started.
immich_backup_store_delete_requests_total counter Objects deleted from the store since the agent started.
immich_backup_store_sent_bytes_total counter Object bytes sent to the store since the agent started.
immich_backup_store_received_bytes_total counter Object bytes received from the store since the agent started.";

/// The Prometheus text exposition of `state`.
pub fn metrics(state: &AgentState, health: &Health) -> String {
    let mut out = String::new();
    for line in METRICS.lines() {
        let mut parts = line.splitn(3, ' ');
        let (name, kind, help) = (parts.next(), parts.next(), parts.next());
        let (Some(name), Some(kind), Some(help)) = (name, kind, help) else {
            continue;
        };
        let value = metric_value(name, state, health);
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
}

/// The value of metric `name` (one of [`METRICS`]).
fn metric_value(name: &str, state: &AgentState, health: &Health) -> String {
    let secs = |t: Option<DateTime<Utc>>| {
        t.map(|t| format!("{:.3}", t.timestamp_millis() as f64 / 1000.0))
            .unwrap_or_else(|| "0".into())
    };
    let s = state.last_success.as_ref();
    let last = |f: fn(&Success) -> u64| s.map(f).unwrap_or(0).to_string();
    let consistency = s.and_then(|s| s.consistency.as_ref());
    let count = |f: fn(&Consistency) -> u64| consistency.map(f).unwrap_or(0).to_string();
    let (check, read) = (state.last_check.as_ref(), state.last_read.as_ref());
    let ok = |c: Option<&CheckResult>| c.map(|c| u8::from(c.ok)).unwrap_or(1).to_string();
    let problems = |c: Option<&CheckResult>| c.map(|c| c.problems).unwrap_or(0).to_string();
    match name {
        "immich_backup_up" => u8::from(health.ok).to_string(),
        "immich_backup_last_success_timestamp_seconds" => secs(s.map(|s| s.time)),
        "immich_backup_last_duration_seconds" => s
            .and_then(|s| s.duration_secs)
            .map(|d| format!("{d:.3}"))
            .unwrap_or_else(|| "0".into()),
        "immich_backup_last_files" => last(|s| s.files),
        "immich_backup_last_bytes" => last(|s| s.bytes),
        "immich_backup_last_skipped_files" => last(|s| s.skipped),
        "immich_backup_store_bytes" => state.store_bytes.to_string(),
        "immich_backup_store_objects" => state.store_objects.to_string(),
        "immich_backup_snapshots" => state.snapshots.to_string(),
        "immich_backup_successes_total" => state.successes_total.to_string(),
        "immich_backup_failures_total" => state.failures_total.to_string(),
        "immich_backup_prune_failures_total" => state.prune_failures_total.to_string(),
        "immich_backup_running" => u8::from(state.running_since.is_some()).to_string(),
        "immich_backup_next_run_timestamp_seconds" => secs(state.next_run),
        "immich_backup_check_last_timestamp_seconds" => secs(check.map(|c| c.time)),
        "immich_backup_check_last_ok" => ok(check),
        "immich_backup_check_last_problems" => problems(check),
        "immich_backup_read_data_last_timestamp_seconds" => secs(read.map(|c| c.time)),
        "immich_backup_read_data_last_ok" => ok(read),
        "immich_backup_read_data_last_problems" => problems(read),
        "immich_backup_read_data_damaged_slices" => state.damaged_slices.len().to_string(),
        "immich_backup_checks_total" => state.checks_total.to_string(),
        "immich_backup_check_failures_total" => state.check_failures_total.to_string(),
        "immich_backup_verified_bytes_total" => state.bytes_verified_total.to_string(),
        "immich_backup_store_put_requests_total" => state.traffic.put.to_string(),
        "immich_backup_store_part_requests_total" => state.traffic.part.to_string(),
        "immich_backup_store_multipart_requests_total" => state.traffic.multipart.to_string(),
        "immich_backup_store_get_requests_total" => state.traffic.get.to_string(),
        "immich_backup_store_head_requests_total" => state.traffic.head.to_string(),
        "immich_backup_store_list_requests_total" => state.traffic.list.to_string(),
        "immich_backup_store_delete_requests_total" => state.traffic.delete.to_string(),
        "immich_backup_store_sent_bytes_total" => state.traffic.bytes_sent.to_string(),
        "immich_backup_store_received_bytes_total" => state.traffic.bytes_received.to_string(),
        "immich_backup_last_consistency_checked" => {
            u8::from(consistency.is_some_and(|c| c.verdict != Verdict::Unchecked)).to_string()
        }
        "immich_backup_last_assets" => count(|c| c.assets),
        "immich_backup_last_missing_originals" => count(|c| c.missing_originals),
        "immich_backup_last_missing_sidecars" => count(|c| c.missing_sidecars),
        "immich_backup_last_orphan_files" => count(|c| c.orphans),
        "immich_backup_last_external_assets" => count(|c| c.external_assets),
        _ => unreachable!("every metric of METRICS has a value: {name}"),
    }
}

/// What the endpoint reads.
pub struct Shared {
    pub state: Mutex<AgentState>,
    pub schedule: Schedule,
    pub grace: Option<Duration>,
}

impl Shared {
    pub fn status(&self) -> Health {
        let state = self.state.lock().expect("not poisoned").clone();
        status(&state, &self.schedule, self.grace, Utc::now())
    }

    pub fn update(&self, f: impl FnOnce(&mut AgentState)) {
        f(&mut self.state.lock().expect("not poisoned"));
    }
}

fn respond(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, ctype: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .header("cache-control", "no-store")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => {
            let h = shared.status();
            let code = if h.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, "text/plain; charset=utf-8", format!("{}\n", h.reason))
        }
        "/metrics" => {
            let h = shared.status();
            let state = shared.state.lock().expect("not poisoned").clone();
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics(&state, &h),
            )
        }
        "/" => text(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "immich-backup agent: /healthz, /metrics\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /healthz or /metrics\n".into(),
        ),
    }
}

/// Bind the endpoint (so a bad address fails start-up) and serve it until `shutdown`.
pub async fn start(
    listen: &str,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let addr = parse_listen(listen)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("[agent] listen {listen}: cannot listen: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Other(e.to_string()))?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "health endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = respond(&req, &shared);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    });
    tracing::info!(address = %bound, "health endpoint listening: /healthz, /metrics");
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn success(time: &str) -> Success {
        Success {
            snapshot: "20260310T000000Z-00000001".into(),
            time: t(time),
            duration_secs: Some(12.5),
            files: 42,
            bytes: 4096,
            skipped: 0,
            consistency: None,
            missing_is_partial: true,
        }
    }

    #[test]
    fn health_verdicts() {
        let daily = Schedule::parse("@daily", "UTC").unwrap();
        let mut st = AgentState::new(t("2026-03-10T08:00:00Z"));

        // No backup yet: healthy until the first run is overdue (one interval of grace by default).
        let h = status(&st, &daily, None, t("2026-03-10T09:00:00Z"));
        assert!(h.ok, "{h:?}");
        assert!(h.reason.contains("no successful backup yet"), "{h:?}");
        let h = status(&st, &daily, None, t("2026-03-12T00:00:01Z"));
        assert!(!h.ok);
        assert!(h.reason.starts_with("overdue"), "{h:?}");

        // A success at midnight: fine until the next midnight plus the grace.
        st.last_success = Some(success("2026-03-11T00:00:00Z"));
        assert!(status(&st, &daily, None, t("2026-03-12T12:00:00Z")).ok);
        assert!(status(&st, &daily, None, t("2026-03-13T00:00:00Z")).ok);
        assert!(!status(&st, &daily, None, t("2026-03-13T00:00:01Z")).ok);
        // With an explicit grace of one hour.
        let hour = Some(Duration::from_secs(3600));
        assert!(status(&st, &daily, hour, t("2026-03-12T01:00:00Z")).ok);
        let h = status(&st, &daily, hour, t("2026-03-12T01:00:01Z"));
        assert!(!h.ok);
        assert!(
            h.reason.contains("due at 2026-03-12 00:00:00 UTC"),
            "{}",
            h.reason
        );

        // A failure after the success: unhealthy with the error, whatever the time.
        st.last_failure = Some(Failure {
            time: t("2026-03-12T00:00:05Z"),
            error: "database: connection refused".into(),
        });
        let h = status(&st, &daily, None, t("2026-03-12T00:01:00Z"));
        assert!(!h.ok);
        assert!(h.reason.contains("connection refused"), "{h:?}");

        // A partial snapshot is reported.
        st.last_failure = None;
        st.last_success.as_mut().unwrap().skipped = 2;
        let h = status(&st, &daily, None, t("2026-03-11T00:01:00Z"));
        assert!(!h.ok);
        assert!(h.reason.contains("partial"), "{h:?}");

        // So is one that lacks files the database names, unless they are accepted.
        let last = st.last_success.as_mut().unwrap();
        last.skipped = 0;
        last.consistency = Some(Consistency {
            verdict: Verdict::Missing,
            missing_originals: 3,
            ..Consistency::default()
        });
        let h = status(&st, &daily, None, t("2026-03-11T00:01:00Z"));
        assert!(!h.ok);
        assert!(
            h.reason.contains("3 file(s) Immich's database names"),
            "{h:?}"
        );
        st.last_success.as_mut().unwrap().missing_is_partial = false;
        assert!(status(&st, &daily, None, t("2026-03-11T00:01:00Z")).ok);
    }

    #[test]
    fn metrics_text() {
        let mut st = AgentState::new(t("2026-03-10T08:00:00Z"));
        st.last_success = Some(Success {
            consistency: Some(Consistency {
                verdict: Verdict::Missing,
                assets: 1000,
                missing_originals: 2,
                orphans: 5,
                external_assets: 7,
                ..Consistency::default()
            }),
            ..success("2026-03-11T00:00:00Z")
        });
        st.snapshots = 3;
        st.store_bytes = 123456;
        st.failures_total = 2;
        let text = metrics(
            &st,
            &Health {
                ok: true,
                reason: String::new(),
            },
        );
        for line in [
            "immich_backup_up 1",
            "immich_backup_last_success_timestamp_seconds 1773187200.000",
            "immich_backup_last_duration_seconds 12.500",
            "immich_backup_last_files 42",
            "immich_backup_store_bytes 123456",
            "immich_backup_snapshots 3",
            "immich_backup_failures_total 2",
            "# TYPE immich_backup_failures_total counter",
            "immich_backup_running 0",
            "immich_backup_last_consistency_checked 1",
            "immich_backup_last_assets 1000",
            "immich_backup_last_missing_originals 2",
            "immich_backup_last_missing_sidecars 0",
            "immich_backup_last_orphan_files 5",
            "immich_backup_last_external_assets 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen(":9090").unwrap(),
            "0.0.0.0:9090".parse().unwrap()
        );
        assert_eq!(
            parse_listen("127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert!(parse_listen("localhost").is_err());
    }
}
