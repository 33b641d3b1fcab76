//! Command-line interface: restic-like verbs over the library, human output or `--json`.

mod browse;
mod key;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use age::secrecy::{ExposeSecret, SecretString};
use clap::{Parser, Subcommand};
use immich_backup::agent;
use immich_backup::backup::{self, BackupReport};
use immich_backup::config::Config;
use immich_backup::crypto::sign;
use immich_backup::crypto::{self, Identities, Recipients};
use immich_backup::error::{exit, Error, Result};
use immich_backup::format::{Consistency, ContentId, Verdict};
use immich_backup::maintenance;
use immich_backup::notify::{self, Notifier};
use immich_backup::policy::retention::{RetentionConfig, Within};
use immich_backup::policy::schedule;
use immich_backup::progress::Progress;
use immich_backup::repo::lock;
use immich_backup::repo::trust::{self, Trust};
use immich_backup::repo::Repository;
use immich_backup::restore::selective::{self, Outcome, SelectOptions, SelectReport};
use immich_backup::restore::{self, RestoreOptions, RestoreReport};
use immich_backup::store::check as storecheck;
use immich_backup::verify::drill::{self, DrillOptions, DrillReport, Status};
use immich_backup::verify::{self, Subset};
use immich_backup::{db, demo, repo};

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
    /// Log lines as text (coloured only on a terminal, never with NO_COLOR set) or as JSON, one
    /// object a line (for Loki, journald pipelines, …); also IMMICH_BACKUP_LOG_FORMAT.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "IMMICH_BACKUP_LOG_FORMAT")]
    log_format: LogFormat,
    /// Most bytes a second sent to a cloud store (`20MiB/s`, `50Mbit/s`; a bare number is KiB/s);
    /// wins over [storage] upload_limit.
    #[arg(long, global = true, value_name = "RATE", value_parser = rate_flag)]
    limit_upload: Option<String>,
    /// Most bytes a second received from a cloud store; wins over [storage] download_limit.
    #[arg(long, global = true, value_name = "RATE", value_parser = rate_flag)]
    limit_download: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// A `--limit-upload`/`--limit-download` value, checked as the config key's would be.
fn rate_flag(text: &str) -> std::result::Result<String, String> {
    immich_backup::config::parse_rate(text).map(|_| text.to_string())
}

