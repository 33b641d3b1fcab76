//! `immich-backup demo`: the whole job end to end on throwaway data, for a first run on a new machine.
//!
//! It starts a PostgreSQL cluster with an Immich-like database and writes a sample UPLOAD_LOCATION
//! (or both are what [`crate::demo::sample`] makes), generates an identity, backs up to a local folder
//! store, restores into a second, fresh cluster and an empty folder, and verifies that the database
//! and every file came back identical. It also leaves a `config.toml` that shows the settings used.

pub mod sample;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::backup;
use crate::config::{Config, DatabaseMode};
use crate::crypto::sign;
use crate::crypto::{self, Identities, Recipients};
use crate::db;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::trust::Trust;
use crate::repo::Repository;
use crate::restore::{self, RestoreOptions};
use sample::PgCluster;

/// Differences between two folder trees (files, symlinks and modes; folders' mtimes are ignored).
#[derive(Debug, Default, Serialize)]
pub struct TreeDiff {
    pub compared: usize,
    pub differences: Vec<String>,
}

/// What a file looks like for comparison.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    mtime_ns: i64,
    digest: String,
}

fn describe_tree(root: &Path, folders: &[String]) -> Result<BTreeMap<String, Seen>> {
    let mut out = BTreeMap::new();
    for f in folders {
        let top = root.join(f);
        if !top.exists() {
            continue;
        }
        for e in walkdir::WalkDir::new(&top).follow_links(false) {
            let e = e.map_err(|e| Error::Other(format!("walking {}: {e}", top.display())))?;
            let rel = e
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let m = std::fs::symlink_metadata(e.path()).map_err(|err| Error::io(e.path(), err))?;
            let (kind, digest) = if m.file_type().is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(e.path())
                        .map_err(|err| Error::io(e.path(), err))?
                        .display()
                        .to_string(),
                )
            } else if m.is_dir() {
                ("dir", String::new())
            } else {
                let bytes = std::fs::read(e.path()).map_err(|err| Error::io(e.path(), err))?;
                ("file", blake3::hash(&bytes).to_hex().to_string())
            };
            let mtime_ns = if kind == "file" {
                m.mtime() * 1_000_000_000 + m.mtime_nsec()
            } else {
                0
            };
            out.insert(
                rel,
                Seen {
                    kind,
                    mode: if kind == "symlink" {
                        0
                    } else {
                        m.mode() & 0o7777
                    },
                    mtime_ns,
                    digest,
                },
            );
        }
    }
    Ok(out)
}

/// Compare the originals folders of two UPLOAD_LOCATIONs: names, kinds, contents, modes, file mtimes.
pub fn compare_trees(a: &Path, b: &Path, folders: &[String]) -> Result<TreeDiff> {
    let left = describe_tree(a, folders)?;
    let right = describe_tree(b, folders)?;
    let mut diff = TreeDiff {
        compared: left.len(),
        differences: Vec::new(),
    };
    for (path, l) in &left {
        match right.get(path) {
            None => diff.differences.push(format!("{path}: missing")),
            Some(r) if r != l => diff.differences.push(format!("{path}: {l:?} != {r:?}")),
            Some(_) => {}
        }
    }
    for path in right.keys().filter(|p| !left.contains_key(*p)) {
        diff.differences.push(format!("{path}: extra"));
    }
    Ok(diff)
}

/// A config for a local cluster and folders, as the demo and the tests use it.
pub fn local_config(
    cluster: &PgCluster,
    upload_location: &Path,
    store_dir: &Path,
    recipient: &str,
    cache_dir: &Path,
) -> Config {
    let mut cfg = Config::default();
    cfg.immich.upload_location = upload_location.to_path_buf();
    cfg.database.mode = DatabaseMode::Local;
    cfg.database.host = "127.0.0.1".into();
    cfg.database.port = cluster.port;
    cfg.database.bin_dir = cluster.bin_dir.display().to_string();
    cfg.storage.url = format!("file://{}", store_dir.display());
    cfg.encryption.recipients = vec![recipient.to_string()];
    cfg.backup.cache_dir = cache_dir.display().to_string();
    cfg
}

fn config_toml(cfg: &Config, identity: &Path) -> String {
    format!(
        "# Written by `immich-backup demo`; see config.example.toml for every key.\n\
         [immich]\nupload_location = {:?}\n\n[database]\nmode = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nbin_dir = {:?}\n\n\
         [storage]\nurl = {:?}\n\n[encryption]\nrecipients = [{:?}]\nidentity_file = {:?}\nsigning_key_file = {:?}\n\n[backup]\ncache_dir = {:?}\n",
        cfg.immich.upload_location.display().to_string(),
        cfg.database.port,
        cfg.database.bin_dir,
        cfg.storage.url,
        cfg.encryption.recipients[0],
        identity.display().to_string(),
        cfg.encryption.signing_key_file,
        cfg.backup.cache_dir,
    )
}

