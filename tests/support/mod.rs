//! Shared pieces of the cloud-store tests: the servers, a source (PostgreSQL cluster with an
//! Immich-like database plus a sample UPLOAD_LOCATION), and backup → restore → verify.

#![allow(dead_code)]

pub mod azurite;
pub mod gcs;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use immich_backup::backup::{self, BackupReport};
use immich_backup::config::{Config, StorageConfig};
use immich_backup::crypto::{self, Identities, Recipients};
use immich_backup::db;
use immich_backup::demo;
use immich_backup::demo::sample::{self, PgCluster};
use immich_backup::progress::Progress;
use immich_backup::repo::trust::Trust;
use immich_backup::restore::{self, RestoreOptions, RestoreReport};
use immich_backup::store::PART_SIZE;

/// Size of the large original: more than two multipart parts.
pub const BIG_FILE_SIZE: usize = 2 * PART_SIZE + PART_SIZE / 2 + 12_345;
/// Where it lives (the last originals folder in walk order, so other files go up first).
pub const BIG_FILE: &str = "upload/upload/a1b2c3/zz/zz/VID_20240601_big.mp4";

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// A storage config with short retries, so failures show quickly.
pub fn quick(mut s: StorageConfig) -> StorageConfig {
    s.retry_timeout_secs = 3;
    s.max_retries = 2;
    s.request_timeout_secs = 60;
    s
}

/// An S3 `[storage]` for `server`.
pub fn s3_storage(server: &s3::S3Server, bucket: &str, prefix: &str) -> StorageConfig {
    quick(StorageConfig {
        url: format!("s3://{bucket}/{prefix}"),
        endpoint: server.endpoint(),
        region: "us-east-1".into(),
        allow_http: true,
        access_key_id: s3::ACCESS_KEY.into(),
        secret_access_key: s3::SECRET_KEY.into(),
        ..StorageConfig::default()
    })
}

/// The machine being backed up.
pub struct Source {
    pub work: tempfile::TempDir,
    pub cluster: PgCluster,
    pub upload: PathBuf,
    pub identity: PathBuf,
    pub recipient: String,
    /// The backup machine's signing key, as config text.
    pub signing_key: String,
    pub originals: usize,
}

impl Source {
    /// A cluster with an Immich-like database of `assets` rows, the sample library, and
    /// [`BIG_FILE`] of [`BIG_FILE_SIZE`] incompressible bytes.
    pub fn new(assets: usize) -> Source {
        let work = tempfile::Builder::new()
            .prefix("cloud-test-")
            .tempdir()
            .unwrap();
        let cluster = PgCluster::start(None).expect("PostgreSQL cluster");
        sample::create_immich_like_db(&cluster, "immich", assets).unwrap();
        let upload = work.path().join("upload-location");
        let lib = sample::create_sample_library(&upload).unwrap();
        sample::add_photo(&upload, BIG_FILE, BIG_FILE_SIZE, 4242).unwrap();
        let identity = work.path().join("identity.txt");
        let key = crypto::generate_key();
        crypto::write_identity_file(&identity, &key).unwrap();
        Source {
            cluster,
            upload,
            identity,
            recipient: key.recipient.clone(),
            signing_key: {
                use age::secrecy::ExposeSecret;
                key.signing.to_text().expose_secret().to_string()
            },
            originals: lib.original_files + 1,
            work,
        }
    }

    /// The config of this machine, backing up into `storage`.
    pub fn config(&self, storage: StorageConfig) -> Config {
        let mut cfg = demo::local_config(
            &self.cluster,
            &self.upload,
            self.work.path(),
            &self.recipient,
            &self.work.path().join("cache"),
        );
        cfg.storage = storage;
        cfg.encryption.signing_key = self.signing_key.clone();
        cfg
    }

