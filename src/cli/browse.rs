//! The browsing commands (`ls`, `find`, `diff`, `stats`, `dump`): their arguments, and the printing
//! over [`immich_backup::browse`]. Kept apart from cli.rs so that the list commands' streaming
//! printers sit together.

use std::io::{BufWriter, IsTerminal, Write};
use std::os::fd::AsFd;

use clap::Subcommand;
use immich_backup::browse::{self, diff, dump, find, ls, stats, Node};
use immich_backup::config::Config;
use immich_backup::error::{exit, Error, Result};
use immich_backup::format::Entry;
use immich_backup::repo::trust::{self, Opened, Trust};
use immich_backup::repo::{Reader, Repository};

use super::{human, print_json, Access, ImmichArgs};
use immich_backup::restore::{self, select::Asset};

#[derive(Subcommand)]
pub(super) enum BrowseCommand {
    /// List a snapshot's files: everything, or a folder's direct children (with --recursive,
    /// everything below it). Paths are relative to UPLOAD_LOCATION (`library/admin/2024`).
    /// --json prints one object a line (restic's `ls --json`).
    Ls {
        /// Snapshot id, unique id prefix, or `latest`.
        snapshot: String,
        /// A folder or file in the snapshot.
        path: Option<String>,
        /// Mode, size, modification time (local) and path.
        #[arg(long, short = 'l')]
        long: bool,
        /// Everything below PATH, not only its direct children.
        #[arg(long, short = 'r')]
        recursive: bool,
        /// List Immich's assets instead, from the snapshot's database: those --user, --album,
        /// --album-id, --taken-from/--taken-to and --missing-now select (all, without them), as
        /// `restore` with the same options would restore them.
        #[arg(long, conflicts_with_all = ["path", "recursive", "long"])]
        assets: bool,
        #[command(flatten)]
        immich: ImmichArgs,
        #[command(flatten)]
        access: Access,
    },
    /// Find files by glob pattern across snapshots (every complete one by default): a pattern
    /// matches a whole path or a file name (`'*.jpg'`, `'IMG_0001*'`, `'library/*/2024/**'`).
    /// --json prints one object a line per match, then a summary.
    Find {
        /// Glob patterns (quote them); `*` stays within a folder, `**` crosses folders.
        #[arg(required = true)]
        patterns: Vec<String>,
        /// Only this snapshot (id, prefix or `latest`); repeatable.
        #[arg(long = "snapshot", short = 's', value_name = "ID")]
        snapshots: Vec<String>,
        /// Only the newest N snapshots.
        #[arg(long, value_name = "N")]
        newest: Option<usize>,
        /// Match regardless of case.
        #[arg(long)]
        ignore_case: bool,
        /// Mode, size and modification time too.
        #[arg(long, short = 'l')]
        long: bool,
        #[command(flatten)]
        access: Access,
    },
    /// What changed between two snapshots: `+` added, `-` removed, `M` modified, `T` type
    /// changed (with --metadata, `U`: mode or time only), and each table's row count.
    Diff {
        /// The earlier snapshot (id, prefix or `latest`).
        snapshot_a: String,
        /// The later snapshot.
        snapshot_b: String,
        /// Also list entries whose mode or modification time alone changed (`U`).
        #[arg(long)]
        metadata: bool,
        #[command(flatten)]
        access: Access,
    },
    /// Snapshot sizes, what each snapshot alone keeps in the store, and the store's size. Needs no
    /// identity (summaries, refs and one listing); with one, each manifest adds tables and rows.
    Stats {
        /// Only this snapshot (id, prefix or `latest`); default all.
        snapshot: Option<String>,
        /// Do not use the identity even if [encryption] identity_file is set.
        #[arg(long, conflicts_with = "identity")]
        no_identity: bool,
        #[command(flatten)]
        access: Access,
    },
    /// Write one file of a snapshot to stdout (`> photo.jpg`), verified against its content
    /// address; or, with --database, the snapshot's database dump as plain SQL. A damaged object
    /// exits 13, leaving nothing unverified behind (see the README).
    Dump {
        /// Snapshot id, unique id prefix, or `latest`.
        snapshot: String,
        /// The file, as `ls` shows it (`library/admin/2024/IMG_0001.jpg`).
        #[arg(required_unless_present = "database")]
        path: Option<String>,
        /// The database dump (pg_dumpall's SQL, gunzipped) instead of a file.
        #[arg(long, conflicts_with = "path")]
        database: bool,
        #[command(flatten)]
        access: Access,
    },
}

