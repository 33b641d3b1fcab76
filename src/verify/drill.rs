//! `drill`: prove a snapshot restorable without touching the running Immich, and measure how long
//! its database takes to restore.
//!
//! Under the store's shared lock: the snapshot is chosen as restore chooses it (signed by a
//! trusted key), its dump downloaded, decrypted and checked as restore checks it
//! (`restore::database::verify_dump`); then a throwaway Postgres is started ([`scratch::start`]:
//! a container from the snapshot's image in Docker mode, an `initdb` cluster in local mode), the
//! dump replayed into it exactly as restore replays it (`replay_outcome`), its row counts compared
//! with the snapshot's (`compare_rows`), and a few questions asked that Immich asks of its
//! database (`drill/queries.rs`). The throwaway server is removed whatever happened; the servers
//! of drills that were killed are removed at the start of the next one.
//!
//! Beside the replay, a sample of the snapshot's files is read back and verified as a restore reads
//! them (`--read-data-subset`, 2 % by default: [`super::read_sample`]), and the time the whole
//! library would take is extrapolated from the sample's rate.
//!
//! Nothing is written to the real database (the dump only ever goes to the throwaway server) or to
//! UPLOAD_LOCATION (the drill writes no files). The time of each phase is reported, and their sum
//! as the expected restore time of the database; the files' estimate beside it (a restore puts the
//! files back while the dump is replayed).

mod queries;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use queries::{Check, Status};

use crate::config::{DatabaseConfig, LockConfig};
use crate::crypto::Identities;
use crate::db::scratch::{self, Wanted};
use crate::db::Database;
use crate::error::{Error, Result};
use crate::format::Manifest;
use crate::progress::Progress;
use crate::repo::lock::{Lock, LockKind};
use crate::repo::trust::{self, Opened, Trust};
use crate::repo::{snapshots, Reader, Repository};
use crate::restore::database::{self, RowCheck};
use crate::verify::{read_sample, SampleRead, Subset};

/// How long a drill waits for a throwaway server dropped half-way (a lost lock) to be removed.
const SETTLE: Duration = Duration::from_secs(30);

/// Which snapshot to drill and how.
pub struct DrillOptions {
    /// `latest`, an id, or a unique id prefix.
    pub snapshot: String,
    /// Which snapshots to believe (as for a restore).
    pub trust: Trust,
    /// The store lock to take (shared); `None` with `--no-lock`.
    pub lock: Option<LockConfig>,
    pub progress: Progress,
    /// Which of the snapshot's files to read back (`None`: none).
    pub read: Option<Subset>,
    /// Downloads in flight for that.
    pub concurrency: usize,
}

/// One timed phase of the drill.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub secs: f64,
}

/// What the drill did and found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DrillReport {
    pub snapshot: String,
    /// The verification key of the snapshot's trusted signature; `None`: unsigned.
    pub signed_by: Option<String>,
    pub snapshot_time: String,
    pub source_host: String,
    pub database: String,
    /// The throwaway server the dump was replayed into, and how its image was chosen.
    pub server: String,
    pub server_version: String,
    /// Throwaway servers of killed drills that this drill removed first.
    pub leftovers_removed: Vec<String>,
    /// Download and check of the dump (`dump`), start of the throwaway server (`server`), the
    /// replay (`replay`), the checks (`checks`).
    pub phases: Vec<Phase>,
    /// The sum of the phases: what restoring the database takes, on this machine and store.
    pub expected_restore_secs: f64,
    /// The snapshot's dump (its gzip) and its files, whose download comes on top in a restore.
    pub dump_bytes: u64,
    pub files: u64,
    pub bytes: u64,
    pub checks: Vec<Check>,
    pub row_checks: Vec<RowCheck>,
    /// psql messages a replay always prints (harmless).
    pub benign_psql_errors: Vec<String>,
    /// The sample of files read back, and how long it took.
    pub files_read: Option<SampleRead>,
    pub files_read_secs: f64,
    /// All the snapshot's files at the sample's rate: what putting them back would take.
    pub files_estimated_secs: Option<f64>,
    /// Removing the throwaway server.
    pub cleanup_secs: f64,
    pub warnings: Vec<String>,
    /// Every check passed (or did not apply).
    pub ok: bool,
}

impl DrillReport {
    fn new(opened: &Opened) -> DrillReport {
        let m = &opened.manifest;
        DrillReport {
            snapshot: opened.id.clone(),
            signed_by: opened.signed_by.as_ref().map(ToString::to_string),
            snapshot_time: m.time.to_rfc3339(),
            source_host: m.host.clone(),
            database: m.database.database.clone(),
            dump_bytes: m.dump.size,
            files: m.totals.files,
            bytes: m.totals.bytes,
            ..Default::default()
        }
    }

    /// Record phase `name`, begun at `since`.
    fn phase(&mut self, name: &str, since: Instant) {
        let secs = since.elapsed().as_secs_f64();
        tracing::info!(phase = name, secs, "drill phase done");
        self.phases.push(Phase {
            name: name.to_string(),
            secs,
        });
    }

