//! The one helper tree of the integration tests (`mod common;` in core.rs, security.rs, readahead.rs,
//! cloud.rs, check.rs, drill.rs, messages.rs and select.rs):
//!
//! - [`Source`]: a source Immich install (throwaway cluster with an Immich-like database, sample
//!   UPLOAD_LOCATION, folder store, cache folder, identity and signing key), optionally with
//!   [`BIG_FILE`] for multipart uploads, and its library config for the folder store or any other
//!   `[storage]`;
//! - backing up through the library ([`backup`]) and restoring into a fresh cluster and folder with
//!   every check ([`restore_and_verify`], [`assert_same_originals`]);
//! - config files for the real binary ([`ConfigToml`]) and running it ([`cli`], [`command`], [`Run`]);
//! - looking inside a folder store (objects, manifests, file lists) and at folders ([`tree_state`]);
//! - the cloud stores, as servers on 127.0.0.1: [`s3`] (s3s-fs in this process), [`azurite`]
//!   (Azurite as a child process) and [`gcs`] (a local GCS XML-API server, in this process);
//!   [`s3_storage`] and [`quick`] make `[storage]` configs for them.
//!
//! Each test binary compiles this tree on its own and uses only part of it, hence `dead_code` is
//! allowed here (and in the server modules below).

#![allow(dead_code)]

pub mod azurite;
pub mod gcs;
pub mod s3;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use flate2::read::GzDecoder;
use immich_backup::backup::{self, BackupReport};
use immich_backup::config::{Config, StorageConfig};
use immich_backup::crypto::{self, Identities, Recipients};
use immich_backup::demo::sample::{self, PgCluster, SampleLibrary};
use immich_backup::format::{ContentId, Entry, Manifest, DATA_DIR, MANIFEST_OBJECT};
use immich_backup::progress::Progress;
use immich_backup::repo::trust::Trust;
use immich_backup::repo::Repository;
use immich_backup::restore::{self, RestoreOptions, RestoreReport};
use immich_backup::store::PART_SIZE;
use immich_backup::{db, demo};
use tempfile::TempDir;

/// The real binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_immich-backup");

/// Asset rows in the sample databases: small, so the suite stays quick.
pub const ASSETS: usize = 300;

/// The Immich database name everywhere in these tests.
pub const DB: &str = "immich";

/// Size of the large original of [`Source::with_big_file`]: more than two multipart parts.
pub const BIG_FILE_SIZE: usize = 2 * PART_SIZE + PART_SIZE / 2 + 12_345;
/// Where it lives (the last originals folder in walk order, so other files go up first).
pub const BIG_FILE: &str = "upload/upload/a1b2c3/zz/zz/VID_20240601_big.mp4";

/// A tokio runtime for calling the library's async API from plain `#[test]`s.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Sleep until every file written so far has settled: changed long enough before a backup's walk
/// for the metadata cache (and the read-ahead) to let its metadata stand for its content
/// (`walk::SETTLE_NS`).
pub fn wait_until_settled() {
    let settle = std::time::Duration::from_nanos(immich_backup::backup::walk::SETTLE_NS as u64);
    std::thread::sleep(settle + std::time::Duration::from_millis(500));
}

/// A new temporary folder (removed on drop).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("immich-backup-test-")
        .tempdir()
        .expect("tempdir")
}

// ---------------------------------------------------------------------------------------------------
// The source install

/// A source Immich install: a cluster with an Immich-like database, a sample UPLOAD_LOCATION, an
/// empty folder store, a cache folder and an identity. Everything lives in `work` (and the cluster's
/// own temp folder) and is removed on drop.
pub struct Source {
    pub cluster: PgCluster,
    pub upload: PathBuf,
    pub store: PathBuf,
    pub cache: PathBuf,
    pub identity: PathBuf,
    pub recipient: String,
    /// The backup machine's signing key (made from the identity), as config text.
    pub signing_key: String,
    /// What UPLOAD_LOCATION holds ([`BIG_FILE`] included when there is one).
    pub lib: SampleLibrary,
    /// Whether UPLOAD_LOCATION holds [`BIG_FILE`].
    pub big_file: bool,
    pub work: TempDir,
}