/// Run one browsing command.
pub(super) async fn run(cfg: &Config, command: BrowseCommand, json: bool) -> Result<i32> {
    let repo = Repository::open(&cfg.storage)?;
    let r = match command {
        BrowseCommand::Ls {
            snapshot,
            assets: true,
            immich,
            access,
            ..
        } => {
            let (reader, trust) = reader(cfg, &repo, &access, "ls").await?;
            let criteria = immich.criteria(cfg)?;
            browse::with_lock(&repo, access.lock(cfg).as_ref(), "ls", async {
                let (id, assets) = restore::selective::list_assets(
                    &reader,
                    &trust,
                    &snapshot,
                    criteria,
                    &cfg.immich.media_location,
                    &super::external_hosts(cfg),
                )
                .await?;
                print_assets(&id, &assets, json)
            })
            .await
        }
        BrowseCommand::Ls {
            snapshot,
            path,
            long,
            recursive,
            immich,
            access,
            ..
        } => {
            if immich.any() {
                return Err(Error::Usage(
                    "--user, --album, --album-id, --taken-from, --taken-to and --missing-now select Immich assets: add --assets".into(),
                ));
            }
            let (reader, trust) = reader(cfg, &repo, &access, "ls").await?;
            let opts = ls::LsOptions { path, recursive };
            browse::with_lock(&repo, access.lock(cfg).as_ref(), "ls", async {
                let opened = trust::resolve(&reader, &trust, &snapshot).await?;
                run_ls(&reader, &opened, &opts, long, json).await
            })
            .await
        }
        BrowseCommand::Find {
            patterns,
            snapshots,
            newest,
            ignore_case,
            long,
            access,
        } => {
            let (reader, trust) = reader(cfg, &repo, &access, "find").await?;
            let opts = find::FindOptions {
                patterns,
                ignore_case,
                snapshots,
                newest,
            };
            find::patterns(&opts)?;
            browse::with_lock(&repo, access.lock(cfg).as_ref(), "find", async {
                run_find(&reader, &trust, &opts, long, json).await
            })
            .await
        }
        BrowseCommand::Diff {
            snapshot_a,
            snapshot_b,
            metadata,
            access,
        } => {
            let (reader, trust) = reader(cfg, &repo, &access, "diff").await?;
            browse::with_lock(&repo, access.lock(cfg).as_ref(), "diff", async {
                let a = trust::resolve(&reader, &trust, &snapshot_a).await?;
                let b = trust::resolve(&reader, &trust, &snapshot_b).await?;
                run_diff(&reader, &a, &b, metadata, json).await
            })
            .await
        }
        BrowseCommand::Stats {
            snapshot,
            no_identity,
            access,
        } => {
            let deep = match no_identity {
                true => None,
                false => access.load_if_any(cfg, false)?,
            };
            let deep = match deep {
                Some((identities, trust)) => Some((repo.unlock(identities).await?, trust)),
                None => None,
            };
            let report = browse::with_lock(&repo, access.lock(cfg).as_ref(), "stats", async {
                let deep = deep.as_ref().map(|(r, t)| (r, t));
                stats::stats(&repo, deep, snapshot.as_deref()).await
            })
            .await?;
            if json {
                print_json(&report);
            } else {
                print_stats(&report);
            }
            Ok(exit::OK)
        }
        BrowseCommand::Dump {
            snapshot,
            path,
            database: _,
            access,
        } => {
            if json {
                return Err(Error::Usage(
                    "dump writes the file itself to stdout; --json does not apply to it".into(),
                ));
            }
            let stdout = std::io::stdout();
            if path.is_some() && stdout.is_terminal() {
                return Err(Error::Usage(
                    "stdout is a terminal: redirect the file, as `immich-backup dump latest library/admin/2024/IMG_0001.jpg > IMG_0001.jpg`".into(),
                ));
            }
            let (reader, trust) = reader(cfg, &repo, &access, "dump").await?;
            browse::with_lock(&repo, access.lock(cfg).as_ref(), "dump", async {
                let opened = trust::resolve(&reader, &trust, &snapshot).await?;
                let out = output()?;
                match path {
                    Some(p) => {
                        let d = dump::file(&reader, &opened.manifest, &p, out).await?;
                        tracing::info!(snapshot = %opened.id, path = %d.path, bytes = d.bytes, "dumped, verified");
                    }
                    None => {
                        let n = dump::database(&reader, &opened.manifest, out).await?;
                        tracing::info!(snapshot = %opened.id, bytes = n, "database dumped, verified");
                    }
                }
                Ok(exit::OK)
            })
            .await
        }
    };
    quiet_on_closed_pipe(r)
}

/// The reader and trust of a command that needs the identity.
async fn reader(
    cfg: &Config,
    repo: &Repository,
    access: &Access,
    what: &str,
) -> Result<(Reader, Trust)> {
    let (identities, trust) = access.load(cfg, what)?;
    Ok((repo.unlock(identities).await?, trust))
}

