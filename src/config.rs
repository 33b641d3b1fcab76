//! Configuration: a TOML file plus `IMMICH_BACKUP__<SECTION>__<KEY>` environment overrides.
//!
//! Every key has a default (documented, with the same values, in `config.example.toml`), so a config
//! file only names what differs. Secrets may live in the environment instead of the file
//! (`IMMICH_BACKUP__DATABASE__PASSWORD`, `PGPASSWORD`), and are never printed: `Debug` redacts them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub immich: ImmichConfig,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub encryption: EncryptionConfig,
    pub backup: BackupConfig,
    pub retention: crate::retention::RetentionConfig,
    pub schedule: crate::schedule::ScheduleConfig,
    pub lock: crate::lock::LockConfig,
    pub agent: crate::agent::AgentConfig,
}

/// `[immich]`: where the Immich files are.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImmichConfig {
    /// Host path of Immich's UPLOAD_LOCATION.
    pub upload_location: PathBuf,
    /// The folders under it that hold originals; generated ones are not backed up.
    pub folders: Vec<String>,
}

impl Default for ImmichConfig {
    fn default() -> Self {
        ImmichConfig {
            upload_location: PathBuf::from("/srv/immich/library"),
            folders: vec!["library".into(), "upload".into(), "profile".into()],
        }
    }
}

/// How the database is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseMode {
    /// Local `pg_dumpall`/`psql` binaries over TCP or a socket.
    #[default]
    Local,
    /// Inside the `immich_postgres` container through the Docker Engine API.
    Docker,
}

/// `[database]`.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    pub mode: DatabaseMode,
    /// DB_USERNAME.
    pub username: String,
    /// DB_DATABASE_NAME.
    pub database: String,
    /// Local mode: host name, IP or socket directory.
    pub host: String,
    pub port: u16,
    /// DB_PASSWORD; empty means `PGPASSWORD` from the environment, or none.
    pub password: String,
    /// Where `pg_dumpall` and `psql` live; empty means PATH.
    pub bin_dir: String,
    /// Docker mode: the Postgres container.
    pub container: String,
    /// Docker mode: the Immich server container.
    pub server_container: String,
    /// Docker mode: Engine address; empty means DOCKER_HOST or the local socket.
    pub docker_host: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            mode: DatabaseMode::Local,
            username: "postgres".into(),
            database: "immich".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            password: String::new(),
            bin_dir: String::new(),
            container: "immich_postgres".into(),
            server_container: "immich_server".into(),
            docker_host: String::new(),
        }
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("mode", &self.mode)
            .field("username", &self.username)
            .field("database", &self.database)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &redacted(&self.password))
            .field("bin_dir", &self.bin_dir)
            .field("container", &self.container)
            .finish_non_exhaustive()
    }
}

impl DatabaseConfig {
    /// The password to use: the configured one, else `PGPASSWORD`, else none.
    pub fn effective_password(&self) -> Option<String> {
        if !self.password.is_empty() {
            return Some(self.password.clone());
        }
        std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty())
    }
}

/// `[storage]`.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `file:///path`; cloud schemes come with the cloud backends.
    pub url: String,
    /// How many objects are read, encrypted and written at once.
    pub concurrency: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: "file:///var/backups/immich".into(),
            concurrency: 8,
        }
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("url", &crate::store::redact_url(&self.url))
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// `[encryption]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionConfig {
    /// age (`age1…`) or SSH (`ssh-ed25519 …`, `ssh-rsa …`) public keys.
    pub recipients: Vec<String>,
    /// A recipients file as `age -R` reads it.
    pub recipients_file: String,
    /// Only restore needs it: an age identity file (plain or passphrase-protected) or SSH private key.
    pub identity_file: String,
}

/// What to do with a file that cannot be read during backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnUnreadable {
    /// Record it in the snapshot as skipped, warn, finish, exit with code 3.
    #[default]
    Warn,
    /// Fail the backup; no snapshot is made.
    Fail,
}

/// `[backup]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    pub on_unreadable: OnUnreadable,
    /// gzip level of the database dump, 1 (fast) to 9 (small).
    pub compression_level: u32,
    /// Local cache of file metadata; empty means `$XDG_CACHE_HOME/immich-backup` or `~/.cache/immich-backup`.
    pub cache_dir: String,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            on_unreadable: OnUnreadable::Warn,
            compression_level: 1,
            cache_dir: String::new(),
        }
    }
}

fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 2] = ["immich.folders", "encryption.recipients"];

impl Config {
    /// Load `file` (if given) and apply environment overrides; then validate.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "{} does not exist; pass --config FILE or set IMMICH_BACKUP_CONFIG (see config.example.toml)",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let mut env = config::Environment::with_prefix("IMMICH_BACKUP")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",");
        for key in LIST_KEYS {
            env = env.with_list_parse_key(key);
        }
        let built = builder
            .add_source(env.try_parsing(true))
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let cfg: Config = built
            .try_deserialize()
            .map_err(|e| Error::Config(format!("{e} (see config.example.toml for every key)")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that need no I/O.
    pub fn validate(&self) -> Result<()> {
        self.retention.validate()?;
        self.schedule.validate()?;
        self.lock.validate()?;
        self.agent.validate()?;
        if self.immich.folders.is_empty() {
            return Err(Error::Config(
                "[immich] folders is empty; list the originals folders (library, upload, profile)"
                    .into(),
            ));
        }
        for f in &self.immich.folders {
            let p = Path::new(f);
            if f.is_empty()
                || p.is_absolute()
                || p.components().count() != 1
                || f == ".."
                || f == "."
            {
                return Err(Error::Config(format!(
                    "[immich] folders entry {f:?} must be a single folder name under upload_location"
                )));
            }
        }
        if !(1..=9).contains(&self.backup.compression_level) {
            return Err(Error::Config(
                "[backup] compression_level must be 1 to 9".into(),
            ));
        }
        if self.storage.concurrency == 0 {
            return Err(Error::Config(
                "[storage] concurrency must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The local cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        if !self.backup.cache_dir.is_empty() {
            return PathBuf::from(&self.backup.cache_dir);
        }
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(x).join("immich-backup");
        }
        if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(h).join(".cache").join("immich-backup");
        }
        std::env::temp_dir().join("immich-backup-cache")
    }
}