impl Source {
    /// A source with `assets` asset rows, each with its original in UPLOAD_LOCATION (as in a real
    /// Immich: a backup finds nothing missing).
    pub fn new(assets: usize) -> Source {
        let work = tempdir();
        let cluster = PgCluster::start(None).expect("start the source cluster");
        sample::create_immich_like_db(&cluster, DB, assets).expect("Immich-like database");
        let upload = work.path().join("upload-location");
        let lib = sample::create_sample_library_for(&upload, assets).expect("sample library");
        let store = work.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let cache = work.path().join("cache");
        let identity = work.path().join("identity.txt");
        let key = crypto::generate_key();
        crypto::write_identity_file(&identity, &key).unwrap();
        Source {
            cluster,
            upload,
            store,
            cache,
            identity,
            signing_key: signing_text(&key),
            recipient: key.recipient,
            lib,
            big_file: false,
            work,
        }
    }

    /// A source with `assets` asset rows whose UPLOAD_LOCATION also holds [`BIG_FILE`] of
    /// [`BIG_FILE_SIZE`] incompressible bytes (stored in more than two multipart parts).
    pub fn with_big_file(assets: usize) -> Source {
        let mut source = Source::new(assets);
        sample::add_photo(&source.upload, BIG_FILE, BIG_FILE_SIZE, 4242).expect("big file");
        source.lib.files += 1;
        source.lib.bytes += BIG_FILE_SIZE as u64;
        source.lib.original_files += 1;
        source.lib.original_bytes += BIG_FILE_SIZE as u64;
        source.big_file = true;
        source
    }

    /// The library config of this install (as the demo builds it), backing up into the folder store.
    pub fn config(&self) -> Config {
        let mut cfg = demo::local_config(
            &self.cluster,
            &self.upload,
            &self.store,
            &self.recipient,
            &self.cache,
        );
        cfg.encryption.signing_key = self.signing_key.clone();
        cfg
    }

    /// The library config of this install, backing up into `storage` instead.
    pub fn config_with(&self, storage: StorageConfig) -> Config {
        let mut cfg = self.config();
        cfg.storage = storage;
        cfg
    }

    /// The config file contents for the binary, pointing at this install.
    pub fn toml(&self) -> ConfigToml {
        ConfigToml {
            port: self.cluster.port,
            bin_dir: self.cluster.bin_dir.clone(),
            upload_location: self.upload.clone(),
            store: self.store.clone(),
            storage: None,
            cache: self.cache.clone(),
            recipients: vec![self.recipient.clone()],
            identity: Some(self.identity.clone()),
            signing_key: Some(self.signing_key.clone()),
            backup_extra: String::new(),
            extra: String::new(),
        }
    }

    /// Write the config file for this install as `work/<name>`.
    pub fn write_config(&self, name: &str) -> PathBuf {
        self.toml().write(&self.work.path().join(name))
    }

    /// Write the config file for this install backing up into `storage` as `work/<name>`, without
    /// the storage secrets (the tests pass them through `IMMICH_BACKUP__STORAGE__…` variables).
    pub fn write_config_with(&self, storage: &StorageConfig, name: &str) -> PathBuf {
        let mut toml = self.toml();
        toml.storage = Some(storage.clone());
        toml.write(&self.work.path().join(name))
    }

    /// A config for restoring this install's store into `cluster` and `upload_location`.
    pub fn write_restore_config(
        &self,
        name: &str,
        cluster: &PgCluster,
        upload_location: &Path,
    ) -> PathBuf {
        let mut toml = self.toml();
        toml.port = cluster.port;
        toml.bin_dir = cluster.bin_dir.clone();
        toml.upload_location = upload_location.to_path_buf();
        toml.cache = self.work.path().join("restore-cache");
        toml.write(&self.work.path().join(name))
    }