/// `ls … | head` closes the pipe early: that ends the listing, it is not a failure.
fn quiet_on_closed_pipe(r: Result<i32>) -> Result<i32> {
    match r {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(exit::OK)
        }
        r => r,
    }
}

/// Where `dump` writes: stdout, as a regular file when it is one.
fn output() -> Result<dump::Output> {
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("stdout", e))?;
    let file = std::fs::File::from(fd);
    let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    Ok(if regular {
        dump::Output::File(file)
    } else {
        dump::Output::Stream {
            to: Box::new(std::io::stdout()),
            buffer: dump::BUFFER,
        }
    })
}

/// A buffered stdout that reports write errors as errors on "stdout".
struct Out(BufWriter<std::io::Stdout>);

impl Out {
    fn new() -> Out {
        Out(BufWriter::new(std::io::stdout()))
    }

    fn line(&mut self, text: &str) -> Result<()> {
        writeln!(self.0, "{text}").map_err(|e| Error::io("stdout", e))
    }

    fn json(&mut self, v: &impl serde::Serialize) -> Result<()> {
        let text = serde_json::to_string(v).expect("serialises");
        self.line(&text)
    }

    fn flush(&mut self) -> Result<()> {
        self.0.flush().map_err(|e| Error::io("stdout", e))
    }
}

/// `ls --assets`: one line an asset (capture time, owner, albums, path in the snapshot), or with
/// --json one object a line, then a count.
fn print_assets(id: &str, assets: &[Asset], json: bool) -> Result<i32> {
    let mut out = Out::new();
    for a in assets {
        if json {
            out.json(&serde_json::json!({"message_type": "asset", "snapshot": id, "asset": a}))?;
        } else {
            let path = a
                .snapshot_path
                .as_deref()
                .unwrap_or("(not in the snapshot)");
            let albums = if a.albums.is_empty() {
                String::new()
            } else {
                format!("  [{}]", a.albums.join(", "))
            };
            let status = match a.status.as_str() {
                "" | "active" => String::new(),
                s => format!("  ({s})"),
            };
            out.line(&format!(
                "{}  {}  {path}{albums}{status}",
                a.taken.as_deref().unwrap_or("-"),
                a.owner
            ))?;
        }
    }
    let missing = assets.iter().filter(|a| a.snapshot_path.is_none()).count();
    if json {
        out.json(&serde_json::json!({
            "message_type": "summary", "snapshot": id, "assets": assets.len(),
            "not_in_snapshot": missing,
        }))?;
    } else {
        out.line(&format!(
            "{} asset(s) of snapshot {id}{}",
            assets.len(),
            if missing > 0 {
                format!(", {missing} of them with no original in the snapshot")
            } else {
                String::new()
            }
        ))?;
    }
    out.flush()?;
    Ok(exit::OK)
}

async fn run_ls(
    reader: &Reader,
    opened: &Opened,
    opts: &ls::LsOptions,
    long: bool,
    json: bool,
) -> Result<i32> {
    let m = &opened.manifest;
    let mut out = Out::new();
    if json {
        out.json(&serde_json::json!({
            "message_type": "snapshot", "struct_type": "snapshot", "id": m.id, "time": m.time,
            "hostname": m.host, "paths": m.folders,
        }))?;
    } else {
        out.line(&format!(
            "snapshot {} of {} at {} (UTC){}:",
            m.id,
            m.host,
            m.time.format("%Y-%m-%d %H:%M:%S"),
            opts.path
                .as_deref()
                .map(|p| format!(", {p}"))
                .unwrap_or_default()
        ))?;
    }
    // The printer goes with the listing; its buffer is written out when the listing ends.
    ls::ls(reader, m, opts, move |e: &Entry| {
        print_entry(&mut out, e, long, json)
    })
    .await?;
    Ok(exit::OK)
}

/// One entry, as `ls` prints it.
fn print_entry(out: &mut Out, e: &Entry, long: bool, json: bool) -> Result<()> {
    let node = Node::of(e);
    if json {
        out.json(&node)
    } else if long {
        out.line(&node.long())
    } else {
        out.line(&node.path)
    }
}

async fn run_find(
    reader: &Reader,
    trust: &Trust,
    opts: &find::FindOptions,
    long: bool,
    json: bool,
) -> Result<i32> {
    let mut current: Option<String> = None;
    let mut out = Out::new();
    let report = find::find(reader, trust, opts, move |id, time, e| {
        if json {
            let mut v = serde_json::to_value(Node::of(e)).expect("serialises");
            v["message_type"] = "match".into();
            v["snapshot"] = id.into();
            return out.json(&v);
        }
        if current.as_deref() != Some(id) {
            if current.is_some() {
                out.line("")?;
            }
            out.line(&format!(
                "Found matching entries in snapshot {id} from {}",
                time.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
            ))?;
            current = Some(id.to_string());
        }
        let node = Node::of(e);
        out.line(&if long { node.long() } else { node.path })
    })
    .await?;
    if json {
        let mut v = serde_json::to_value(&report).expect("serialises");
        v["message_type"] = "summary".into();
        println!("{v}");
    } else if report.matches == 0 {
        eprintln!("no match in {} snapshot(s)", report.searched.len());
    }
    for (id, why) in &report.skipped {
        eprintln!("warning: snapshot {id} was not searched: {why}");
    }
    Ok(exit::OK)
}