/// How log lines are written on stderr.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an age identity file and the backup machine's signing key made from it (both mode
    /// 0600), and print the public key.
    Keygen {
        /// Where to write the identity; never overwritten. Keep it off the backup machine.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Where to write the signing key, for the backup machine ([encryption] signing_key_file);
        /// default: beside the identity, `<name>.signing.key`.
        #[arg(long)]
        signing_key: Option<PathBuf>,
    },
    /// Make the backup machine's signing key: from an existing identity (age-keygen, `age -p`), so
    /// that a restore with that identity trusts what the backup signs; or, with --new, a random one
    /// whose verify key you give restore in [encryption] verify_keys (for SSH identities).
    SigningKey {
        /// The identity to make it from (on the machine that keeps it).
        #[arg(
            long,
            short = 'i',
            required_unless_present = "new",
            conflicts_with = "new"
        )]
        identity: Option<PathBuf>,
        /// A random signing key instead, not tied to any identity.
        #[arg(long)]
        new: bool,
        /// Where to write it (mode 0600; never overwritten).
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
    /// Check the store (credentials, bucket, write, read, list, conditional create, delete), then
    /// create the repository marker (a local folder store is created first).
    Init,
    /// Back up the database and the originals into a new snapshot.
    Backup {
        /// Also replace damaged content objects while the original files still exist: those
        /// named with --damaged, and any stored with a size no age file of its file can have.
        #[arg(long)]
        repair: bool,
        /// The damaged objects to replace: a `restore --json` report (its "damaged" list), or a
        /// file with one `data/…` key or content address per line. Implies --repair.
        #[arg(long, value_name = "FILE")]
        damaged: Option<PathBuf>,
    },
    /// List the complete snapshots.
    Snapshots,
    /// Restore a snapshot into a fresh install.
    Restore {
        /// Snapshot id, unique id prefix, or `latest`.
        #[arg(default_value = "latest")]
        snapshot: String,
        #[command(flatten)]
        access: Access,
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
        /// Restore setuid, setgid and sticky bits as recorded (by default they are dropped).
        #[arg(long)]
        keep_special_modes: bool,
        #[command(flatten)]
        select: SelectArgs,
        /// Leave file owners alone. By default, running as root, every restored file, folder and
        /// symlink gets the uid and gid recorded at backup (not root: owners are left as they come).
        #[arg(long)]
        no_owner: bool,
    },
    /// Restore drill: replay a snapshot's dump into a throwaway Postgres (Docker mode: a container
    /// from the snapshot's image; local mode: an initdb cluster), compare its row counts with the
    /// snapshot's, run Immich's queries, remove the server, and report the time as the expected
    /// restore time. Never touches the real database or UPLOAD_LOCATION. Exit 4 when a check fails.
    Drill {
        /// Snapshot id, unique id prefix, or `latest`.
        #[arg(default_value = "latest")]
        snapshot: String,
        #[command(flatten)]
        access: Access,
        /// Which of the snapshot's files to read back and verify beside the replay: `5%`, `2G`
        /// (random), or `n/m` (a fixed slice).
        #[arg(long, value_name = "SUBSET", default_value = "2%")]
        read_data_subset: Subset,
        /// Read no files back (the database only).
        #[arg(long, conflicts_with = "read_data_subset")]
        no_read_data: bool,
    },
    /// Apply the [retention] policy: delete the snapshots it does not keep (manifest first).
    /// Needs no identity. Any --keep-* flag replaces the whole [retention] policy for this run
    /// (rules not given are off; [retention] timezone still applies).
    Forget {
        /// Show what would be kept (and which rule keeps it) and what would go; change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Prune afterwards (remove content no remaining snapshot references).
        #[arg(long)]
        prune: bool,
        #[command(flatten)]
        keep: KeepFlags,
    },
    /// Check that every snapshot in the store can be restored whole: its objects and every content
    /// object it references exist (a missing or cut-off object is named with the snapshots, and
    /// with the identity the paths, that need it); leftovers are counted. Without an identity
    /// (--identity or [encryption] identity_file) only what the backup machine can read is
    /// checked; with one, manifests, file lists and dumps are read and verified too. Exit 4 when
    /// something is missing or damaged.
    Check {
        #[command(flatten)]
        access: Access,
        /// Check without the identity even if [encryption] identity_file is set.
        #[arg(long, conflicts_with_all = ["identity", "read_data", "read_data_subset"])]
        no_identity: bool,
        /// Also download, decrypt and verify every content object (needs the identity).
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Read back only part of the content: `5%` or `50G` (a random sample each run), or `n/m`
        /// (the n-th of m fixed slices: m runs read everything). Needs the identity.
        #[arg(long, value_name = "SUBSET")]
        read_data_subset: Option<String>,
    },
    /// Remove content no snapshot references and leftovers of interrupted backups. Needs no
    /// identity.
    Prune {
        /// Show what would be removed; change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
    /// Remove stale locks (left by runs that died), or with --remove-all every lock.
    Unlock {
        /// Also remove live locks: only when you are sure no other immich-backup uses the store.
        #[arg(long)]
        remove_all: bool,
    },
    /// The agent: back up on [schedule], apply [retention] and prune after each backup, serve
    /// /healthz and /metrics on [agent] listen. Stops cleanly (exit 0) on SIGTERM/SIGINT.
    Run,
    /// Ask the running agent's /healthz (at [agent] listen) and exit 0 when it is healthy, 1 when
    /// it is not or cannot be reached: a container healthcheck without curl.
    Health {
        /// The URL to ask instead of the one [agent] listen gives (then no config is needed).
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
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
    /// Notifications ([notify]): `notify test` sends a test message on every configured channel.
    Notify {
        #[command(subcommand)]
        action: NotifyAction,
    },
    /// The repository key and who holds it: `key list`, `key add RECIPIENT`, `key remove
    /// RECIPIENT`, `key rotate`, `key migrate` (docs/FORMAT.md, "Repository keys").
    Key {
        #[command(subcommand)]
        action: key::KeyAction,
    },
    #[command(flatten)]
    Browse(browse::BrowseCommand),
}

/// `notify` subcommands.
#[derive(Subcommand)]
enum NotifyAction {
    /// Send a test message on every configured channel (ntfy, webhook, e-mail), whatever
    /// [notify] on says, and report each one's result; exit 1 if any failed.
    Test,
}

/// How a command that reads snapshots with the identity gets at them (restore, drill, check).
#[derive(clap::Args)]
struct Access {
    /// age identity file (or SSH private key); default [encryption] identity_file.
    #[arg(long, short = 'i')]
    identity: Option<PathBuf>,
    /// Also accept snapshots that carry no signature (stores written by immich-backup 0.1).
    /// Anyone who can write to the store could have written such a snapshot.
    #[arg(long)]
    allow_unsigned: bool,
    /// Trust signatures by this verification key (`immich-verify1…`) too, besides the one
    /// made from the identity and [encryption] verify_keys. Repeatable.
    #[arg(long = "verify-key", value_name = "KEY")]
    verify_keys: Vec<String>,
    /// Do not take the store's shared lock (a store you may only read). A prune running
    /// meanwhile could then delete what is still to be read.
    #[arg(long)]
    no_lock: bool,
}

/// Restoring a selection: any of these makes `restore` put back only the files chosen, into
/// --target, without the database and without a fresh install.
#[derive(clap::Args, Debug, Default)]
struct SelectArgs {
    /// Restore only files matching this glob on snapshot paths (`library/admin/2024/**`,
    /// `**/*.mp4`; a folder selects what it holds). Repeatable. Files only, no database.
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Leave out files matching this glob. Repeatable.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    #[command(flatten)]
    immich: ImmichArgs,
    /// Replace files in --target that differ from the snapshot's (by default they are left as
    /// they are and listed, exit code 3).
    #[arg(long)]
    overwrite: bool,
}

impl SelectArgs {
    /// Whether a selection was asked for.
    fn any(&self) -> bool {
        !self.include.is_empty() || !self.exclude.is_empty() || self.immich.any()
    }
}

/// Immich criteria, read from the snapshot's own database (`restore` and `ls --assets`).
#[derive(clap::Args, Debug, Default)]
pub(crate) struct ImmichArgs {
    /// The originals of this Immich user (e-mail), from the snapshot's database. Repeatable.
    #[arg(long, value_name = "EMAIL")]
    user: Vec<String>,
    /// The assets of every album of this name (exact). Repeatable.
    #[arg(long, value_name = "NAME")]
    album: Vec<String>,
    /// The assets of the album with this id. Repeatable.
    #[arg(long, value_name = "ID")]
    album_id: Vec<String>,
    /// Assets captured on or after this date (YYYY-MM-DD, or RFC 3339), as Immich's timeline
    /// shows it (localDateTime).
    #[arg(long, value_name = "DATE")]
    taken_from: Option<String>,
    /// Assets captured up to this date (YYYY-MM-DD: that whole day), or RFC 3339 time.
    #[arg(long, value_name = "DATE")]
    taken_to: Option<String>,
    /// The assets whose original is no longer under UPLOAD_LOCATION (or their external
    /// library): "what did I delete". Restored into --target (default
    /// ./immich-restore-<snapshot>-<date>, never the live library), with restored-assets.csv.
    #[arg(long)]
    missing_now: bool,
}

impl ImmichArgs {
    /// Whether any criterion was given.
    fn any(&self) -> bool {
        !self.user.is_empty()
            || !self.album.is_empty()
            || !self.album_id.is_empty()
            || self.taken_from.is_some()
            || self.taken_to.is_some()
            || self.missing_now
    }

    /// The criteria, checked (`--missing-now` looks under `cfg`'s UPLOAD_LOCATION).
    fn criteria(&self, cfg: &Config) -> Result<restore::select::Criteria> {
        let taken = |t: &Option<String>, to: bool| {
            t.as_deref()
                .map(|t| restore::select::parse_taken(t, to))
                .transpose()
        };
        Ok(restore::select::Criteria {
            users: self.user.clone(),
            albums: self.album.clone(),
            album_ids: self.album_id.clone(),
            taken_from: taken(&self.taken_from, false)?,
            taken_to: taken(&self.taken_to, true)?,
            missing_now: self.missing_now.then(|| restore::select::Live {
                upload_location: cfg.immich.upload_location.clone(),
                externals: Vec::new(),
            }),
        })
    }
}

/// Where the configured external libraries are on this machine, by container path.
fn external_hosts(cfg: &Config) -> std::collections::BTreeMap<String, PathBuf> {
    cfg.immich
        .external_libraries
        .iter()
        .map(|l| (l.container_path.clone(), l.host_path.clone()))
        .collect()
}

impl Access {
    /// The identity and which snapshots to believe; `what` names the command in the error.
    fn load(&self, cfg: &Config, what: &str) -> Result<(Arc<Identities>, Trust)> {
        let identity = match (&self.identity, cfg.encryption.identity_file.as_str()) {
            (Some(path), _) => path.clone(),
            (None, "") => {
                return Err(Error::Usage(format!(
                "{what} needs the identity: pass --identity FILE or set [encryption] identity_file"
            )))
            }
            (None, file) => cfg.existing_file("[encryption] identity_file", file)?,
        };
        let mut extra = cfg.encryption.verify_keys()?;
        for k in &self.verify_keys {
            extra.push(
                k.parse()
                    .map_err(|e| Error::Usage(format!("--verify-key: {e}")))?,
            );
        }
        let identities = Arc::new(Identities::load(&identity)?);
        let trust = Trust::new(&identities, extra, self.allow_unsigned);
        Ok((identities, trust))
    }

    /// The identity when one is given or configured; without one, `None`, or when `needed` (to
    /// read data back) an error saying how to give it.
    fn load_if_any(&self, cfg: &Config, needed: bool) -> Result<Option<(Arc<Identities>, Trust)>> {
        if needed || self.identity.is_some() || !cfg.encryption.identity_file.is_empty() {
            return self.load(cfg, "reading data back").map(Some);
        }
        Ok(None)
    }

    /// The store lock to take: `None` with --no-lock.
    fn lock(&self, cfg: &Config) -> Option<immich_backup::config::LockConfig> {
        (!self.no_lock).then(|| cfg.lock.clone())
    }
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
    init_logging(cli.verbose, cli.log_format);
    // The limit flags win over the config file and the environment: they become the
    // environment's override of their key, read when the config is loaded (still one thread).
    for (flag, key) in [
        (&cli.limit_upload, "IMMICH_BACKUP__STORAGE__UPLOAD_LIMIT"),
        (
            &cli.limit_download,
            "IMMICH_BACKUP__STORAGE__DOWNLOAD_LIMIT",
        ),
    ] {
        if let Some(rate) = flag {
            std::env::set_var(key, rate);
        }
    }
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
        if let Command::Run = cli.command {
            // The agent handles signals itself: it stops cleanly and exits 0.
            return run_agent(cli.config.as_deref()).await;
        }
        let r = tokio::select! {
            r = run(cli) => r,
            _ = tokio::signal::ctrl_c() => Err(Error::Interrupted),
            _ = terminate() => Err(Error::Interrupted),
        };
        if matches!(r, Err(Error::Interrupted)) {
            // Remove the lock of the abandoned run, and a drill's throwaway server.
            tokio::join!(
                lock::settle(std::time::Duration::from_secs(2)),
                db::scratch::settle(std::time::Duration::from_secs(20)),
            );
        }
        r
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

fn init_logging(verbose: u8, format: LogFormat) {
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => {
            // Colours only for a person at a terminal: not in `docker logs`, journald or a file,
            // and never with NO_COLOR (https://no-color.org) set to anything.
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).try_init()
        }
    };
}