    /// The same config as a TOML file for the command line, without the secrets (which the
    /// tests pass through `IMMICH_BACKUP__STORAGE__…` variables).
    pub fn config_file(&self, cfg: &Config, name: &str) -> PathBuf {
        let s = &cfg.storage;
        let text = format!(
            "[immich]\nupload_location = {:?}\n\n[database]\nmode = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nbin_dir = {:?}\n\n\
             [storage]\nurl = {:?}\nendpoint = {:?}\nregion = {:?}\nallow_http = {}\naccess_key_id = {:?}\n\
             account_name = {:?}\nservice_account = {:?}\nconcurrency = {}\nretry_timeout_secs = {}\nmax_retries = {}\n\n\
             [encryption]\nrecipients = [{:?}]\nidentity_file = {:?}\nsigning_key = {:?}\n\n[backup]\ncache_dir = {:?}\n",
            cfg.immich.upload_location.display().to_string(),
            cfg.database.port,
            cfg.database.bin_dir,
            s.url,
            s.endpoint,
            s.region,
            s.allow_http,
            s.access_key_id,
            s.account_name,
            s.service_account,
            s.concurrency,
            s.retry_timeout_secs,
            s.max_retries,
            self.recipient,
            self.identity.display().to_string(),
            self.signing_key,
            cfg.backup.cache_dir,
        );
        let path = self.work.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Back up with the library.
pub fn backup(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
) -> immich_backup::error::Result<BackupReport> {
    rt.block_on(async {
        let store = immich_backup::repo::Repository::open(&cfg.storage)?;
        let database = db::connect(&cfg.database)?;
        let recipients = Recipients::load(&cfg.encryption.recipients, None)?;
        backup::run(
            cfg,
            database.as_ref(),
            &store,
            recipients,
            Progress::hidden(),
        )
        .await
    })
}

/// Restore the latest snapshot of `cfg`'s store into a fresh cluster and folder, and check that the
/// database and every original came back identical.
pub fn restore_and_verify(
    rt: &tokio::runtime::Runtime,
    source: &Source,
    cfg: &Config,
) -> RestoreReport {
    let cluster_b = PgCluster::start(None).expect("second PostgreSQL cluster");
    let target = source.work.path().join("restored");
    let mut cfg_b = cfg.clone();
    cfg_b.database.port = cluster_b.port;
    let report = rt
        .block_on(async {
            let store = immich_backup::repo::Repository::open(&cfg_b.storage)?;
            let database = db::connect(&cfg_b.database)?;
            let identities = Arc::new(Identities::load(&source.identity)?);
            let trust = Trust::new(&identities, Vec::new(), false);
            let opts = RestoreOptions::new("latest", target.clone(), trust);
            restore::run(database.as_ref(), &store, identities, opts).await
        })
        .expect("restore");
    assert!(
        report.rows_match,
        "row counts differ: {:?}",
        report.row_checks
    );
    let a = source.cluster.canonical_dump("immich").unwrap();
    let b = cluster_b.canonical_dump("immich").unwrap();
    assert!(a == b, "the restored database differs from the source");
    let diff = demo::compare_trees(&source.upload, &target, &cfg.immich.folders).unwrap();
    assert!(
        diff.differences.is_empty(),
        "restored files differ: {:?}",
        &diff.differences[..diff.differences.len().min(10)]
    );
    assert_eq!(
        std::fs::read(target.join(BIG_FILE)).unwrap(),
        std::fs::read(source.upload.join(BIG_FILE)).unwrap()
    );
    report
}

/// Run the binary with `--config FILE` and the given extra variables (other `IMMICH_BACKUP_*`,
/// `AWS_*`, `AZURE_*`, `GOOGLE_*` variables of the test's environment are removed).
pub fn cli(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = cli_command(config, args, env);
    cmd.output().unwrap()
}

pub fn cli_command(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_immich-backup"));
    for (k, _) in std::env::vars() {
        if k.starts_with("IMMICH_BACKUP")
            || k.starts_with("AWS_")
            || k.starts_with("AZURE_")
            || k.starts_with("GOOGLE_")
        {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--config")
        .arg(config)
        .arg("--no-progress")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// stdout and stderr of a run, as text.
pub fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of `stderr` that are the error report.
pub fn error_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}
