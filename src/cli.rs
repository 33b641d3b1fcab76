//! Command-line interface: restic-like verbs over the library, human output or `--json`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use immich_backup::backup::{self, BackupReport};
use immich_backup::config::Config;
use immich_backup::crypto::{self, Identities, Recipients};
use immich_backup::error::{exit, Error, Result};
use immich_backup::progress::Progress;
use immich_backup::restore::{self, RestoreOptions, RestoreReport};
use immich_backup::store::Store;
use immich_backup::{db, demo, snapshot};

#[derive(Parser)]
#[command(
    name = "immich-backup",
    version,
    about = "Encrypted, incremental, offsite backups of an Immich server"
)]
struct Cli {
    /// Config file (TOML); also IMMICH_BACKUP_CONFIG. Every key can be overridden with
    /// IMMICH_BACKUP__<SECTION>__<KEY>.
    #[arg(long, short = 'c', global = true, env = "IMMICH_BACKUP_CONFIG")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More logging (-v info, -vv debug); IMMICH_BACKUP_LOG takes a tracing filter.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No progress bar.
    #[arg(long, global = true)]
    no_progress: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an age identity file (mode 0600) and print its public key.
    Keygen {
        /// Where to write the identity; never overwritten.
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
    /// Prepare the store: create a local folder store and the repository marker.
    Init,
    /// Back up the database and the originals into a new snapshot.
    Backup,
    /// List the complete snapshots.
    Snapshots,
    /// Restore a snapshot into a fresh install.
    Restore {
        /// Snapshot id, unique id prefix, or `latest`.
        #[arg(default_value = "latest")]
        snapshot: String,
        /// age identity file (or SSH private key); default [encryption] identity_file.
        #[arg(long, short = 'i')]
        identity: Option<PathBuf>,
        /// Where to put the files; default [immich] upload_location.
        #[arg(long)]
        target: Option<PathBuf>,
        /// Check everything and print the plan; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Docker mode: stop the Immich server container ([database] server_container) before
        /// writing and start it again at the end, instead of refusing while it runs.
        #[arg(long)]
        stop_server: bool,
    },
    /// Self-contained demonstration: throwaway Postgres and sample library → backup to a local folder
    /// → restore into a second cluster and folder → verify.
    Demo {
        /// Working folder (default: a new temporary folder, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Sample database size, in asset rows.
        #[arg(long, default_value_t = 2000)]
        assets: usize,
    },
}

/// Parse, run, print; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::FAILURE;
        }
    };
    let json = cli.json;
    let code = runtime.block_on(async move {
        tokio::select! {
            r = run(cli) => r,
            _ = tokio::signal::ctrl_c() => Err(Error::Interrupted),
            _ = terminate() => Err(Error::Interrupted),
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match code {
        Ok(c) => c,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"error": e.to_string(), "exit_code": e.exit_code()})
                );
            }
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 if std::io::stderr().is_terminal() => "warn",
        0 => "info",
        1 => "info",
        _ => "debug",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("IMMICH_BACKUP_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("immich_backup={default},warn"))
        });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

async fn run(cli: Cli) -> Result<i32> {
    let progress = Progress::new(!cli.no_progress && !cli.json);
    match cli.command {
        Command::Keygen { output } => keygen(&output, cli.json),
        Command::Demo { dir, assets } => demo::run(dir.as_deref(), assets, cli.json)
            .await
            .map(|_| exit::OK),
        Command::Init => {
            let cfg = Config::load(cli.config.as_deref())?;
            init(&cfg, cli.json).await
        }
        Command::Backup => {
            let cfg = Config::load(cli.config.as_deref())?;
            let report = run_backup(&cfg, progress).await?;
            print_backup(&report, cli.json);
            Ok(if report.skipped.is_empty() {
                exit::OK
            } else {
                exit::PARTIAL
            })
        }
        Command::Snapshots => {
            let cfg = Config::load(cli.config.as_deref())?;
            snapshots(&cfg, cli.json).await
        }
        Command::Restore {
            snapshot,
            identity,
            target,
            dry_run,
            stop_server,
        } => {
            let cfg = Config::load(cli.config.as_deref())?;
            let server = if stop_server {
                restore::ServerPolicy::StopAndRestart
            } else {
                restore::ServerPolicy::Refuse
            };
            let report =
                run_restore(&cfg, snapshot, identity, target, dry_run, server, progress).await?;
            print_restore(&report, cli.json);
            Ok(if report.dry_run || report.rows_match {
                exit::OK
            } else {
                exit::DATABASE
            })
        }
    }
}

fn keygen(output: &std::path::Path, json: bool) -> Result<i32> {
    let key = crypto::generate_key();
    crypto::write_identity_file(output, &key)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"identity_file": output, "recipient": key.recipient})
        );
    } else {
        println!("Public key: {}", key.recipient);
        eprintln!(
            "Wrote the identity to {} (mode 0600). Keep it off the backed-up machine (a password manager, paper, a USB stick);\nput the public key in [encryption] recipients. Without the identity the backups cannot be restored.",
            output.display()
        );
    }
    Ok(exit::OK)
}

fn recipients(cfg: &Config) -> Result<Recipients> {
    let file = (!cfg.encryption.recipients_file.is_empty())
        .then(|| PathBuf::from(&cfg.encryption.recipients_file));
    Recipients::load(&cfg.encryption.recipients, file.as_deref())
}

async fn init(cfg: &Config, json: bool) -> Result<i32> {
    if let Ok(url) = url::Url::parse(&cfg.storage.url) {
        if url.scheme() == "file" {
            if let Ok(dir) = url.to_file_path() {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
        }
    }
    let store = Store::open(&cfg.storage)?;
    let marker = snapshot::open_or_init(&store).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"store": store.url(), "repository": marker.id, "format": marker.format})
        );
    } else {
        println!(
            "Store {} ready (repository {}, format {}).",
            store.url(),
            marker.id,
            marker.format
        );
    }
    Ok(exit::OK)
}