/// The configuration of a command that needs one: `--config`/`IMMICH_BACKUP_CONFIG`, or an
/// environment that at least names the store. Without either it would run on the built-in
/// defaults (a store at /var/backups/immich, no recipients), which is never what was meant.
fn load_config(file: Option<&std::path::Path>) -> Result<Config> {
    if file.is_none() && std::env::var_os("IMMICH_BACKUP__STORAGE__URL").is_none() {
        return Err(Error::Usage(
            "no config file: pass --config FILE or set IMMICH_BACKUP_CONFIG=FILE (start from config.example.toml, beside the README in the immich-backup sources and at /usr/share/doc/immich-backup/ in the Docker image); a config from the environment alone must at least set IMMICH_BACKUP__STORAGE__URL".into(),
        ));
    }
    Config::load(file)
}

async fn run(cli: Cli) -> Result<i32> {
    // The bar is made where a command starts its work, after any passphrase prompt: a bar ticks
    // from the moment it exists and would hide the prompt.
    let bar = !cli.no_progress && !cli.json;
    let progress = || Progress::new(bar);
    match cli.command {
        Command::Keygen {
            output,
            signing_key,
        } => keygen(&output, signing_key, cli.json),
        Command::SigningKey {
            identity,
            new,
            output,
        } => signing_key(identity.as_deref(), new, &output, cli.json),
        Command::Demo { dir, assets } => demo::run(dir.as_deref(), assets, cli.json)
            .await
            .map(|_| exit::OK),
        Command::Init => {
            let cfg = load_config(cli.config.as_deref())?;
            init(&cfg, cli.json).await
        }
        Command::Backup { repair, damaged } => {
            let cfg = load_config(cli.config.as_deref())?;
            let opts = backup::BackupOptions {
                repair: match damaged {
                    Some(path) => Some(read_damaged(&path)?),
                    None => repair.then(Default::default),
                },
            };
            let notifier = Notifier::new(&cfg.notify)?;
            let run = run_backup(&cfg, progress(), opts);
            let report = agent::daily::backup(&cfg, &notifier, run).await?;
            print_backup(&report, cli.json);
            Ok(if report.partial {
                exit::PARTIAL
            } else {
                exit::OK
            })
        }
        Command::Snapshots => {
            let cfg = load_config(cli.config.as_deref())?;
            snapshots(&cfg, cli.json).await
        }
        Command::Forget {
            dry_run,
            prune,
            keep,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            forget(&cfg, dry_run, prune, &keep, cli.json).await
        }
        Command::Check {
            access,
            no_identity,
            read_data,
            read_data_subset,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let repo = Repository::open(&cfg.storage)?;
            let read = match (read_data, read_data_subset) {
                (true, _) => Some(Subset::All),
                (false, Some(s)) => Some(s.parse()?),
                (false, None) => None,
            };
            let deep = if no_identity {
                None
            } else {
                match access.load_if_any(&cfg, read.is_some())? {
                    Some((identities, trust)) => Some(verify::Deep {
                        reader: repo.unlock(identities).await?,
                        trust,
                        read,
                        concurrency: cfg.storage.concurrency,
                        progress: progress(),
                    }),
                    None => None,
                }
            };
            let opts = verify::CheckOptions {
                lock: access.lock(&cfg),
                deep,
            };
            let report = verify::check(&repo, opts).await?;
            if cli.json {
                print_json(&report);
            } else {
                print_check(&report);
            }
            Ok(if report.ok { exit::OK } else { exit::DAMAGED })
        }
        Command::Prune { dry_run } => {
            let cfg = load_config(cli.config.as_deref())?;
            let repo = Repository::open(&cfg.storage)?;
            let report = maintenance::prune(&repo, &cfg.lock, dry_run).await?;
            if cli.json {
                print_json(&report);
            } else {
                print_prune(&report);
            }
            Ok(exit::OK)
        }
        Command::Unlock { remove_all } => {
            let cfg = load_config(cli.config.as_deref())?;
            unlock(&cfg, remove_all, cli.json).await
        }
        Command::Run => unreachable!("handled before"),
        Command::Health { url, timeout } => {
            let url = match url {
                Some(u) => u,
                None => {
                    agent::probe::healthz_url(&load_config(cli.config.as_deref())?.agent.listen)?
                }
            };
            let probe =
                agent::probe::probe(&url, std::time::Duration::from_secs(timeout.max(1))).await?;
            if cli.json {
                print_json(&probe);
            } else {
                println!("{}", probe.reason);
            }
            Ok(if probe.healthy {
                exit::OK
            } else {
                exit::FAILURE
            })
        }
        Command::Notify {
            action: NotifyAction::Test,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            notify_test(&cfg, cli.json).await
        }
        Command::Key { action } => {
            let cfg = load_config(cli.config.as_deref())?;
            key::run(&cfg, action, cli.json).await
        }
        Command::Browse(command) => {
            let cfg = load_config(cli.config.as_deref())?;
            browse::run(&cfg, command, cli.json).await
        }
        Command::Restore {
            snapshot,
            access,
            target,
            dry_run,
            stop_server,
            keep_special_modes,
            select,
            no_owner,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let choices = RestoreChoices {
                snapshot,
                access,
                target,
                dry_run,
                keep_special_modes,
                no_owner,
            };
            if select.any() {
                return restore_selection(&cfg, choices, select, bar, cli.json).await;
            }
            if select.overwrite {
                return Err(Error::Usage("--overwrite is for restoring a selection (--include, --user, --album, …); a full restore never overwrites".into()));
            }
            let server = if stop_server {
                restore::ServerPolicy::StopAndRestart
            } else {
                restore::ServerPolicy::Refuse
            };
            let report = run_restore(&cfg, choices, server, bar).await?;
            print_restore(&report, cli.json);
            Ok(if !report.dry_run && !report.rows_match {
                exit::DATABASE
            } else if !report.damaged.is_empty() {
                exit::DAMAGED
            } else {
                exit::OK
            })
        }
        Command::Drill {
            snapshot,
            access,
            read_data_subset,
            no_read_data,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let (identities, trust) = access.load(&cfg, "drill")?;
            let repo = Repository::open(&cfg.storage)?;
            let opts = DrillOptions {
                snapshot,
                trust,
                lock: access.lock(&cfg),
                progress: progress(),
                read: (!no_read_data).then_some(read_data_subset),
                concurrency: cfg.storage.concurrency,
            };
            let report = drill::drill(&cfg.database, &repo, identities, opts).await?;
            print_drill(&report, cli.json);
            Ok(if report.ok { exit::OK } else { exit::DAMAGED })
        }
    }
}