    fn finish(mut self) -> DrillReport {
        self.expected_restore_secs = self.phases.iter().map(|p| p.secs).sum();
        self.ok = !self.checks.is_empty() && self.checks.iter().all(|c| c.status != Status::Fail);
        self
    }
}

/// Run a drill of `opts.snapshot` into a throwaway server made as `cfg` runs Postgres.
pub async fn drill(
    cfg: &DatabaseConfig,
    repo: &Repository,
    identities: Arc<Identities>,
    opts: DrillOptions,
) -> Result<DrillReport> {
    snapshots::require_marker(repo).await?;
    let leftovers = scratch::remove_leftovers(cfg).await?;
    let reader = repo.unlock(identities).await?;
    let work = run(cfg, &reader, &opts);
    let result = match &opts.lock {
        Some(lock) => Lock::hold(repo, LockKind::Shared, "drill", lock, work).await,
        None => {
            tracing::warn!("--no-lock: drilling without the store lock; a prune running meanwhile could delete the dump the drill reads");
            work.await
        }
    };
    // A server whose drill was stopped half-way (the lock lost) is gone before this returns.
    scratch::settle(SETTLE).await;
    let mut report = result?;
    report.leftovers_removed = leftovers;
    Ok(report)
}

async fn run(cfg: &DatabaseConfig, reader: &Reader, opts: &DrillOptions) -> Result<DrillReport> {
    let since = Instant::now();
    let opened = trust::resolve(reader, &opts.trust, &opts.snapshot).await?;
    let mut report = DrillReport::new(&opened);
    let m = &opened.manifest;
    tracing::info!(snapshot = %opened.id, "drill: checking the dump");
    let dump = dump_check(reader, m).await?;
    report.phase("dump", since);
    let dump_ok = dump.status == Status::Pass;
    report.checks.push(dump);
    if !dump_ok {
        return Ok(report.finish());
    }
    let since = Instant::now();
    let wanted = Wanted {
        image: m.database.image.clone(),
        username: m.database.username.clone(),
        database: m.database.database.clone(),
        extensions: m
            .database
            .extensions
            .iter()
            .map(|e| e.name.clone())
            .collect(),
    };
    let server = scratch::start(cfg, &wanted).await?;
    report.phase("server", since);
    report.server = server.describe().to_string();
    tracing::info!(server = %report.server, "drill: replaying into a throwaway server");
    let (checked, sample) = tokio::join!(
        on_server(server.db(), reader, m, &opts.progress, &mut report),
        sample_files(reader, m, opts)
    );
    let checked = checked.map_err(|e| match e {
        Error::Database(message) => {
            Error::Database(format!("the drill's throwaway server: {message}"))
        }
        other => other,
    });
    let since = Instant::now();
    let removed = server.remove().await;
    report.cleanup_secs = since.elapsed().as_secs_f64();
    checked?;
    record_sample(&mut report, sample?);
    if let Err(e) = removed {
        report.warnings.push(format!(
            "the throwaway server could not be removed ({e}); the next drill removes it"
        ));
    }
    Ok(report.finish())
}

/// Read `opts.read` of the snapshot's files back; with how long it took.
async fn sample_files(
    reader: &Reader,
    m: &Manifest,
    opts: &DrillOptions,
) -> Result<Option<(SampleRead, f64)>> {
    let Some(which) = opts.read else {
        return Ok(None);
    };
    let since = Instant::now();
    // The replay has the progress bar.
    let read = read_sample(reader, m, which, opts.concurrency, &Progress::hidden()).await?;
    Ok(Some((read, since.elapsed().as_secs_f64())))
}

/// The sample's verdict, and the time all files would take at its rate.
fn record_sample(report: &mut DrillReport, sample: Option<(SampleRead, f64)>) {
    let Some((read, secs)) = sample else {
        return;
    };
    const CHECK: &str = "files";
    let check = if read.damaged.is_empty() {
        Check::pass(
            CHECK,
            Some(read.objects),
            format!(
                "{} file content(s) of {} ({} bytes) read back and verified against their addresses",
                read.objects, report.files, read.bytes
            ),
        )
    } else {
        let first: Vec<String> = read
            .damaged
            .iter()
            .take(5)
            .map(|(path, object, why)| format!("{path} ({object}: {why})"))
            .collect();
        Check::fail(
            CHECK,
            format!(
                "{} file(s) would not be restored: {}{}",
                read.damaged.len(),
                first.join("; "),
                if read.damaged.len() > 5 { "; …" } else { "" }
            ),
        )
    };
    report.checks.push(check);
    if read.bytes > 0 && secs > 0.0 {
        report.files_estimated_secs = Some(report.bytes as f64 / (read.bytes as f64 / secs));
    }
    report.files_read = Some(read);
    report.files_read_secs = secs;
}