/// Run the demonstration; `dir` keeps the work (default: a temporary folder removed afterwards).
pub async fn run(dir: Option<&Path>, assets: usize, json: bool) -> Result<()> {
    let temp;
    let work: PathBuf = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            let used = std::fs::read_dir(d)
                .map_err(|e| Error::io(d, e))?
                .next()
                .is_some();
            if used {
                return Err(Error::Usage(format!(
                    "demo --dir {}: the folder is not empty (an earlier demo?); give a new or empty folder, or remove it first",
                    d.display()
                )));
            }
            d.to_path_buf()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("immich-backup-demo-")
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?;
            temp.path().to_path_buf()
        }
    };
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };
    say(format!("demo in {}", work.display()));
    let source = work.join("source-upload-location");
    let target = work.join("restored-upload-location");
    let store_dir = work.join("store");
    std::fs::create_dir_all(&store_dir).map_err(|e| Error::io(&store_dir, e))?;

    let cluster_a = PgCluster::start(Some(&work))?;
    sample::create_immich_like_db(&cluster_a, "immich", assets)?;
    let lib = sample::create_sample_library_for(&source, assets)?;
    say(format!(
        "1. source: PostgreSQL on 127.0.0.1:{} with an Immich-like database ({assets} assets); sample UPLOAD_LOCATION with {} originals ({} bytes) at {}",
        cluster_a.port, lib.original_files, lib.original_bytes, source.display()
    ));

    let identity = work.join("identity.txt");
    let signing_key = work.join("signing.key");
    let key = crypto::generate_key();
    crypto::write_identity_file(&identity, &key)?;
    sign::write_secret_file(
        &signing_key,
        &key.signing.file_text(Some(&key.recipient)),
        "signing key",
    )?;
    say(format!(
        "2. keygen: identity {} (0600), recipient {}, signing key {} (verify key {})",
        identity.display(),
        key.recipient,
        signing_key.display(),
        key.signing.verify_key()
    ));

    let mut cfg = local_config(
        &cluster_a,
        &source,
        &store_dir,
        &key.recipient,
        &work.join("cache"),
    );
    cfg.encryption.signing_key_file = signing_key.display().to_string();
    std::fs::write(work.join("config.toml"), config_toml(&cfg, &identity))
        .map_err(|e| Error::io(work.join("config.toml"), e))?;
    let repo = Repository::open(&cfg.storage)?;
    let database = db::connect(&cfg.database)?;
    let recipients = Recipients::load(&cfg.encryption.recipients, None)?;
    let report = backup::run(
        &cfg,
        database.as_ref(),
        &repo,
        recipients,
        Progress::hidden(),
    )
    .await?;
    say(format!(
        "3. backup: snapshot {} in {}: {} files ({} new), {} bytes stored for files, dump {} → {} bytes, {} tables, {:.1}s",
        report.snapshot, repo.url(), report.files, report.files_new, report.bytes_stored, report.dump_sql_bytes, report.dump_stored_bytes, report.row_counts.len(), report.duration_secs
    ));
    let c = &report.consistency;
    say(format!(
        "   consistency: {} ({} assets and {} sidecars the database names, {} missing from the snapshot; {} files no asset names)",
        c.short(), c.assets, c.sidecars, c.missing(), c.orphans
    ));

    let cluster_b = PgCluster::start(Some(&work))?;
    let mut cfg_b = local_config(
        &cluster_b,
        &target,
        &store_dir,
        &key.recipient,
        &work.join("cache"),
    );
    cfg_b.encryption.identity_file = identity.display().to_string();
    let database_b = db::connect(&cfg_b.database)?;
    let identities = Arc::new(Identities::load(&identity)?);
    let opts = RestoreOptions::new(
        "latest",
        target.clone(),
        Trust::new(&identities, Vec::new(), false),
    );
    let restored = restore::run(database_b.as_ref(), &repo, identities, opts).await?;
    say(format!(
        "4. restore: snapshot signed by {} restored into a fresh cluster on 127.0.0.1:{} and {}: {} files written, row counts {}",
        restored.signed_by.as_deref().unwrap_or("nobody (unsigned)"),
        cluster_b.port,
        target.display(),
        restored.files_restored,
        if restored.rows_match {
            "match"
        } else {
            "DIFFER"
        }
    ));

    let dump_a = cluster_a.canonical_dump("immich")?;
    let dump_b = cluster_b.canonical_dump("immich")?;
    let tree = compare_trees(&source, &target, &cfg.immich.folders)?;
    let db_same = dump_a == dump_b;
    say(format!(
        "5. verify: database {} ({} bytes of pg_dump compared); files {} ({} paths compared)",
        if db_same { "identical" } else { "DIFFERENT" },
        dump_a.len(),
        if tree.differences.is_empty() {
            "byte-identical with modes and mtimes"
        } else {
            "DIFFERENT"
        },
        tree.compared
    ));
    if json {
        println!(
            "{}",
            serde_json::json!({"work": work, "backup": report, "restore": restored, "database_identical": db_same, "files": tree})
        );
    }
    if !db_same || !tree.differences.is_empty() || !restored.rows_match {
        return Err(Error::Other(format!(
            "demo: the restore differs from the source: {:?}",
            tree.differences.iter().take(5).collect::<Vec<_>>()
        )));
    }
    say("demo passed: backup → restore → verify.".into());
    Ok(())
}