fn keygen(output: &std::path::Path, signing: Option<PathBuf>, json: bool) -> Result<i32> {
    let signing_path = signing.unwrap_or_else(|| output.with_extension("signing.key"));
    if signing_path == output {
        return Err(Error::Usage(
            "--signing-key must differ from the identity file".into(),
        ));
    }
    if signing_path.exists() {
        return Err(Error::Usage(format!(
            "{} already exists; refusing to overwrite a signing key (choose another path with --signing-key)",
            signing_path.display()
        )));
    }
    let key = crypto::generate_key();
    crypto::write_identity_file(output, &key)?;
    sign::write_secret_file(
        &signing_path,
        &key.signing.file_text(Some(&key.recipient)),
        "signing key",
    )?;
    let verify = key.signing.verify_key().to_string();
    if json {
        println!(
            "{}",
            serde_json::json!({"identity_file": output, "recipient": key.recipient, "signing_key_file": signing_path, "verify_key": verify})
        );
    } else {
        println!("Public key: {}", key.recipient);
        println!("Verify key: {verify}");
        eprintln!(
            "Wrote the identity to {} (mode 0600). Keep it off the backed-up machine (a password manager, paper, a USB stick);\n\
             put the public key in [encryption] recipients. Without the identity the backups cannot be restored.\n\
             Wrote the signing key to {} (mode 0600): copy it to the backup machine and set [encryption] signing_key_file.\n\
             It signs every snapshot, so that a restore with the identity replays only what that machine wrote.",
            output.display(),
            signing_path.display()
        );
    }
    Ok(exit::OK)
}

fn signing_key(
    identity: Option<&std::path::Path>,
    new: bool,
    output: &std::path::Path,
    json: bool,
) -> Result<i32> {
    // Every identity of the file gets its key (an age-keygen file may hold several).
    let keys = match identity {
        Some(path) if !new => Identities::signing_keys_of(path)?,
        _ => vec![sign::SigningKey::from_seed(rand::random::<[u8; 32]>())],
    };
    let text: String = keys
        .iter()
        .map(|k| k.file_text(None).expose_secret().to_string())
        .collect();
    sign::write_secret_file(output, &SecretString::from(text), "signing key")?;
    let verify: Vec<String> = keys.iter().map(|k| k.verify_key().to_string()).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"signing_key_file": output, "verify_keys": verify})
        );
    } else {
        for v in &verify {
            println!("Verify key: {v}");
        }
        eprintln!(
            "Wrote the signing key to {} (mode 0600): put it on the backup machine and set [encryption] signing_key_file.{}",
            output.display(),
            if identity.is_some() && !new {
                " A restore with the identity trusts what it signs."
            } else {
                " Give restore the verify key above ([encryption] verify_keys or --verify-key): it is not tied to an identity."
            }
        );
    }
    Ok(exit::OK)
}

fn recipients(cfg: &Config) -> Result<Recipients> {
    let file = match cfg.encryption.recipients_file.as_str() {
        "" => None,
        f => Some(cfg.existing_file("[encryption] recipients_file", f)?),
    };
    Recipients::load(&cfg.encryption.recipients, file.as_deref())
}