    /// Back up into the folder store through the library API.
    pub fn backup_lib(&self) -> BackupReport {
        backup(&rt(), &self.config()).expect("backup")
    }

    /// The canonical `pg_dump` of the source's Immich database.
    pub fn dump(&self) -> String {
        self.cluster.canonical_dump(DB).expect("canonical dump")
    }
}

/// The signing key of a new key, as `[encryption] signing_key` takes it.
pub fn signing_text(key: &crypto::NewKey) -> String {
    use age::secrecy::ExposeSecret;
    key.signing.to_text().expose_secret().to_string()
}

// ---------------------------------------------------------------------------------------------------
// Backup and restore through the library

/// Run one backup of `cfg` through the library API, on `rt`.
pub fn backup(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
) -> immich_backup::error::Result<BackupReport> {
    rt.block_on(async {
        let repo = Repository::open(&cfg.storage)?;
        let database = db::connect(&cfg.database)?;
        let recipients = Recipients::load(&cfg.encryption.recipients, None)?;
        backup::run(
            cfg,
            database.as_ref(),
            &repo,
            recipients,
            Progress::hidden(),
        )
        .await
    })
}

/// A prune's exclusive lock on `cfg`'s store, held until released on the runtime returned with it.
pub fn hold_exclusive_lock(
    cfg: &Config,
) -> (tokio::runtime::Runtime, immich_backup::repo::lock::Lock) {
    use immich_backup::repo::lock::{Lock, LockKind};
    let rt = rt();
    let repo = Repository::open(&cfg.storage).unwrap();
    let lock = rt
        .block_on(Lock::acquire(
            &repo,
            LockKind::Exclusive,
            "prune",
            &Default::default(),
        ))
        .unwrap();
    (rt, lock)
}

/// Restore the latest snapshot of `cfg`'s store (backed up from `source`) through the library API
/// into a fresh cluster and folder, and check that the row counts match and that the database and
/// every original came back identical.
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
            let repo = Repository::open(&cfg_b.storage)?;
            let database = db::connect(&cfg_b.database)?;
            let identities = Arc::new(Identities::load(&source.identity)?);
            let trust = Trust::new(&identities, Vec::new(), false);
            let opts = RestoreOptions::new("latest", target.clone(), trust);
            restore::run(database.as_ref(), &repo, identities, opts).await
        })
        .expect("restore");
    assert!(
        report.rows_match,
        "row counts differ: {:?}",
        report.row_checks
    );
    assert!(
        source.dump() == cluster_b.canonical_dump(DB).unwrap(),
        "the restored database differs from the source"
    );
    assert_eq!(cfg.immich.folders, original_folders());
    assert_same_originals(&source.upload, &target);
    if source.big_file {
        assert_eq!(
            std::fs::read(target.join(BIG_FILE)).unwrap(),
            std::fs::read(source.upload.join(BIG_FILE)).unwrap()
        );
    }
    report
}

/// The originals under `target` are those under `upload` (in Immich's originals folders), byte for
/// byte, with modes and times.
pub fn assert_same_originals(upload: &Path, target: &Path) {
    let diff = demo::compare_trees(upload, target, &original_folders()).unwrap();
    assert!(
        diff.differences.is_empty(),
        "restored files differ: {:?}",
        &diff.differences[..diff.differences.len().min(10)]
    );
}