/// The dump downloaded, decrypted and checked: a missing or damaged dump is a failed check.
async fn dump_check(reader: &Reader, m: &Manifest) -> Result<Check> {
    const CHECK: &str = "dump";
    match database::verify_dump(reader, m).await {
        Ok(_) => Ok(Check::pass(
            CHECK,
            Some(m.dump.size),
            format!(
                "{} downloaded, decrypted, matches the manifest's SHA-256 and holds only what pg_dumpall writes",
                m.dump.key
            ),
        )),
        Err(e @ (Error::Missing { .. } | Error::Corrupt { .. })) => {
            Ok(Check::fail(CHECK, e.to_string()))
        }
        Err(e) => Err(e),
    }
}

/// Replay into the throwaway server `db`, then compare and ask.
async fn on_server(
    db: &dyn Database,
    reader: &Reader,
    m: &Manifest,
    progress: &Progress,
    report: &mut DrillReport,
) -> Result<()> {
    let since = Instant::now();
    report.server_version = database::check_target(db, m).await?;
    progress.phase("replay", Some(m.dump.size));
    let replayed = database::replay_outcome(db, reader, m, progress).await;
    progress.finish();
    let replayed = replayed?;
    report.phase("replay", since);
    report.benign_psql_errors = replayed.benign;
    if let Some(first) = replayed.stopped_at {
        let why = format!("psql stopped at the first error: {first}");
        report.checks.push(Check::fail("replay", why));
        return Ok(());
    }
    let detail = format!(
        "psql replayed the dump into PostgreSQL {} without an error",
        report.server_version
    );
    report.checks.push(Check::pass("replay", None, detail));
    let since = Instant::now();
    let rows = database::compare_rows(db, m).await?;
    report.checks.push(rows_check(&rows));
    let assets = ["public.asset", "public.assets"]
        .iter()
        .find_map(|t| rows.iter().find(|r| r.table == *t)?.actual);
    report
        .checks
        .extend(queries::run(db, &m.database.database, assets).await);
    report.row_checks = rows;
    report.phase("checks", since);
    Ok(())
}

/// Every table holds the snapshot's rows.
fn rows_check(rows: &[RowCheck]) -> Check {
    const CHECK: &str = "row counts";
    let differ: Vec<String> = rows
        .iter()
        .filter(|r| r.expected != r.actual)
        .map(|r| {
            let n = |c: Option<u64>| c.map_or("none".to_string(), |c| c.to_string());
            format!(
                "{}: snapshot {}, replayed {}",
                r.table,
                n(r.expected),
                n(r.actual)
            )
        })
        .collect();
    if differ.is_empty() {
        let total: u64 = rows.iter().filter_map(|r| r.actual).sum();
        let detail = format!(
            "all {} tables hold the snapshot's rows ({total} rows)",
            rows.len()
        );
        return Check::pass(CHECK, Some(rows.len() as u64), detail);
    }
    Check::fail(
        CHECK,
        format!(
            "{} of {} tables differ from the snapshot: {}",
            differ.len(),
            rows.len(),
            differ.join("; ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(table: &str, expected: Option<u64>, actual: Option<u64>) -> RowCheck {
        RowCheck {
            table: table.into(),
            expected,
            actual,
        }
    }

    #[test]
    fn row_counts_pass_only_when_every_table_matches() {
        let same = [
            row("public.asset", Some(3), Some(3)),
            row("public.album", Some(1), Some(1)),
        ];
        let check = rows_check(&same);
        assert_eq!((check.status, check.count), (Status::Pass, Some(2)));
        assert!(check.detail.contains("4 rows"), "{}", check.detail);
        let differ = [
            row("public.asset", Some(3), Some(2)),
            row("public.extra", None, Some(1)),
        ];
        let check = rows_check(&differ);
        assert_eq!(check.status, Status::Fail);
        assert!(
            check
                .detail
                .contains("public.asset: snapshot 3, replayed 2"),
            "{}",
            check.detail
        );
        assert!(
            check
                .detail
                .contains("public.extra: snapshot none, replayed 1"),
            "{}",
            check.detail
        );
    }

    #[test]
    fn a_drill_is_ok_when_it_checked_something_and_nothing_failed() {
        let report = |checks: Vec<Check>| {
            DrillReport {
                checks,
                phases: vec![
                    Phase {
                        name: "dump".into(),
                        secs: 1.5,
                    },
                    Phase {
                        name: "replay".into(),
                        secs: 2.0,
                    },
                ],
                ..Default::default()
            }
            .finish()
        };
        assert!(!report(Vec::new()).ok, "nothing checked is not a pass");
        let skipped = Check::new("vector indexes", Status::Skipped, None, String::new());
        let done = report(vec![Check::pass("dump", None, String::new()), skipped]);
        assert!(done.ok);
        assert_eq!(done.expected_restore_secs, 3.5);
        assert!(!report(vec![Check::fail("replay", "psql stopped".into())]).ok);
    }
}