async fn init(cfg: &Config, json: bool) -> Result<i32> {
    if let Some(dir) = immich_backup::store::folder_of(&cfg.storage.url)? {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let repo = Repository::open(&cfg.storage)?;
    let report = repo::snapshots::init(&repo).await;
    let made = match report.ok {
        true => key::first_key(cfg, &repo).await?,
        false => None,
    };
    let signing: Vec<String> = signing_verdict(cfg)?
        .iter()
        .map(ToString::to_string)
        .collect();
    if json {
        let mut v = serde_json::to_value(&report).expect("report serialises");
        v["verify_keys"] = serde_json::json!(signing);
        if let Some(k) = &made {
            v["repository_key"] = k.clone().into();
        }
        if !report.ok {
            let e = storecheck::failure_error(&report);
            v["error"] = e.to_string().into();
            v["exit_code"] = e.exit_code().into();
        }
        println!("{v}");
    } else {
        storecheck::print(&report);
        match signing.as_slice() {
            [] => println!("  WARN signing             no [encryption] signing_key_file: backup will refuse to run (snapshots must be signed); make the key with `immich-backup keygen` or `signing-key`"),
            keys => println!("  ok   signing             snapshots are signed; a restore trusts them with the identity the key was made from (verify key {})", keys.join(", ")),
        }
        if let Some(k) = &made {
            println!("  ok   repository key      keys/{k}: snapshots are sealed to it; [encryption] recipients hold it (`immich-backup key list`, `key add`)");
        }
    }
    if report.ok {
        return Ok(exit::OK);
    }
    let e = storecheck::failure_error(&report);
    eprintln!("error: {e}");
    Ok(e.exit_code())
}

/// The verify keys of the configured signing keys (a bad key file is a config error).
fn signing_verdict(cfg: &Config) -> Result<Vec<sign::VerifyKey>> {
    let (keys, _) = cfg.encryption.signing_keys()?;
    Ok(keys.iter().map(sign::SigningKey::verify_key).collect())
}

/// Backup with the configured database transport.
pub async fn run_backup(
    cfg: &Config,
    progress: Progress,
    opts: backup::BackupOptions,
) -> Result<BackupReport> {
    let recipients = recipients(cfg)?;
    let repo = Repository::open(&cfg.storage)?;
    let database = db::connect(&cfg.database)?;
    backup::run_with(cfg, database.as_ref(), &repo, recipients, progress, opts).await
}

/// The damaged objects named in `path`: a `restore --json` report, or one key or address a line.
fn read_damaged(path: &std::path::Path) -> Result<std::collections::HashSet<ContentId>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |what: &str| {
        Error::Usage(format!(
            "--damaged {}: {what}; give a `restore --json` report or one data/… key per line",
            path.display()
        ))
    };
    let names: Vec<String> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => v["damaged"]
            .as_array()
            .ok_or_else(|| bad("a JSON file without a \"damaged\" list"))?
            .iter()
            .filter_map(|d| d["object"].as_str().map(str::to_string))
            .collect(),
        Err(_) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect(),
    };
    names
        .iter()
        .map(|n| {
            ContentId::from_key(n)
                .filter(|_| n.len() >= 64)
                .ok_or_else(|| bad(&format!("{n:?} is not a content object")))
        })
        .collect()
}