/// Immich's originals folders (what a backup takes), as `[immich] folders` lists them.
pub fn original_folders() -> Vec<String> {
    sample::ORIGINAL_FOLDERS
        .iter()
        .map(|f| f.to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Config files and the binary

/// The pieces of a config file the tests vary.
pub struct ConfigToml {
    pub port: u16,
    pub bin_dir: PathBuf,
    pub upload_location: PathBuf,
    /// The folder store (`[storage] url = "file://…"`), unless `storage` is set.
    pub store: PathBuf,
    /// Another store: its `[storage]` table is written without the secrets (`secret_access_key`,
    /// `session_token`, `account_key`, `options`).
    pub storage: Option<StorageConfig>,
    pub cache: PathBuf,
    pub recipients: Vec<String>,
    pub identity: Option<PathBuf>,
    /// The backup machine's signing key (`[encryption] signing_key`), if any.
    pub signing_key: Option<String>,
    /// Lines added to the `[backup]` table.
    pub backup_extra: String,
    /// Appended verbatim after every table.
    pub extra: String,
}

impl ConfigToml {
    /// The TOML text (strings quoted with Rust's `{:?}`, which TOML reads for these paths).
    pub fn text(&self) -> String {
        let recipients: Vec<String> = self.recipients.iter().map(|r| format!("{r:?}")).collect();
        let upload = self.upload_location.display().to_string();
        let bin_dir = self.bin_dir.display().to_string();
        let storage = match &self.storage {
            None => format!("url = {:?}\n", format!("file://{}", self.store.display())),
            Some(s) => format!(
                "url = {:?}\nendpoint = {:?}\nregion = {:?}\nallow_http = {}\naccess_key_id = {:?}\n\
                 account_name = {:?}\nservice_account = {:?}\nconcurrency = {}\n\
                 retry_timeout_secs = {}\nmax_retries = {}\nssh_key_file = {:?}\n\
                 known_hosts_file = {:?}\nssh_host_key = {:?}\n",
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
                s.ssh_key_file,
                s.known_hosts_file,
                s.ssh_host_key,
            ),
        };
        let identity = self
            .identity
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let cache = self.cache.display().to_string();
        let signing = self
            .signing_key
            .as_ref()
            .map(|k| format!("signing_key = {k:?}\n"))
            .unwrap_or_default();
        format!(
            "[immich]\nupload_location = {upload:?}\n\n\
             [database]\nmode = \"local\"\nusername = \"postgres\"\ndatabase = \"{DB}\"\n\
             host = \"127.0.0.1\"\nport = {}\nbin_dir = {bin_dir:?}\n\n\
             [storage]\n{storage}\n\
             [encryption]\nrecipients = [{}]\nidentity_file = {identity:?}\n{signing}\n\
             [backup]\ncache_dir = {cache:?}\n{}\n{}\n",
            self.port,
            recipients.join(", "),
            self.backup_extra,
            self.extra,
        )
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.text()).expect("write config");
        path.to_path_buf()
    }
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Panic with everything the run printed unless it exited with `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "expected exit code {code}, got {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// The stderr lines that are the error report (`error: …`), not log lines.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect()
    }
}

/// A command for the binary with `--config`, `--no-progress`, and no stray environment (the test
/// environment's `IMMICH_BACKUP*`, `PG*`, `AWS_*`, `AZURE_*` and `GOOGLE_*` variables are removed).
pub fn command(config: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if ["IMMICH_BACKUP", "PG", "AWS_", "AZURE_", "GOOGLE_"]
            .iter()
            .any(|p| k.starts_with(p))
        {
            cmd.env_remove(k);
        }
    }
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--no-progress").args(args).stdin(Stdio::null());
    cmd
}

/// Run the binary to completion, with the extra variables `env`.
pub fn cli(config: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(config, args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_to_end(cmd)
}

/// Run a [`command`] to completion.
pub fn run_to_end(mut cmd: Command) -> Run {
    let out = cmd.output().expect("run immich-backup");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A path as a command-line argument.
pub fn path_arg(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// `--json restore <extra…> --identity FILE`.
pub fn restore_args<'a>(identity: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--json", "restore"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--identity", path_arg(identity)]);
    args
}

// ---------------------------------------------------------------------------------------------------
// Inside a folder store, and folders

/// Content objects (`data/xx/<64 hex>`) in a folder store: key → size. Temporary files of
/// unfinished writes are not objects.
pub fn data_objects(store: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let dir = store.join(DATA_DIR);
    if !dir.exists() {
        return out;
    }
    for e in walkdir::WalkDir::new(&dir).into_iter().flatten() {
        let name = e.file_name().to_string_lossy();
        if e.file_type().is_file()
            && name.len() == 64
            && name.bytes().all(|b| b.is_ascii_hexdigit())
        {
            let key = e
                .path()
                .strip_prefix(store)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(key, e.metadata().unwrap().len());
        }
    }
    out
}

/// Content objects a running (or killed) backup has written to its staging folders
/// (`staging/<run>/<aa>/<64 hex>`), under the `data/…` key they will be published as: key → size.
pub fn staged_objects(store: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(runs) = fs::read_dir(store.join("staging")) else {
        return out;
    };
    for run in runs.flatten() {
        for e in walkdir::WalkDir::new(run.path()).into_iter().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                if let Ok(meta) = e.metadata() {
                    out.insert(format!("{DATA_DIR}/{}/{name}", &name[..2]), meta.len());
                }
            }
        }
    }
    out
}

/// `snapshots/<id>/manifest.json.age` files in a folder store.
pub fn manifests(store: &Path) -> Vec<PathBuf> {
    let dir = store.join("snapshots");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path().join(MANIFEST_OBJECT))
        .filter(|p| p.exists())
        .collect();
    out.sort();
    out
}

/// The public key `src`'s backups seal to: the store's newest repository key that its identity
/// opens (format 2; waiting a while for a backup that is starting to make it), else its
/// recipient (format 1).
pub fn sealing_recipient(src: &Source) -> String {
    let marker = src.store.join("immich-backup.json");
    let ids = Identities::load(&src.identity).expect("identity");
    let repo = Repository::open(&StorageConfig {
        url: format!("file://{}", src.store.display()),
        ..Default::default()
    })
    .unwrap();
    for _ in 0..300 {
        let format = fs::read(&marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["format"].as_u64());
        let opened = rt().block_on(immich_backup::repo::keys::open_keys(&repo, &ids));
        if let Some(o) = opened.ok().and_then(|o| o.into_iter().last()) {
            return o.key.public().to_string();
        }
        if format.is_some_and(|f| f < 2) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    src.recipient.clone()
}

/// `identity` with the repository keys it opens in the store of `storage` (what a restore reads
/// snapshots with).
pub fn unlocked_in(storage: &StorageConfig, identity: &Path) -> Arc<Identities> {
    let ids = Identities::load(identity).expect("identity");
    let repo = Repository::open(storage).unwrap();
    Arc::new(
        rt().block_on(immich_backup::repo::keys::unlock(&repo, &ids))
            .unwrap(),
    )
}

/// The content-address key of the newest repository key `identity` opens in the store of
/// `storage` (a backup to it has run).
pub fn content_key_in(storage: &StorageConfig, identity: &Path) -> [u8; 32] {
    let ids = Identities::load(identity).expect("identity");
    let repo = Repository::open(storage).unwrap();
    let opened = rt()
        .block_on(immich_backup::repo::keys::open_keys(&repo, &ids))
        .unwrap();
    let public = opened
        .last()
        .expect("a repository key")
        .key
        .public()
        .to_string();
    Recipients::load(&[public], None).unwrap().content_key()
}

/// The content-address key of `src`'s backups (see [`sealing_recipient`]).
pub fn content_key(src: &Source) -> [u8; 32] {
    Recipients::load(&[sealing_recipient(src)], None)
        .unwrap()
        .content_key()
}

/// The store key of the content object holding `bytes` in `src`'s store.
pub fn object_key(src: &Source, bytes: &[u8]) -> String {
    content_key_object(&content_key(src), bytes)
}

/// The store key of the content object holding `bytes`, under content-address key `key`.
pub fn content_key_object(key: &[u8; 32], bytes: &[u8]) -> String {
    ContentId(*blake3::keyed_hash(key, bytes).as_bytes()).key()
}

/// The store's repository key as `age -d -i` takes it, decrypted by hand from `src`'s key file
/// with the `age` command, as docs/FORMAT.md says: the newest `keys/*/*.age` that the identity
/// opens, written to `out`.
pub fn repository_identity_by_hand(src: &Source, out: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(src.store.join("keys"))
        .into_iter()
        .flatten()
        .map(|e| e.into_path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "age")
                && !p
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("machine-")
        })
        .collect();
    files.sort();
    for f in files.iter().rev() {
        let o = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(&src.identity)
            .arg(f)
            .output()
            .expect("the `age` command");
        if o.status.success() {
            fs::write(out, o.stdout).unwrap();
            return out.to_path_buf();
        }
    }
    panic!("no key file under keys/ opens with the identity")
}

/// Decrypt a snapshot's manifest with `identity`.
pub fn manifest(store: &Path, identity: &Path, id: &str) -> Manifest {
    let ids = Identities::load(identity).expect("identity");
    rt().block_on(async {
        let repo = Repository::open(&StorageConfig {
            url: format!("file://{}", store.display()),
            ..Default::default()
        })
        .unwrap();
        let reader = repo.unlock(std::sync::Arc::new(ids)).await.unwrap();
        restore::read_manifest(&reader, id).await.expect("manifest")
    })
}

/// Decrypt a snapshot's file list with `identity`.
pub fn file_list(store: &Path, identity: &Path, id: &str) -> Vec<Entry> {
    let m = manifest(store, identity, id);
    let ids = unlocked_in(
        &StorageConfig {
            url: format!("file://{}", store.display()),
            ..Default::default()
        },
        identity,
    );
    let sealed = std::fs::read(store.join(&m.files.key)).unwrap();
    let plain = ids.decrypt(&sealed[..], &m.files.key).unwrap();
    let mut gz = String::new();
    GzDecoder::new(plain).read_to_string(&mut gz).unwrap();
    BufReader::new(gz.as_bytes())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

/// Everything under `root` (all folders, generated ones too): path → (kind, mode, mtime, content
/// digest). For "nothing was written" checks.
pub fn tree_state(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if !root.exists() {
        return out;
    }
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let what = if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(e.path()).unwrap().display())
        } else if m.is_dir() {
            "dir".to_string()
        } else {
            format!(
                "file {} {}",
                m.len(),
                blake3::hash(&std::fs::read(e.path()).unwrap()).to_hex()
            )
        };
        out.insert(
            e.path().to_string_lossy().into_owned(),
            format!(
                "{what} mode {:o} mtime {}.{}",
                m.mode(),
                m.mtime(),
                m.mtime_nsec()
            ),
        );
    }
    out
}

/// Files under `root` whose name marks an unfinished restore write.
pub fn partial_files(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(".immich-backup-partial")
        })
        .map(|e| e.path().to_path_buf())
        .collect()
}

/// Does database `db` exist on `cluster`?
pub fn database_exists(cluster: &PgCluster, db: &str) -> bool {
    cluster
        .psql(
            "postgres",
            &format!("select count(*) from pg_database where datname = '{db}'"),
        )
        .unwrap()
        .trim()
        == "1"
}

/// Flip one byte in the middle of a file.
pub fn flip_middle_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

// ---------------------------------------------------------------------------------------------------
// Cloud stores

/// A storage config with short retries, so failures show quickly.
pub fn quick(mut s: StorageConfig) -> StorageConfig {
    s.retry_timeout_secs = 3;
    s.max_retries = 2;
    s.request_timeout_secs = 60;
    s
}

/// An S3 `[storage]` for `server`, with its credentials.
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
