//! Shared helpers of the integration tests: a source install (throwaway cluster + sample library +
//! store + identity), config files for the real binary, running it, and looking inside the store.

#![allow(dead_code)]

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
use immich_backup::repo::Repository;
use immich_backup::restore;
use immich_backup::{db, demo};
use tempfile::TempDir;

/// The real binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_immich-backup");

/// Asset rows in the sample databases: small, so the suite stays quick.
pub const ASSETS: usize = 300;

/// The Immich database name everywhere in these tests.
pub const DB: &str = "immich";

/// A tokio runtime for calling the library's async API from plain `#[test]`s.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Sleep until every file written so far has settled: changed long enough before a backup's walk
/// for the metadata cache (and the read-ahead) to let its metadata stand for its content
/// (`collect::SETTLE_NS`).
pub fn wait_until_settled() {
    let settle = std::time::Duration::from_nanos(immich_backup::backup::collect::SETTLE_NS as u64);
    std::thread::sleep(settle + std::time::Duration::from_millis(500));
}

/// A new temporary folder (removed on drop).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("immich-backup-test-")
        .tempdir()
        .expect("tempdir")
}

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
    pub lib: SampleLibrary,
    pub work: TempDir,
}

impl Source {
    /// A source with `assets` asset rows.
    pub fn new(assets: usize) -> Source {
        let work = tempdir();
        let cluster = PgCluster::start(None).expect("start the source cluster");
        sample::create_immich_like_db(&cluster, DB, assets).expect("Immich-like database");
        let upload = work.path().join("upload-location");
        let lib = sample::create_sample_library(&upload).expect("sample library");
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
            work,
        }
    }

    /// The library config of this install (as the demo builds it).
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

    /// The config file contents for the binary, pointing at this install.
    pub fn toml(&self) -> ConfigToml {
        ConfigToml {
            port: self.cluster.port,
            bin_dir: self.cluster.bin_dir.clone(),
            upload_location: self.upload.clone(),
            store: self.store.clone(),
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

    /// Back up through the library API.
    pub fn backup_lib(&self) -> BackupReport {
        backup_with(&self.config())
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

/// Run one backup of `cfg` through the library API.
pub fn backup_with(cfg: &Config) -> BackupReport {
    rt().block_on(async {
        let repo = Repository::open(&cfg.storage).expect("open store");
        let database = db::connect(&cfg.database).expect("database");
        let recipients = Recipients::load(&cfg.encryption.recipients, None).expect("recipients");
        backup::run(
            cfg,
            database.as_ref(),
            &repo,
            recipients,
            Progress::hidden(),
        )
        .await
        .expect("backup")
    })
}

/// The pieces of a config file the tests vary.
pub struct ConfigToml {
    pub port: u16,
    pub bin_dir: PathBuf,
    pub upload_location: PathBuf,
    pub store: PathBuf,
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
        let url = format!("file://{}", self.store.display());
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
             [storage]\nurl = {url:?}\n\n\
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

    /// The stderr lines that are not log lines (what the CLI itself printed).
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error"))
            .collect()
    }
}

/// A command for the binary with `--config`, `--no-progress`, and no stray environment.
pub fn command(config: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("IMMICH_BACKUP") || k.starts_with("PG") {
            cmd.env_remove(k);
        }
    }
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--no-progress").args(args).stdin(Stdio::null());
    cmd
}

/// Run the binary to completion.
pub fn cli(config: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(config, args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run immich-backup");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

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

/// The store key of the content object holding `bytes`, for a backup encrypted to `recipients`.
pub fn object_key(recipients: &[String], bytes: &[u8]) -> String {
    let key = Recipients::load(recipients, None).unwrap().content_key();
    ContentId(*blake3::keyed_hash(&key, bytes).as_bytes()).key()
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
        restore::read_manifest(&repo.reader(std::sync::Arc::new(ids)), id)
            .await
            .expect("manifest")
    })
}

/// Decrypt a snapshot's file list with `identity`.
pub fn file_list(store: &Path, identity: &Path, id: &str) -> Vec<Entry> {
    let m = manifest(store, identity, id);
    let ids = Arc::new(Identities::load(identity).unwrap());
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

/// The originals under `target` are those under `upload`, byte for byte, with modes and times.
pub fn assert_same_originals(upload: &Path, target: &Path) {
    let folders: Vec<String> = sample::ORIGINAL_FOLDERS
        .iter()
        .map(|f| f.to_string())
        .collect();
    let diff = demo::compare_trees(upload, target, &folders).unwrap();
    assert!(diff.differences.is_empty(), "{:?}", diff.differences);
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