fn print_backup(r: &BackupReport, json: bool) {
    if json {
        print_json(r);
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
    let q = &r.requests;
    if q.requests() > 0 {
        println!(
            "  requests: {} (put {}, part {}, multipart {}, get {}, head {}, list {}, delete {}), {} sent, {} received",
            q.requests(),
            q.put,
            q.part,
            q.multipart,
            q.get,
            q.head,
            q.list,
            q.delete,
            human(q.bytes_sent),
            human(q.bytes_received)
        );
    }
    if r.excluded > 0 {
        println!(
            "  excluded: {} path(s) left out by [immich] exclude",
            r.excluded
        );
    }
    if !r.repaired.is_empty() {
        println!(
            "  repaired: {} damaged object(s) stored again",
            r.repaired.len()
        );
    }
    for m in &r.not_repaired {
        println!("  NOT repaired: {m} (no file of this backup has its content any more)");
    }
    if !r.signed {
        println!("  WARNING: this snapshot is NOT signed (no [encryption] signing_key_file): a restore trusts it only while no snapshot in the store is signed, or with --allow-unsigned");
    }
    if !r.skipped.is_empty() {
        println!(
            "  WARNING: {} file(s) could not be read and are NOT in this snapshot:",
            r.skipped.len()
        );
        for s in r.skipped.iter().take(20) {
            println!("    {}: {}", s.path, s.error);
        }
    }
    print_consistency(&r.consistency, r.partial);
}

/// The consistency lines of `backup`: the verdict, and what is missing or outside.
fn print_consistency(c: &Consistency, partial: bool) {
    if c.verdict == Verdict::Unchecked {
        println!(
            "  consistency: NOT checked ({})",
            c.note.as_deref().unwrap_or("no asset table")
        );
        return;
    }
    println!(
        "  consistency: {} asset(s), {} sidecar(s) checked; {} orphan file(s) no asset names{}",
        c.assets,
        c.sidecars,
        c.orphans,
        if c.ignored_assets > 0 {
            format!(
                "; {} deleted or offline asset(s) not expected",
                c.ignored_assets
            )
        } else {
            String::new()
        }
    );
    if c.external_assets > 0 {
        println!(
            "  WARNING: {} asset(s) are outside UPLOAD_LOCATION and NOT in this snapshot (external libraries: {}); back them up with [immich] external_libraries (or set [immich] media_location if Immich's IMMICH_MEDIA_LOCATION is not /data). First: {}",
            c.external_assets,
            if c.external_import_paths.is_empty() {
                "none in the database".to_string()
            } else {
                c.external_import_paths.join(", ")
            },
            c.external_examples.first().map(String::as_str).unwrap_or("")
        );
    }
    if c.excluded > 0 {
        println!(
            "  {}: {} file(s) the database names are left out by [immich] exclude: a restore would lack them (narrow the patterns). First: {}",
            if partial { "WARNING" } else { "note" },
            c.excluded,
            c.excluded_examples.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if c.missing() > 0 {
        println!(
            "  {}: {} original(s) and {} sidecar(s) the database names are NOT in this snapshot (deleted or moved outside Immich?){}:",
            if partial { "WARNING" } else { "note" },
            c.missing_originals,
            c.missing_sidecars,
            if partial {
                ""
            } else {
                " ([backup] on_missing_original = \"ignore\")"
            }
        );
        for p in &c.missing_examples {
            println!("    {p}");
        }
        if c.missing() > c.missing_examples.len() as u64 {
            println!(
                "    … and {} more",
                c.missing() - c.missing_examples.len() as u64
            );
        }
    }
}

async fn snapshots(cfg: &Config, json: bool) -> Result<i32> {
    let repo = Repository::open(&cfg.storage)?;
    repo::snapshots::require_marker(&repo).await?;
    let list = repo::snapshots::list(&repo).await?;
    // The backup machine checks signatures with its own signing keys' verify keys (and any
    // configured ones): a snapshot someone else wrote into the store shows as untrusted.
    let mut keys = signing_verdict(cfg).unwrap_or_default();
    keys.extend(cfg.encryption.verify_keys()?);
    let mut statuses = Vec::with_capacity(list.len());
    for s in &list {
        statuses.push(trust::signature_status(&repo, &s.id, &keys).await?);
    }
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .zip(&statuses)
            .map(|(s, st)| {
                let mut v = serde_json::to_value(s).expect("list serialises");
                v["signature"] = serde_json::to_value(st).expect("status serialises");
                v
            })
            .collect();
        print_json(&rows);
        return Ok(exit::OK);
    }
    println!(
        "{:<29} {:<20} {:<16} {:>9} {:>10} {:>10}  {:<22} SIGNATURE",
        "ID", "TIME (UTC)", "HOST", "FILES", "SIZE", "DUMP", "CONSISTENCY"
    );
    for (s, status) in list.iter().zip(&statuses) {
        let status = match status {
            trust::SignatureStatus::Trusted => "ok",
            trust::SignatureStatus::Untrusted => "UNTRUSTED (not written by this machine's key)",
            trust::SignatureStatus::Unsigned => "unsigned",
            trust::SignatureStatus::Unchecked => "signed (no key here to check it)",
        };
        match &s.summary {
            Some(m) => println!(
                "{:<29} {:<20} {:<16} {:>9} {:>10} {:>10}  {:<22} {status}{}",
                s.id,
                m.time.format("%Y-%m-%d %H:%M:%S"),
                m.host,
                m.files,
                human(m.bytes),
                human(m.dump_bytes),
                m.consistency
                    .as_ref()
                    .map(Consistency::short)
                    .unwrap_or_else(|| "—".into()),
                if m.skipped > 0 {
                    format!("  (partial: {} unreadable)", m.skipped)
                } else {
                    String::new()
                }
            ),
            None => println!("{:<29} (no summary)  {status}", s.id),
        }
    }
    println!("{} snapshot(s)", list.len());
    Ok(exit::OK)
}

/// `forget --keep-*`: a retention policy for this run instead of `[retention]`'s (restic's flags;
/// -1 means no limit).
#[derive(Debug, Clone, Default, clap::Args)]
struct KeepFlags {
    /// Keep the N most recent snapshots.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..))]
    keep_last: Option<i32>,
    /// Keep the newest snapshot of each of the N most recent hours that have one.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..))]
    keep_hourly: Option<i32>,
    /// … of each of the N most recent days.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..))]
    keep_daily: Option<i32>,
    /// … of each of the N most recent ISO weeks.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..))]
    keep_weekly: Option<i32>,
    /// … of each of the N most recent months.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..))]
    keep_monthly: Option<i32>,
    /// … of each of the N most recent years.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..))]
    keep_yearly: Option<i32>,
    /// Keep every snapshot less than DURATION before the newest one (`7d`, `2d12h`, `1y6m`).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<Within>,
}

impl KeepFlags {
    /// The policy these flags make, keeping `[retention]`'s time zone; `None` when none is given.
    fn policy(&self, configured: &RetentionConfig) -> Option<RetentionConfig> {
        let given = [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ];
        let any = given.iter().any(Option::is_some) || self.keep_within.is_some();
        any.then(|| RetentionConfig {
            keep_last: self.keep_last.unwrap_or(0),
            keep_hourly: self.keep_hourly.unwrap_or(0),
            keep_daily: self.keep_daily.unwrap_or(0),
            keep_weekly: self.keep_weekly.unwrap_or(0),
            keep_monthly: self.keep_monthly.unwrap_or(0),
            keep_yearly: self.keep_yearly.unwrap_or(0),
            timezone: configured.timezone.clone(),
            keep_within: self.keep_within,
        })
    }
}

/// What the restore command line chose.
struct RestoreChoices {
    snapshot: String,
    access: Access,
    target: Option<PathBuf>,
    dry_run: bool,
    keep_special_modes: bool,
    no_owner: bool,
}

async fn run_restore(
    cfg: &Config,
    choices: RestoreChoices,
    server: restore::ServerPolicy,
    bar: bool,
) -> Result<RestoreReport> {
    let (identities, trust) = choices.access.load(cfg, "restore")?;
    let repo = Repository::open(&cfg.storage)?;
    let database = db::connect(&cfg.database)?;
    let opts = RestoreOptions {
        snapshot: choices.snapshot,
        dry_run: choices.dry_run,
        target: choices
            .target
            .unwrap_or_else(|| cfg.immich.upload_location.clone()),
        concurrency: cfg.storage.concurrency,
        // After the identity (and its passphrase prompt).
        progress: Progress::new(bar),
        trust,
        keep_special_modes: choices.keep_special_modes,
        lock: choices.access.lock(cfg),
        external_targets: cfg
            .immich
            .external_libraries
            .iter()
            .map(|l| (l.container_path.clone(), l.host_path.clone()))
            .collect(),
        no_owner: choices.no_owner,
    };
    restore::run_with(database.as_ref(), &repo, identities, opts, server).await
}

/// `restore` with a selection: files only, into --target.
async fn restore_selection(
    cfg: &Config,
    choices: RestoreChoices,
    select: SelectArgs,
    bar: bool,
    json: bool,
) -> Result<i32> {
    let criteria = if select.immich.any() {
        Some(select.immich.criteria(cfg)?)
    } else {
        None
    };
    let (identities, trust) = choices.access.load(cfg, "restore")?;
    let repo = Repository::open(&cfg.storage)?;
    let mut opts = SelectOptions::new(&choices.snapshot, choices.target, trust);
    opts.lock = choices.access.lock(cfg);
    opts.include = select.include;
    opts.exclude = select.exclude;
    opts.criteria = criteria;
    opts.media_location = cfg.immich.media_location.clone();
    opts.external_hosts = external_hosts(cfg);
    opts.overwrite = select.overwrite;
    opts.dry_run = choices.dry_run;
    opts.concurrency = cfg.storage.concurrency;
    opts.keep_special_modes = choices.keep_special_modes;
    opts.no_owner = choices.no_owner;
    // After the identity (and its passphrase prompt).
    opts.progress = Progress::new(bar);
    let report = selective::run(&repo, identities, opts).await?;
    print_selection(&report, json);
    Ok(if !report.damaged.is_empty() {
        exit::DAMAGED
    } else if !report.refused.is_empty() {
        exit::PARTIAL
    } else {
        exit::OK
    })
}

fn print_selection(r: &SelectReport, json: bool) {
    if json {
        print_json(r);
        return;
    }
    let verb = if r.dry_run {
        "would restore"
    } else {
        "restored"
    };
    println!(
        "{}selection of snapshot {} (taken {} on {}) into {}",
        if r.dry_run { "dry run: " } else { "" },
        r.snapshot,
        r.snapshot_time,
        r.source_host,
        r.target
    );
    for f in &r.selected {
        let what = match f.outcome {
            Outcome::Restored => verb,
            Outcome::Present => "present",
            Outcome::Refused => "DIFFERS, left as it is",
            Outcome::Overwritten => "overwritten",
            Outcome::Damaged => "DAMAGED, not restored",
            Outcome::NotInSnapshot => "not in snapshot",
        };
        println!("  {}  ({}, {what})", f.path, human(f.size));
    }
    for a in r
        .assets
        .iter()
        .filter(|a| a.outcome == Outcome::NotInSnapshot)
    {
        println!(
            "  asset {} ({}): its original is not in the snapshot",
            a.asset.original_path, a.asset.file_name
        );
    }
    println!(
        "  {} file(s) ({}) selected: {} {}, {} already present, {} overwritten, {} left as they are, {} damaged",
        r.files,
        human(r.bytes),
        r.files_restored,
        verb,
        r.files_already_present,
        r.files_overwritten,
        r.refused.len(),
        r.damaged.len()
    );
    if !r.assets.is_empty() {
        println!(
            "  {} asset(s) selected from the snapshot's database",
            r.assets.len()
        );
    }
    if !r.refused.is_empty() {
        println!("  files that differ from the snapshot's were left as they are; pass --overwrite to replace them (or choose another --target)");
    }
    for d in &r.damaged {
        println!("  NOT restored {} ({}): {}", d.path, d.object, d.reason);
    }
    if let Some(list) = &r.asset_list {
        println!("  the assets are listed in {list}: re-upload them through Immich (web, app, or its CLI) to add them back to the library");
    }
    if r.dry_run {
        println!("nothing was written.");
    }
}

fn print_restore(r: &RestoreReport, json: bool) {
    if json {
        print_json(r);
        return;
    }
    if r.dry_run {
        println!(
            "dry run: snapshot {} (taken {} on {}, {}) can be restored:",
            r.snapshot,
            r.snapshot_time,
            r.source_host,
            signature_text(r)
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
        print_external_targets(r);
        print_damaged(r);
        println!("nothing was written.");
        return;
    }
    println!(
        "restored snapshot {} (taken {} on {}), {}",
        r.snapshot,
        r.snapshot_time,
        r.source_host,
        signature_text(r)
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
    print_external_targets(r);
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
    print_damaged(r);
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    println!("  duration: {:.1}s", r.duration_secs);
    println!("  next: start Immich, then run its Generate Thumbnails and Transcode Videos jobs (Administration → Jobs, \"Missing\"): thumbs/ and encoded-video/ are not in backups and are made again from the originals");
}

/// A report as pretty JSON on stdout.
fn print_json(report: &impl serde::Serialize) {
    let text = serde_json::to_string_pretty(report).expect("report serialises");
    println!("{text}");
}

fn print_drill(r: &DrillReport, json: bool) {
    if json {
        return print_json(r);
    }
    let signed = match &r.signed_by {
        Some(k) => format!("signed by {k}"),
        None => "NOT SIGNED".into(),
    };
    println!(
        "drill of snapshot {} (taken {} on {}, {}): {}",
        r.snapshot,
        r.snapshot_time,
        r.source_host,
        signed,
        if r.ok { "restorable" } else { "FAILED" }
    );
    for l in &r.leftovers_removed {
        println!("  removed the leftover of an interrupted drill: {l}");
    }
    if !r.server.is_empty() {
        println!(
            "  replayed into {}: PostgreSQL {}",
            r.server, r.server_version
        );
    }
    for c in &r.checks {
        let status = match c.status {
            Status::Pass => "ok  ",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        println!("  {status} {:<16} {}", c.name, c.detail);
    }
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|p| format!("{} {:.1}s", p.name, p.secs))
        .collect();
    println!("  phases: {}", phases.join(", "));
    println!(
        "  expected restore time of the database: {:.1}s (dump {}); the {} files ({}) come on top, in a time that grows with the library's size",
        r.expected_restore_secs,
        human(r.dump_bytes),
        r.files,
        human(r.bytes)
    );
    if let (Some(read), Some(est)) = (&r.files_read, r.files_estimated_secs) {
        println!(
            "  files: a sample of {} ({}) read back in {:.1}s; all {} files ({}) at that rate: about {:.0}s, while the dump replays",
            read.objects,
            human(read.bytes),
            r.files_read_secs,
            r.files,
            human(r.bytes),
            est
        );
    }
    if !r.server.is_empty() {
        println!("  throwaway server removed in {:.1}s", r.cleanup_secs);
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
}

/// Where the snapshot's external libraries go.
fn print_external_targets(r: &RestoreReport) {
    for t in &r.external_targets {
        println!(
            "  external library {} (as Immich sees it) into {}",
            t.container_path, t.target
        );
    }
}

/// Who signed the restored snapshot, for the summary line.
fn signature_text(r: &RestoreReport) -> String {
    match &r.signed_by {
        Some(k) => format!("signed by {k}"),
        None => "NOT SIGNED".into(),
    }
}

/// The files a restore could not put back, and what to do.
fn print_damaged(r: &RestoreReport) {
    if r.damaged.is_empty() {
        return;
    }
    println!(
        "  {} file(s) could NOT be restored (their content objects are damaged or missing; everything else is restored):",
        r.damaged.len()
    );
    for d in r.damaged.iter().take(50) {
        println!(
            "    {} ({}): {}{}",
            d.path,
            d.object,
            d.reason,
            if d.also_in.is_empty() {
                String::new()
            } else {
                format!(
                    "; also used by {} snapshot(s): {}",
                    d.also_in.len(),
                    d.also_in.join(", ")
                )
            }
        );
    }
    if r.damaged.len() > 50 {
        println!(
            "    … and {} more (--json lists them all)",
            r.damaged.len() - 50
        );
    }
    println!("  while the originals still exist, `immich-backup backup --repair` on the backup machine stores them again; then run this restore again to add them");
}

/// `run`: the agent, stopped by the first SIGTERM/SIGINT (a second one exits at once).
async fn run_agent(config: Option<&std::path::Path>) -> Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first, so a signal during start-up already means "stop cleanly".
    let signals =
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
    let (mut term, mut int) =
        signals.map_err(|e| Error::Other(format!("cannot handle signals: {e}")))?;
    let cfg = load_config(config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: stopping (a second signal exits at once)");
        token.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        std::process::exit(exit::INTERRUPTED);
    });
    agent::run(cfg, Arc::new(schedule::SystemClock), shutdown).await?;
    Ok(exit::OK)
}

/// `notify test`: a test message on every configured channel, each one's result.
async fn notify_test(cfg: &Config, json: bool) -> Result<i32> {
    let notifier = Notifier::new(&cfg.notify)?;
    if notifier.is_empty() {
        return Err(Error::Usage("no notification channel is configured: set [notify.ntfy] url, [notify.webhook] url or [notify.email] smtp_url (see the README's \"Notifications\")".into()));
    }
    let event = notify::Event::new(
        "test",
        immich_backup::config::RunStatus::Success,
        exit::OK,
        std::time::Duration::ZERO,
    );
    let results = notifier.send_all(&event).await;
    if json {
        print_json(&serde_json::json!({ "channels": results }));
    } else {
        for d in &results {
            match &d.error {
                None => println!("{}: sent", d.channel),
                Some(e) => println!("{}: FAILED: {e}", d.channel),
            }
        }
    }
    Ok(if results.iter().all(|d| d.ok) {
        exit::OK
    } else {
        exit::FAILURE
    })
}

async fn forget(
    cfg: &Config,
    dry_run: bool,
    prune_after: bool,
    keep: &KeepFlags,
    json: bool,
) -> Result<i32> {
    let repo = Repository::open(&cfg.storage)?;
    let tz = maintenance::retention_timezone(cfg)?;
    let flags = keep.policy(&cfg.retention);
    let policy = flags.as_ref().unwrap_or(&cfg.retention);
    let report = maintenance::forget(&repo, policy, tz, &cfg.lock, dry_run, prune_after).await?;
    if json {
        print_json(&report);
        return Ok(exit::OK);
    }
    let from = if flags.is_some() {
        " (--keep-* flags; [retention] not used)"
    } else {
        ""
    };
    println!("policy: {}{from}", report.policy);
    println!("{:<29} {:<20} {:<6} REASONS", "ID", "TIME (UTC)", "ACTION");
    for d in &report.decisions {
        println!(
            "{:<29} {:<20} {:<6} {}",
            d.id,
            d.time.format("%Y-%m-%d %H:%M:%S"),
            if d.keep { "keep" } else { "remove" },
            d.reasons_text()
        );
    }
    println!(
        "{} snapshot(s) kept, {} {}",
        report.kept,
        report.removed.len(),
        if report.dry_run {
            "would be removed (dry run: nothing changed)"
        } else {
            "removed"
        }
    );
    if let Some(p) = &report.prune {
        print_prune(p);
    } else if !report.removed.is_empty() && !report.dry_run {
        println!(
            "run `immich-backup prune` (or forget --prune) to free the space of their content"
        );
    }
    Ok(exit::OK)
}

fn print_check(r: &verify::CheckReport) {
    println!(
        "check: {} snapshot(s) in {} reference {} content object(s); the store holds {} ({})",
        r.snapshots,
        r.store,
        r.content_referenced,
        r.content_stored,
        human(r.content_bytes)
    );
    if r.with_identity {
        println!(
            "  with the identity: {} manifest(s) and file list(s) verified, {} dump(s) downloaded and verified, every content object's size checked exactly",
            r.file_lists_verified, r.dumps_verified
        );
    } else {
        println!("  without the identity: file lists, dumps and exact sizes not checked (pass --identity FILE)");
    }
    if let Some(d) = &r.read_data {
        println!(
            "  read back ({}): {} content object(s), {} in {:.1} s ({}/s), {} damaged",
            d.subset,
            d.objects,
            human(d.bytes),
            d.duration_secs,
            human((d.bytes as f64 / d.duration_secs.max(0.001)) as u64),
            d.damaged
        );
    }
    for p in &r.problems {
        println!(
            "  PROBLEM {}: {} (needed by snapshot(s) {})",
            p.object,
            p.problem,
            p.snapshots.join(", ")
        );
        for path in &p.paths {
            println!("      {path}");
        }
        if p.paths.len() == verify::MAX_PATHS {
            println!("      … (the first {} paths)", verify::MAX_PATHS);
        }
    }
    let l = &r.leftovers;
    let named = [
        ("incomplete snapshot folder(s)", &l.incomplete_snapshots),
        ("staging folder(s) of other runs", &l.staging),
        ("stale lock(s)", &l.stale_locks),
        ("stray object(s) in data/", &l.stray_objects),
    ];
    for (what, list) in named {
        if !list.is_empty() {
            println!("  leftover: {} {what}: {}", list.len(), list.join("; "));
        }
    }
    if l.unreferenced_content > 0 {
        println!(
            "  leftover: {} content object(s) ({}) no snapshot references (`immich-backup prune` removes them)",
            l.unreferenced_content,
            human(l.unreferenced_bytes)
        );
    }
    if r.ok {
        println!("  no problems: every snapshot's objects are in the store");
    } else {
        println!(
            "  {} problem(s): the snapshots named cannot be restored whole (the paths listed would be missing). The next backup stores missing content again from the files still on disk; `immich-backup backup --repair` also replaces damaged objects",
            r.problems.len()
        );
    }
}

fn print_prune(p: &maintenance::PruneReport) {
    let verb = if p.dry_run { "would remove" } else { "removed" };
    println!(
        "prune: {} snapshot(s) reference {} content object(s); {verb} {} unreferenced content object(s) ({}) and {} incomplete snapshot folder(s)",
        p.snapshots,
        p.content_referenced,
        p.content_removed,
        human(p.content_bytes_removed),
        p.incomplete_removed.len()
    );
    if !p.keys_removed.is_empty() {
        println!(
            "  {verb} {} repository key(s) no snapshot is sealed to any more: {}",
            p.keys_removed.len(),
            p.keys_removed.join(", ")
        );
    }
    if p.temporaries_removed > 0 {
        println!(
            "  {verb} {} temporary file(s) of killed uploads ({})",
            p.temporaries_removed,
            human(p.temporary_bytes_removed)
        );
    }
    if !p.incomplete_kept.is_empty() {
        println!(
            "  kept {} recent incomplete folder(s) (a backup may still be writing them): {}",
            p.incomplete_kept.len(),
            p.incomplete_kept.join(", ")
        );
    }
    println!(
        "  store {}: {} objects, {}{}",
        if p.dry_run { "afterwards" } else { "now" },
        p.store_objects,
        human(p.store_bytes),
        if p.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
}

async fn unlock(cfg: &Config, remove_all: bool, json: bool) -> Result<i32> {
    let repo = Repository::open(&cfg.storage)?;
    repo::snapshots::require_marker(&repo).await?;
    let (removed, kept) = lock::unlock(&repo, &cfg.lock, remove_all).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"removed": removed, "remaining": kept})
        );
        return Ok(exit::OK);
    }
    for l in &removed {
        println!(
            "removed {}{}",
            l.key,
            l.stale
                .as_ref()
                .map(|r| format!(" (stale: {r})"))
                .unwrap_or_default()
        );
    }
    for l in &kept {
        if let Some(i) = &l.info {
            println!(
                "kept live lock {}: {:?} `{}` by pid {} on {}, refreshed {} ago; it is stale (and removed by `unlock`) once not refreshed for {}s. Use --remove-all only if you are sure that run is gone (e.g. another machine that died)",
                l.key,
                i.kind,
                i.operation,
                i.pid,
                i.host,
                lock::ago(chrono::Utc::now(), i.time),
                cfg.lock.stale_secs
            );
        }
    }
    if removed.is_empty() && kept.is_empty() {
        println!("no locks");
    }
    Ok(exit::OK)
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}