/// Backup with the configured database transport.
pub async fn run_backup(cfg: &Config, progress: Progress) -> Result<BackupReport> {
    let recipients = recipients(cfg)?;
    let store = Store::open(&cfg.storage)?;
    let database = db::connect(&cfg.database)?;
    backup::run(cfg, database.as_ref(), &store, recipients, progress).await
}

fn print_backup(r: &BackupReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serialises")
        );
        return;
    }
    println!("snapshot {} saved to {}", r.snapshot, r.store);
    println!(
        "  files: {} ({} new, {} unchanged, {} already stored), {} folders, {} symlinks",
        r.files, r.files_new, r.files_unchanged, r.files_deduplicated, r.dirs, r.symlinks
    );
    println!(
        "  bytes: {} in the snapshot, {} read, {} stored; database dump {} → {} stored",
        human(r.bytes_total),
        human(r.bytes_read),
        human(r.bytes_stored),
        human(r.dump_sql_bytes),
        human(r.dump_stored_bytes)
    );
    println!(
        "  tables: {}, rows: {}",
        r.row_counts.len(),
        r.row_counts.values().sum::<u64>()
    );
    println!("  duration: {:.1}s", r.duration_secs);
    if !r.skipped.is_empty() {
        println!(
            "  WARNING: {} file(s) could not be read and are NOT in this snapshot:",
            r.skipped.len()
        );
        for s in r.skipped.iter().take(20) {
            println!("    {}: {}", s.path, s.error);
        }
    }
}

async fn snapshots(cfg: &Config, json: bool) -> Result<i32> {
    let store = Store::open(&cfg.storage)?;
    snapshot::require_marker(&store).await?;
    let list = snapshot::list(&store).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("list serialises")
        );
        return Ok(exit::OK);
    }
    println!(
        "{:<29} {:<20} {:<16} {:>9} {:>10} {:>10}",
        "ID", "TIME (UTC)", "HOST", "FILES", "SIZE", "DUMP"
    );
    for s in &list {
        match &s.summary {
            Some(m) => println!(
                "{:<29} {:<20} {:<16} {:>9} {:>10} {:>10}{}",
                s.id,
                m.time.format("%Y-%m-%d %H:%M:%S"),
                m.host,
                m.files,
                human(m.bytes),
                human(m.dump_bytes),
                if m.skipped > 0 {
                    format!("  (partial: {} unreadable)", m.skipped)
                } else {
                    String::new()
                }
            ),
            None => println!("{:<29} (no summary)", s.id),
        }
    }
    println!("{} snapshot(s)", list.len());
    Ok(exit::OK)
}

async fn run_restore(
    cfg: &Config,
    snapshot: String,
    identity: Option<PathBuf>,
    target: Option<PathBuf>,
    dry_run: bool,
    server: restore::ServerPolicy,
    progress: Progress,
) -> Result<RestoreReport> {
    let identity = identity
        .or_else(|| (!cfg.encryption.identity_file.is_empty()).then(|| PathBuf::from(&cfg.encryption.identity_file)))
        .ok_or_else(|| Error::Usage("restore needs the identity: pass --identity FILE or set [encryption] identity_file".into()))?;
    let identities = Arc::new(Identities::load(&identity)?);
    let store = Store::open(&cfg.storage)?;
    let database = db::connect(&cfg.database)?;
    let opts = RestoreOptions {
        snapshot,
        dry_run,
        target: target.unwrap_or_else(|| cfg.immich.upload_location.clone()),
        concurrency: cfg.storage.concurrency,
        progress,
    };
    restore::run_with(database.as_ref(), &store, identities, opts, server).await
}

fn print_restore(r: &RestoreReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serialises")
        );
        return;
    }
    if r.dry_run {
        println!(
            "dry run: snapshot {} (taken {} on {}) can be restored:",
            r.snapshot, r.snapshot_time, r.source_host
        );
        println!(
            "  database {} onto PostgreSQL {}: no tables yet, extensions available, dump verified",
            r.database, r.server_version
        );
        println!(
            "  files: {} ({}) into {}; {} already present and identical; {} folders, {} symlinks",
            r.files,
            human(r.bytes),
            r.target,
            r.files_already_present,
            r.dirs,
            r.symlinks
        );
        println!("nothing was written.");
        return;
    }
    println!(
        "restored snapshot {} (taken {} on {})",
        r.snapshot, r.snapshot_time, r.source_host
    );
    println!(
        "  database {} replayed into PostgreSQL {}",
        r.database, r.server_version
    );
    for e in &r.benign_psql_errors {
        println!("    expected psql message (harmless): {}", e.trim());
    }
    println!(
        "  files: {} written, {} already present, {} total ({}) in {}",
        r.files_restored,
        r.files_already_present,
        r.files,
        human(r.bytes),
        r.target
    );
    let bad: Vec<_> = r
        .row_checks
        .iter()
        .filter(|c| c.expected != c.actual)
        .collect();
    if bad.is_empty() {
        println!(
            "  row counts: all {} tables match the snapshot",
            r.row_checks.len()
        );
    } else {
        println!(
            "  row counts: {} of {} tables DIFFER from the snapshot:",
            bad.len(),
            r.row_checks.len()
        );
        for c in bad {
            println!(
                "    {}: snapshot {:?}, restored {:?}",
                c.table, c.expected, c.actual
            );
        }
    }
    println!("  duration: {:.1}s", r.duration_secs);
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}