async fn run_diff(
    reader: &Reader,
    a: &Opened,
    b: &Opened,
    metadata: bool,
    json: bool,
) -> Result<i32> {
    let mut out = Out::new();
    if !json {
        out.line(&format!("comparing snapshot {} to {}:\n", a.id, b.id))?;
    }
    let stats = diff::diff(reader, &a.manifest, &b.manifest, metadata, |c| {
        if json {
            return out.json(c);
        }
        let slash = if c.kind == immich_backup::format::EntryKind::Dir {
            "/"
        } else {
            ""
        };
        out.line(&format!("{}    {}{slash}", c.modifier, c.path))
    })
    .await?;
    if json {
        out.json(&stats)?;
        out.flush()?;
        return Ok(exit::OK);
    }
    let (ad, rm) = (&stats.added, &stats.removed);
    out.line("")?;
    out.line(&format!(
        "Files:    {:>6} new, {:>6} removed, {:>6} changed{}",
        ad.files,
        rm.files,
        stats.modified,
        if stats.type_changed > 0 {
            format!(", {} changed type", stats.type_changed)
        } else {
            String::new()
        }
    ))?;
    out.line(&format!(
        "Dirs:     {:>6} new, {:>6} removed",
        ad.dirs, rm.dirs
    ))?;
    out.line(&format!(
        "Symlinks: {:>6} new, {:>6} removed",
        ad.symlinks, rm.symlinks
    ))?;
    out.line(&format!(
        "Metadata: {:>6} changed (mode or time only{})",
        stats.metadata_changed,
        if metadata {
            ""
        } else {
            "; listed with --metadata"
        }
    ))?;
    out.line(&format!("Added:    {}", human(ad.bytes)))?;
    out.line(&format!("Removed:  {}", human(rm.bytes)))?;
    out.line(&format!(
        "Database: dump {} → {}; {} table(s) with other row counts",
        human(stats.dump_bytes.0),
        human(stats.dump_bytes.1),
        stats.tables.len()
    ))?;
    let count = |n: Option<u64>| n.map_or("—".to_string(), |n| n.to_string());
    for t in &stats.tables {
        let delta = t.after.unwrap_or(0) as i128 - t.before.unwrap_or(0) as i128;
        out.line(&format!(
            "  {:<40} {:>10} → {:<10} ({delta:+})",
            t.table,
            count(t.before),
            count(t.after)
        ))?;
    }
    out.flush()?;
    Ok(exit::OK)
}

fn print_stats(r: &stats::StatsReport) {
    println!(
        "{:<29} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "ID", "FILES", "SIZE", "DUMP", "STORED", "UNIQUE", "SHARED"
    );
    for s in &r.snapshots {
        println!(
            "{:<29} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}{}",
            s.id,
            s.files,
            human(s.bytes),
            human(s.dump_bytes),
            human(s.content_stored_bytes + s.snapshot_stored_bytes),
            human(s.unique_stored_bytes),
            human(s.shared_stored_bytes),
            match (&s.refs_error, s.missing_objects) {
                (Some(_), _) => "  (refs unreadable: run `immich-backup check`)".to_string(),
                (None, 0) => String::new(),
                (None, n) => format!("  ({n} object(s) missing: run `immich-backup check`)"),
            }
        );
        if let Some(m) = &s.manifest {
            println!(
                "{:<29} {} folder(s), {} symlink(s); database {} (PostgreSQL {}): {} table(s), {} row(s)",
                "", m.dirs, m.symlinks, m.database, m.server_version, m.tables, m.rows
            );
        }
    }
    let t = &r.totals;
    println!();
    println!("store {}: {} snapshot(s)", r.store, t.snapshots);
    println!(
        "  content:   {} object(s), {} ({} unreferenced, {}: what prune removes)",
        t.content_objects,
        human(t.content_bytes),
        t.unreferenced_objects,
        human(t.unreferenced_bytes)
    );
    println!(
        "  snapshots: {} object(s), {}",
        t.snapshot_objects,
        human(t.snapshot_bytes)
    );
    println!(
        "  total:     {} stored for {} of files over all snapshots",
        human(t.total_bytes),
        human(t.snapshot_file_bytes)
    );
    println!("UNIQUE: content no other snapshot uses (forget + prune would free it); SHARED: used by others too. Sizes as stored (encrypted).");
}
