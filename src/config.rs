//! Configuration: a TOML file plus `IMMICH_BACKUP__<SECTION>__<KEY>` environment overrides.
//!
//! Every key has a default (documented, with the same values, in `config.example.toml`), so a config
//! file only names what differs. Secrets may live in the environment instead of the file
//! (`IMMICH_BACKUP__DATABASE__PASSWORD`, `PGPASSWORD`), and are never printed: `Debug` redacts them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    pub retention: crate::policy::retention::RetentionConfig,
    pub schedule: crate::policy::schedule::ScheduleConfig,
    pub lock: LockConfig,
    pub agent: AgentConfig,
    pub check: CheckConfig,
    pub notify: NotifyConfig,
    pub hooks: HooksConfig,
    /// The path keys the config file gave as relative paths (`"[encryption] recipients_file"` →
    /// the text typed), now read from the config file's folder; for messages.
    #[serde(skip)]
    pub typed_paths: BTreeMap<String, String>,
}

/// `[immich]`: where the Immich files are.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImmichConfig {
    /// Host path of Immich's UPLOAD_LOCATION.
    pub upload_location: PathBuf,
    /// The folders under it that hold originals; generated ones are not backed up.
    pub folders: Vec<String>,
    /// Where Immich's server container has UPLOAD_LOCATION when it is not `/data` (nor the older
    /// `/usr/src/app/upload`): its IMMICH_MEDIA_LOCATION. Empty: not set.
    pub media_location: String,
    /// External libraries to back up with every snapshot (and restore to their host paths).
    pub external_libraries: Vec<ExternalLibraryConfig>,
    /// Immich's `.env`: fills `upload_location` and `[database] username`, `password` and
    /// `database` from UPLOAD_LOCATION, DB_USERNAME, DB_PASSWORD and DB_DATABASE_NAME, for the keys
    /// not set explicitly. Empty: not used.
    pub env_file: String,
    /// Glob patterns of snapshot paths (`library/admin/2024/x.tmp`, `external/…`) not to back up.
    pub exclude: Vec<String>,
}

impl Default for ImmichConfig {
    fn default() -> Self {
        ImmichConfig {
            upload_location: PathBuf::from("/srv/immich/library"),
            folders: crate::immich::ORIGINAL_FOLDERS.map(String::from).to_vec(),
            media_location: String::new(),
            external_libraries: Vec::new(),
            env_file: String::new(),
            exclude: Vec::new(),
        }
    }
}

/// One `[immich] external_libraries` entry: an Immich external library, as its import path is
/// mounted in the server container and where that folder is on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalLibraryConfig {
    /// The path Immich sees (the library's import path, or a folder above it).
    pub container_path: String,
    /// The same folder on this machine: backed up from here, and restored to here.
    pub host_path: PathBuf,
}

impl ImmichConfig {
    /// `exclude`, compiled (checked at load, so a backup can take it as valid).
    pub fn excludes(&self) -> std::result::Result<crate::immich::exclude::Excludes, String> {
        crate::immich::exclude::Excludes::new(&self.exclude)
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("[immich] {what}")));
        if !self.media_location.is_empty() && !self.media_location.starts_with('/') {
            return bad(format!(
                "media_location {:?} must be an absolute path (Immich's IMMICH_MEDIA_LOCATION, e.g. \"/data\"), or empty",
                self.media_location
            ));
        }
        if let Err(e) = self.excludes() {
            return bad(format!(
                "exclude: {e}; see config.example.toml for the pattern syntax"
            ));
        }
        let mut seen: Vec<(String, &Path)> = Vec::new();
        for l in &self.external_libraries {
            let Some(folder) = crate::immich::paths::external_folder(&l.container_path) else {
                return bad(format!(
                    "external_libraries: container_path {:?} must be an absolute path other than \"/\" (the library's import path as Immich sees it)",
                    l.container_path
                ));
            };
            if !l.host_path.is_absolute() {
                return bad(format!(
                    "external_libraries: host_path {} (for {}) must be an absolute path",
                    l.host_path.display(),
                    l.container_path
                ));
            }
            if nested(&l.host_path, &self.upload_location) {
                return bad(format!(
                    "external_libraries: host_path {} and upload_location {} are inside one another; an external library is a folder of its own",
                    l.host_path.display(),
                    self.upload_location.display()
                ));
            }
            for (other, host) in &seen {
                if nested(Path::new(other), Path::new(&folder)) || nested(host, &l.host_path) {
                    return bad(format!(
                        "external_libraries: {} ({}) and an earlier entry are inside one another; list each library once",
                        l.container_path,
                        l.host_path.display()
                    ));
                }
            }
            seen.push((folder, &l.host_path));
        }
        if self
            .folders
            .iter()
            .any(|f| f == crate::immich::paths::EXTERNAL_FOLDER)
        {
            return bad(format!(
                "folders: {:?} is reserved for external libraries in snapshots; it is not an Immich folder",
                crate::immich::paths::EXTERNAL_FOLDER
            ));
        }
        Ok(())
    }
}

/// Whether one of `a` and `b` is inside the other (or they are the same), component-wise.
fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// How the database is reached (`"docker"` or `"local"`, in any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatabaseMode {
    /// Local `pg_dumpall`/`psql` binaries over TCP or a socket.
    Local,
    /// Inside the `immich_postgres` container through the Docker Engine API (the default).
    #[default]
    Docker,
}

/// A one-word setting read case-insensitively; an unknown word names the key and the valid ones.
fn one_of<'de, D: serde::Deserializer<'de>, T: Copy>(
    d: D,
    key: &str,
    words: &[(&str, T)],
) -> std::result::Result<T, D::Error> {
    let text = String::deserialize(d)?;
    words
        .iter()
        .find(|(w, _)| w.eq_ignore_ascii_case(text.trim()))
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let valid: Vec<String> = words.iter().map(|(w, _)| format!("{w:?}")).collect();
            serde::de::Error::custom(format!("{key} = {text:?}: use {}", valid.join(" or ")))
        })
}

impl<'de> Deserialize<'de> for DatabaseMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        one_of(
            d,
            "[database] mode",
            &[
                ("docker", DatabaseMode::Docker),
                ("local", DatabaseMode::Local),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for OnUnreadable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        one_of(
            d,
            "[backup] on_unreadable",
            &[("warn", OnUnreadable::Warn), ("fail", OnUnreadable::Fail)],
        )
    }
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
            mode: DatabaseMode::Docker,
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
    pub(crate) fn effective_password(&self) -> Option<String> {
        if !self.password.is_empty() {
            return Some(self.password.clone());
        }
        std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty())
    }
}

/// `[storage]`: where the backups go, and how to talk to it.
///
/// Credentials are optional here: when absent, the standard places are used (`AWS_*` variables and
/// the shared credentials file, `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_*`). Secrets set here
/// can also come from the environment (`IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY`, …); `Debug`
/// never shows them.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` (and the
    /// other spellings object_store parses, e.g. `https://ACCOUNT.blob.core.windows.net/container`).
    pub url: String,
    /// How many objects are read, encrypted and written at once; also the most multipart parts in
    /// flight at once across all of them.
    pub concurrency: usize,
    /// S3-compatible endpoint (`https://s3.eu-central-003.backblazeb2.com`), Azure blob endpoint, or
    /// GCS base URL; empty means the provider's own.
    pub endpoint: String,
    /// S3 region; empty means `AWS_REGION`/`AWS_DEFAULT_REGION`, the profile's, or `us-east-1`.
    pub region: String,
    /// Allow plain `http://` endpoints (a MinIO or Garage on the LAN).
    pub allow_http: bool,
    /// Storage class of new objects (S3 `STANDARD_IA`, GCS `NEARLINE`, Azure access tier `Cool`);
    /// empty means the bucket's default.
    pub storage_class: String,
    /// S3 credentials; empty means `AWS_ACCESS_KEY_ID` etc., then the shared credentials file.
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// Azure storage account and key; empty means `AZURE_STORAGE_ACCOUNT_NAME`/`_KEY` etc.
    pub account_name: String,
    pub account_key: String,
    /// Google service account JSON file; empty means `GOOGLE_APPLICATION_CREDENTIALS` etc.
    pub service_account: String,
    /// WebDAV user name; empty means the user in the URL (`webdavs://USER@host/path`).
    pub username: String,
    /// WebDAV password (or `IMMICH_BACKUP__STORAGE__PASSWORD`); for SFTP, the login password,
    /// tried after the key file or ssh-agent.
    pub password: String,
    /// SFTP: an OpenSSH private key file to log in with; empty means ssh-agent (`SSH_AUTH_SOCK`),
    /// then `password`.
    pub ssh_key_file: String,
    /// SFTP: the passphrase of a protected `ssh_key_file` (or
    /// `IMMICH_BACKUP__STORAGE__SSH_KEY_PASSPHRASE`).
    pub ssh_key_passphrase: String,
    /// SFTP: the known_hosts file the server's key is checked against; empty means
    /// `~/.ssh/known_hosts`.
    pub known_hosts_file: String,
    /// SFTP: the server's public key (`ssh-ed25519 AAAA…`), pinned instead of known_hosts.
    pub ssh_host_key: String,
    /// Give up on a request that keeps failing (5xx, connection errors) after this many seconds
    /// of retrying with exponential backoff.
    pub retry_timeout_secs: u64,
    /// … or after this many retries.
    pub max_retries: usize,
    /// Longest one request (an 8 MiB part on a slow uplink) may take.
    pub request_timeout_secs: u64,
    /// Create objects with a conditional write (never overwrite). Set false only for a server that
    /// rejects conditional writes (`init` tells); then a check-then-write is used.
    pub conditional_create: bool,
    /// Folder stores: write content objects with `O_DIRECT`, past the page cache (faster, and the
    /// backup does not evict what the server had cached). Set false for a file system where direct
    /// writes are slow (some network mounts); where they are refused, the page cache is used anyway.
    pub direct_io: bool,
    /// Most bytes a second sent to a cloud store, all requests together (`"20MiB/s"`, `"50Mbit/s"`;
    /// a bare number is KiB/s, as restic's `--limit-upload`). Empty: no limit.
    pub upload_limit: String,
    /// Most bytes a second received from a cloud store. Empty: no limit.
    pub download_limit: String,
    /// Further object_store builder options, passed as they are (`virtual_hosted_style_request`,
    /// `sse_kms_key_id`, `sas_token`, …). Values of keys that look secret (`*key*`, `*token*`,
    /// `*secret*`, …) are scrubbed from errors; `Debug` shows no values at all.
    pub options: BTreeMap<String, String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: "file:///var/backups/immich".into(),
            concurrency: 8,
            endpoint: String::new(),
            region: String::new(),
            allow_http: false,
            storage_class: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            session_token: String::new(),
            account_name: String::new(),
            account_key: String::new(),
            service_account: String::new(),
            username: String::new(),
            password: String::new(),
            ssh_key_file: String::new(),
            ssh_key_passphrase: String::new(),
            known_hosts_file: String::new(),
            ssh_host_key: String::new(),
            retry_timeout_secs: 180,
            max_retries: 10,
            request_timeout_secs: 300,
            conditional_create: true,
            direct_io: true,
            upload_limit: String::new(),
            download_limit: String::new(),
            options: BTreeMap::new(),
        }
    }
}

impl StorageConfig {
    /// `upload_limit` and `download_limit` in bytes a second (`None`: no limit).
    pub fn limits(&self) -> Result<(Option<u64>, Option<u64>)> {
        let rate = |key: &str, text: &str| {
            parse_rate(text).map_err(|e| Error::Config(format!("[storage] {key} = {e}")))
        };
        Ok((
            rate("upload_limit", &self.upload_limit)?,
            rate("download_limit", &self.download_limit)?,
        ))
    }

    /// Every secret value in this section, to be scrubbed from anything shown.
    pub fn secrets(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            &self.secret_access_key,
            &self.session_token,
            &self.account_key,
            &self.password,
            &self.ssh_key_passphrase,
        ]
        .into_iter()
        .chain(
            self.options
                .iter()
                .filter(|(k, _)| {
                    ["key", "secret", "token", "password", "sas", "credential"]
                        .iter()
                        .any(|w| k.contains(w))
                })
                .map(|(_, v)| v),
        )
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<&String> = self.options.keys().collect();
        f.debug_struct("StorageConfig")
            .field("url", &crate::redact::redact_url(&self.url))
            .field("concurrency", &self.concurrency)
            .field("endpoint", &crate::redact::redact_url(&self.endpoint))
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("storage_class", &self.storage_class)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("account_name", &self.account_name)
            .field("account_key", &redacted(&self.account_key))
            .field("service_account", &self.service_account)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("ssh_key_file", &self.ssh_key_file)
            .field("ssh_key_passphrase", &redacted(&self.ssh_key_passphrase))
            .field("known_hosts_file", &self.known_hosts_file)
            .field("ssh_host_key", &self.ssh_host_key)
            .field("retry_timeout_secs", &self.retry_timeout_secs)
            .field("max_retries", &self.max_retries)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("conditional_create", &self.conditional_create)
            .field("direct_io", &self.direct_io)
            .field("upload_limit", &self.upload_limit)
            .field("download_limit", &self.download_limit)
            .field("options (values redacted)", &options)
            .finish()
    }
}

/// `[encryption]`.
#[derive(Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionConfig {
    /// age (`age1…`) or SSH (`ssh-ed25519 …`, `ssh-rsa …`) public keys.
    pub recipients: Vec<String>,
    /// A recipients file as `age -R` reads it.
    pub recipients_file: String,
    /// Only restore needs it: an age identity file (plain or passphrase-protected) or SSH private key.
    pub identity_file: String,
    /// The backup machine's signing key file (`keygen` or `signing-key` writes it): snapshots are
    /// signed with it, so a restore replays only what this machine wrote.
    pub signing_key_file: String,
    /// The signing key itself (`IMMICH-BACKUP-SIGNING-KEY-1…`), e.g. from
    /// `IMMICH_BACKUP__ENCRYPTION__SIGNING_KEY`; never shown.
    pub signing_key: String,
    /// Restore: verification keys (`immich-verify1…`) trusted besides the one derived from the
    /// identity (a signing key made with `signing-key --new`, another family member's identity).
    pub verify_keys: Vec<String>,
}

impl std::fmt::Debug for EncryptionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionConfig")
            .field("recipients", &self.recipients)
            .field("recipients_file", &self.recipients_file)
            .field("identity_file", &self.identity_file)
            .field("signing_key_file", &self.signing_key_file)
            .field("signing_key", &redacted(&self.signing_key))
            .field("verify_keys", &self.verify_keys)
            .finish()
    }
}

impl EncryptionConfig {
    /// The backup machine's signing keys (`signing_key` and `signing_key_file`), and the recipients
    /// the key file says they were made for.
    pub fn signing_keys(&self) -> Result<(Vec<crate::crypto::sign::SigningKey>, Vec<String>)> {
        let file =
            (!self.signing_key_file.is_empty()).then(|| PathBuf::from(&self.signing_key_file));
        crate::crypto::sign::load_signing_keys(&self.signing_key, file.as_deref())
    }

    /// The configured verification keys, parsed.
    pub fn verify_keys(&self) -> Result<Vec<crate::crypto::sign::VerifyKey>> {
        self.verify_keys
            .iter()
            .map(|k| {
                k.parse()
                    .map_err(|e| Error::Config(format!("[encryption] verify_keys: {e}")))
            })
            .collect()
    }
}

/// What to do with a file that cannot be read during backup (`"warn"` or `"fail"`, in any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnreadable {
    /// Record it in the snapshot as skipped, warn, finish, exit with code 3.
    #[default]
    Warn,
    /// Fail the backup; no snapshot is made.
    Fail,
}

/// What to do when files Immich's database names are not in the snapshot (deleted or moved
/// outside Immich).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMissingOriginal {
    /// Record them in the snapshot, warn, finish, exit with code 3.
    #[default]
    Warn,
    /// Record them and log them at INFO; exit 0.
    Ignore,
}

impl<'de> Deserialize<'de> for OnMissingOriginal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let values = [
            ("warn", OnMissingOriginal::Warn),
            ("ignore", OnMissingOriginal::Ignore),
        ];
        one_of(d, "[backup] on_missing_original", &values)
    }
}

/// `[backup]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    pub on_unreadable: OnUnreadable,
    pub on_missing_original: OnMissingOriginal,
    /// gzip level of the database dump, 1 (fast) to 9 (small).
    pub compression_level: u32,
    /// Local cache of file metadata; empty means `$XDG_CACHE_HOME/immich-backup` or `~/.cache/immich-backup`.
    pub cache_dir: String,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            on_unreadable: OnUnreadable::Warn,
            on_missing_original: OnMissingOriginal::Warn,
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
const LIST_KEYS: [&str; 6] = [
    "immich.folders",
    "encryption.recipients",
    "encryption.verify_keys",
    "notify.on",
    "notify.ntfy.tags",
    "notify.email.to",
];

/// The keys `[immich] env_file` fills when they are not set explicitly.
const ENV_FILE_KEYS: [&str; 4] = [
    "immich.upload_location",
    "database.username",
    "database.password",
    "database.database",
];

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
        // No try_parsing: it would turn a secret such as "0123" into the number 123. The
        // deserializer converts strings to the numbers and booleans a key needs; the list keys
        // are split here instead.
        let env = config::Environment::with_prefix("IMMICH_BACKUP")
            .prefix_separator("__")
            .separator("__");
        builder = builder.add_source(env);
        for key in LIST_KEYS {
            let var = format!("IMMICH_BACKUP__{}", key.replace('.', "__").to_uppercase());
            if let Ok(value) = std::env::var(&var) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                builder = builder
                    .set_override(key, items)
                    .map_err(|e| Error::Config(format!("{var}: {e}")))?;
            }
        }
        let built = builder.build().map_err(|e| Error::Config(e.to_string()))?;
        // The keys an `[immich] env_file` may fill: only those not set in the file or environment.
        let unset: Vec<&str> = ENV_FILE_KEYS
            .into_iter()
            .filter(|k| built.get::<config::Value>(k).is_err())
            .collect();
        let mut cfg: Config = built.try_deserialize().map_err(|e| {
            // Our own messages name their key already ("[database] mode = …: use …").
            let text = e.to_string();
            let text = match text.find(" for key `") {
                Some(at) if text.starts_with('[') => text[..at].to_string(),
                _ => text,
            };
            Error::Config(format!("{text} (see config.example.toml for every key)"))
        })?;
        if let Some(path) = file {
            let folder = std::path::absolute(path)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            cfg.resolve_paths(&folder);
        }
        cfg.apply_env_file(&unset)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Fill the `unset` keys from `[immich] env_file`, if one is given.
    fn apply_env_file(&mut self, unset: &[&str]) -> Result<()> {
        if self.immich.env_file.is_empty() {
            return Ok(());
        }
        let env = crate::immich::env_file::read(Path::new(&self.immich.env_file))?;
        let fill = |key: &str, value: Option<String>, into: &mut String| {
            if let Some(v) = value.filter(|_| unset.contains(&key)) {
                *into = v;
            }
        };
        let db = &mut self.database;
        fill("database.username", env.username, &mut db.username);
        fill("database.password", env.password, &mut db.password);
        fill("database.database", env.database, &mut db.database);
        if let Some(p) = env.upload_location {
            if unset.contains(&"immich.upload_location") {
                self.immich.upload_location = p;
            }
        }
        Ok(())
    }

    /// Relative paths from the config file are read from its folder, `folder`; those from the
    /// environment (`IMMICH_BACKUP__…`) stay relative to the current folder.
    fn resolve_paths(&mut self, folder: &Path) {
        let mut typed = BTreeMap::new();
        let mut resolve = |section: &str, key: &str, value: &mut String| {
            let var = format!("IMMICH_BACKUP__{section}__{key}").to_uppercase();
            let from_env =
                std::env::vars_os().any(|(k, _)| k.to_string_lossy().eq_ignore_ascii_case(&var));
            if value.is_empty() || from_env || Path::new(value.as_str()).is_absolute() {
                return;
            }
            typed.insert(format!("[{section}] {key}"), value.clone());
            *value = folder.join(value.as_str()).display().to_string();
        };
        let mut upload = self.immich.upload_location.display().to_string();
        resolve("immich", "upload_location", &mut upload);
        resolve("immich", "env_file", &mut self.immich.env_file);
        self.immich.upload_location = PathBuf::from(upload);
        resolve("database", "bin_dir", &mut self.database.bin_dir);
        resolve(
            "storage",
            "service_account",
            &mut self.storage.service_account,
        );
        let e = &mut self.encryption;
        resolve("encryption", "recipients_file", &mut e.recipients_file);
        resolve("encryption", "identity_file", &mut e.identity_file);
        resolve("encryption", "signing_key_file", &mut e.signing_key_file);
        resolve("backup", "cache_dir", &mut self.backup.cache_dir);
        resolve("check", "identity_file", &mut self.check.identity_file);
        self.typed_paths = typed;
    }

    /// Path key `key` (`"[encryption] recipients_file"`) with its value, for a message: the text
    /// typed and, when it was relative, where it was looked for.
    pub fn describe_path(&self, key: &str, value: &Path) -> String {
        match self.typed_paths.get(key) {
            Some(typed) => format!(
                "{key} = {typed:?} (read as {}: a relative path in the config file is read from the config file's folder)",
                value.display()
            ),
            None => format!("{key} = {:?}", value.display().to_string()),
        }
    }

    /// The file path key `key` names (its value `value`), or an error naming the key when it
    /// cannot be opened.
    pub fn existing_file(&self, key: &str, value: &str) -> Result<PathBuf> {
        let path = PathBuf::from(value);
        match std::fs::File::open(&path) {
            Ok(_) => Ok(path),
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        "no such file; correct the path (or create the file)".to_string()
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "permission denied; run as a user that may read it".to_string()
                    }
                    _ => e.to_string(),
                };
                Err(Error::Config(format!(
                    "{}: {why}",
                    self.describe_path(key, &path)
                )))
            }
        }
    }

    /// Checks that need no I/O.
    pub(crate) fn validate(&self) -> Result<()> {
        self.retention.validate()?;
        self.schedule.validate()?;
        self.lock.validate()?;
        self.agent.validate()?;
        self.storage.limits()?;
        self.check.validate(&self.schedule.timezone)?;
        self.immich.validate()?;
        self.notify.validate()?;
        self.hooks.validate()?;
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
        if self.storage.request_timeout_secs == 0 {
            return Err(Error::Config(
                "[storage] request_timeout_secs must be at least 1".into(),
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

/// `[lock]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockConfig {
    /// A lock not refreshed for this many seconds is stale (its holder died or lost the store).
    pub stale_secs: u64,
    /// How long a command waits for a conflicting lock to be released before it gives up (exit 11).
    pub wait_secs: u64,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            stale_secs: 1800,
            wait_secs: 120,
        }
    }
}

impl LockConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.stale_secs < 2 {
            return Err(Error::Config(
                "[lock] stale_secs must be at least 2 (default 1800)".into(),
            ));
        }
        Ok(())
    }

    pub fn stale(&self) -> Duration {
        Duration::from_secs(self.stale_secs)
    }

    pub(crate) fn refresh_interval(&self) -> Duration {
        self.stale() / 6
    }
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Address of the health endpoint (`:2284`, `127.0.0.1:2284`); empty: off.
    pub listen: String,
    /// Seconds after a scheduled time by which its backup must have succeeded before `/healthz`
    /// reports it overdue; 0: one schedule interval.
    pub grace_secs: u64,
    /// healthchecks.io-style base URL: `<url>/start` when a backup starts, `<url>` on success,
    /// `<url>/fail` on failure. Empty: no pings.
    pub ping_url: String,
    /// Override the start / success / failure URLs individually.
    pub ping_start_url: String,
    pub ping_success_url: String,
    pub ping_failure_url: String,
    /// Seconds a ping may take.
    pub ping_timeout_secs: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: String::new(),
            grace_secs: 0,
            ping_url: String::new(),
            ping_start_url: String::new(),
            ping_success_url: String::new(),
            ping_failure_url: String::new(),
            ping_timeout_secs: 10,
        }
    }
}

impl AgentConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if !self.listen.is_empty() {
            parse_listen(&self.listen)?;
        }
        for (key, url) in [
            ("ping_url", &self.ping_url),
            ("ping_start_url", &self.ping_start_url),
            ("ping_success_url", &self.ping_success_url),
            ("ping_failure_url", &self.ping_failure_url),
        ] {
            if url.is_empty() {
                continue;
            }
            match url::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => {
                    return Err(Error::Config(format!(
                        "[agent] {key} must be an http:// or https:// URL"
                    )))
                }
            }
        }
        Ok(())
    }

    pub(crate) fn grace(&self) -> Option<Duration> {
        (self.grace_secs > 0).then(|| Duration::from_secs(self.grace_secs))
    }
}

/// `[check]`: the checks the agent runs on its own schedules (besides the backups).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckConfig {
    /// When the agent runs `check` (a cron expression like `[schedule] cron`, in its time zone);
    /// empty: never. With `identity_file` it is `check --identity`: file lists and dumps too.
    pub cron: String,
    /// When the agent reads a slice of the data back (`check --read-data-subset n/m`, n moving on
    /// by one each run); empty: never. Needs `identity_file`.
    pub read_data_cron: String,
    /// m: in how many runs of `read_data_cron` every content object is read once.
    pub read_data_slices: u32,
    /// The identity for what needs one (file lists, dumps, reading data back). Empty: the agent
    /// never holds it, and `cron` checks only what the backup machine can read.
    pub identity_file: String,
    /// healthchecks.io-style URL pinged after each check: `<url>` when it found nothing,
    /// `<url>/fail` with the problems. Empty: problems go to `[agent]`'s failure ping.
    pub ping_url: String,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            cron: String::new(),
            read_data_cron: String::new(),
            read_data_slices: 7,
            identity_file: String::new(),
            ping_url: String::new(),
        }
    }
}

impl CheckConfig {
    fn validate(&self, timezone: &str) -> Result<()> {
        for (key, expr) in [
            ("[check] cron", &self.cron),
            ("[check] read_data_cron", &self.read_data_cron),
        ] {
            if !expr.is_empty() {
                crate::policy::schedule::Schedule::parse_as(key, expr, timezone)?;
            }
        }
        if !self.read_data_cron.is_empty() && self.identity_file.is_empty() {
            return Err(Error::Config("[check] read_data_cron needs [check] identity_file: reading data back decrypts it (or remove read_data_cron; see the README's \"Checking the store\" for the trade-off)".into()));
        }
        if self.read_data_slices == 0 {
            return Err(Error::Config(
                "[check] read_data_slices must be at least 1 (7: a daily read_data_cron reads everything in a week)".into(),
            ));
        }
        if !self.ping_url.is_empty()
            && !url::Url::parse(&self.ping_url)
                .is_ok_and(|u| u.scheme() == "http" || u.scheme() == "https")
        {
            return Err(Error::Config(
                "[check] ping_url must be an http:// or https:// URL".into(),
            ));
        }
        Ok(())
    }
}

/// Parse a bandwidth limit: `20MiB/s`, `500KiB/s`, `50Mbit/s`, `2.5MB/s` (the `/s` may be left out);
/// a bare number is KiB/s, as restic's `--limit-upload`. `None`: no limit (empty or 0).
pub fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let value: f64 = num.parse().map_err(|_| {
        format!("{text:?} is not a rate: write e.g. \"20MiB/s\", \"500KiB/s\" or \"50Mbit/s\"")
    })?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "k" | "kib" => 1024.0,
        "b" => 1.0,
        "kb" => 1000.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "kbit" => 1000.0 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB, KB, MB, GB, Kbit, Mbit or Gbit (per second)"
            ))
        }
    };
    let bytes = (value * scale).round();
    if !bytes.is_finite() || bytes < 0.0 {
        return Err(format!("{text:?} is not a rate"));
    }
    Ok((bytes >= 1.0).then_some(bytes as u64))
}

/// Parse `[agent] listen`: `host:port`, `[v6]:port`, or `:port` (all interfaces).
pub(crate) fn parse_listen(listen: &str) -> Result<SocketAddr> {
    let full = if let Some(port) = listen.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        listen.to_string()
    };
    full.parse().map_err(|_| {
        Error::Config(format!(
            "[agent] listen {listen:?} is not an address: use \":2284\" (every interface), \"127.0.0.1:2284\" or \"[::]:2284\""
        ))
    })
}

/// How a run ended, for `[notify] on`, the notifications and the hooks' `IMMICH_BACKUP_STATUS`
/// (`"success"`, `"partial"` or `"failure"`, in any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    /// Finished, exit 0.
    Success,
    /// Finished with exit 3: files could not be read, or originals the database names are missing.
    Partial,
    /// Did not finish (any other exit code).
    Failure,
}

impl RunStatus {
    /// The word used in the config, the environment of hooks and the webhook's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Success => "success",
            RunStatus::Partial => "partial",
            RunStatus::Failure => "failure",
        }
    }
}

impl<'de> Deserialize<'de> for RunStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        one_of(
            d,
            "[notify] on",
            &[
                ("failure", RunStatus::Failure),
                ("partial", RunStatus::Partial),
                ("success", RunStatus::Success),
            ],
        )
    }
}

/// `[notify]`: who hears about a backup (and about the agent's scheduled checks) and when. Every
/// channel is off until its URL is set; a notification that cannot be delivered is a warning in
/// the log and never changes the run's outcome or exit code.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Which outcomes are sent: `"failure"`, `"partial"`, `"success"`.
    pub on: Vec<RunStatus>,
    /// Longest one channel may take to deliver (connect, send, answer), in seconds.
    pub timeout_secs: u64,
    pub ntfy: NtfyConfig,
    pub webhook: WebhookConfig,
    pub email: EmailConfig,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            on: vec![RunStatus::Failure, RunStatus::Partial],
            timeout_secs: 30,
            ntfy: NtfyConfig::default(),
            webhook: WebhookConfig::default(),
            email: EmailConfig::default(),
        }
    }
}

/// `[notify.ntfy]`: a message to an ntfy topic (<https://ntfy.sh> or a server of your own).
#[derive(Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NtfyConfig {
    /// The topic's URL, `https://ntfy.sh/my-immich-backups`; empty: off.
    pub url: String,
    /// `1`–`5` or `min`, `low`, `default`, `high`, `max`/`urgent`; empty: by outcome (failure
    /// `high`, partial `default`, success `low`).
    pub priority: String,
    /// Tags (emoji short codes such as `floppy_disk` show as emoji), besides the outcome's own.
    pub tags: Vec<String>,
    /// Access token (`tk_…`), sent as `Authorization: Bearer`; also
    /// `IMMICH_BACKUP__NOTIFY__NTFY__TOKEN`. Never shown.
    pub token: String,
}

/// The body `[notify.webhook]` posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFormat {
    /// Every field of the event as JSON (Gotify-, Apprise- or script-friendly).
    #[default]
    Json,
    /// `{"content": …}`, as a Discord webhook takes it.
    Discord,
    /// `{"text": …}`, as a Slack (or Mattermost, Rocket.Chat) incoming webhook takes it.
    Slack,
}

impl<'de> Deserialize<'de> for WebhookFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        one_of(
            d,
            "[notify.webhook] format",
            &[
                ("json", WebhookFormat::Json),
                ("discord", WebhookFormat::Discord),
                ("slack", WebhookFormat::Slack),
            ],
        )
    }
}

/// `[notify.webhook]`: a JSON POST to any URL.
#[derive(Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST; empty: off. Treated as a secret (Discord's and Slack's carry their token):
    /// only its host is ever shown.
    pub url: String,
    pub format: WebhookFormat,
}

/// `[notify.email]`: a mail over SMTP.
#[derive(Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtps://user:pass@host` (TLS from the start, port 465),
    /// `smtp://user:pass@host:587?tls=required` (STARTTLS), `smtp://host:25` (no encryption: a
    /// relay on this machine or the LAN only); empty: off. The password is never shown.
    pub smtp_url: String,
    /// The sender, `Immich backup <backup@example.org>`.
    pub from: String,
    /// The recipients.
    pub to: Vec<String>,
}

impl NotifyConfig {
    fn validate(&self) -> Result<()> {
        let bad = |key: &str, what: String| Err(Error::Config(format!("[notify{key}] {what}")));
        if self.timeout_secs == 0 {
            return bad("", "timeout_secs must be at least 1 (default 30)".into());
        }
        let http =
            |u: &str| url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if !self.ntfy.url.is_empty() && !http(&self.ntfy.url) {
            return bad(
                ".ntfy",
                "url must be an http:// or https:// URL (the topic's, https://ntfy.sh/TOPIC)"
                    .into(),
            );
        }
        if !self.ntfy.priority.is_empty() && ntfy_priority(&self.ntfy.priority).is_none() {
            return bad(
                ".ntfy",
                format!(
                    "priority {:?}: use 1 to 5, or min, low, default, high, max",
                    self.ntfy.priority
                ),
            );
        }
        if self
            .ntfy
            .tags
            .iter()
            .any(|t| t.contains(',') || t.trim().is_empty())
        {
            return bad(
                ".ntfy",
                "tags: each tag is one non-empty word without commas".into(),
            );
        }
        if !self.webhook.url.is_empty() && !http(&self.webhook.url) {
            return bad(".webhook", "url must be an http:// or https:// URL".into());
        }
        self.email.validate()
    }

    /// Every secret of this section (tokens, the webhook URL, the SMTP password), to be scrubbed
    /// from anything shown.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = vec![self.ntfy.token.clone(), self.webhook.url.clone()];
        if let Ok(u) = url::Url::parse(&self.webhook.url) {
            out.push(u.path().to_string());
        }
        for text in [&self.email.smtp_url, &self.ntfy.url] {
            if let Some(pass) = url::Url::parse(text)
                .ok()
                .and_then(|u| u.password().map(String::from))
            {
                if let Ok(plain) = percent_encoding::percent_decode_str(&pass).decode_utf8() {
                    out.push(plain.into_owned());
                }
                out.push(pass);
            }
        }
        out.retain(|s| s.len() >= 4);
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out
    }
}

/// ntfy's priority (1–5) from `[notify.ntfy] priority`.
pub fn ntfy_priority(text: &str) -> Option<u8> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "min" => Some(1),
        "2" | "low" => Some(2),
        "3" | "default" => Some(3),
        "4" | "high" => Some(4),
        "5" | "max" | "urgent" => Some(5),
        _ => None,
    }
}

impl EmailConfig {
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("[notify.email] {what}")));
        if self.smtp_url.is_empty() {
            return Ok(());
        }
        let url = match url::Url::parse(&self.smtp_url) {
            Ok(u) => u,
            Err(e) => return bad(format!("smtp_url is not a URL ({e}): use smtps://user:pass@host or smtp://user:pass@host:587?tls=required")),
        };
        if !matches!(url.scheme(), "smtp" | "smtps") || url.host_str().is_none_or(str::is_empty) {
            return bad("smtp_url must be smtps://[user:pass@]host[:port] or smtp://[user:pass@]host[:port][?tls=required|opportunistic]".into());
        }
        for (k, v) in url.query_pairs() {
            let ok = k == "tls"
                && url.scheme() == "smtp"
                && matches!(v.as_ref(), "required" | "opportunistic");
            if !ok {
                return bad(format!("smtp_url: unknown parameter {k}={v} (only smtp://…?tls=required or ?tls=opportunistic)"));
            }
        }
        if self.from.parse::<lettre::message::Mailbox>().is_err() {
            return bad(format!("from {:?} is not a mail address (\"Immich backup <backup@example.org>\" or \"backup@example.org\")", self.from));
        }
        if self.to.is_empty() {
            return bad("to is empty: list who gets the mail (to = [\"me@example.org\"])".into());
        }
        for to in &self.to {
            if to.parse::<lettre::message::Mailbox>().is_err() {
                return bad(format!("to: {to:?} is not a mail address"));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = |u: &str| {
            url::Url::parse(u)
                .ok()
                .and_then(|u| u.host_str().map(String::from))
                .unwrap_or_default()
        };
        f.debug_struct("NotifyConfig")
            .field("on", &self.on)
            .field("timeout_secs", &self.timeout_secs)
            .field("ntfy.url (host)", &host(&self.ntfy.url))
            .field("ntfy.priority", &self.ntfy.priority)
            .field("ntfy.tags", &self.ntfy.tags)
            .field("ntfy.token", &redacted(&self.ntfy.token))
            .field("webhook.url (host)", &host(&self.webhook.url))
            .field("webhook.format", &self.webhook.format)
            .field(
                "email.smtp_url",
                &crate::redact::redact_url(&self.email.smtp_url),
            )
            .field("email.from", &self.email.from)
            .field("email.to", &self.email.to)
            .finish()
    }
}

/// `[hooks]`: commands run with `sh -c` around a backup (the CLI's and the agent's), e.g. to pause
/// Immich's jobs. They see `IMMICH_BACKUP_HOOK`, `IMMICH_BACKUP_SNAPSHOT`, `IMMICH_BACKUP_STATUS`,
/// `IMMICH_BACKUP_EXIT_CODE` and `IMMICH_BACKUP_ERROR` in their environment.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// Before anything is read or written; failing (or timing out) aborts the backup (exit 17).
    pub before_backup: String,
    /// After a backup that made a snapshot (success or partial).
    pub after_backup: String,
    /// After a backup that failed, a failed `before_backup` included.
    pub on_failure: String,
    /// A hook running longer is killed (its whole process group) and counts as failed.
    pub timeout_secs: u64,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            before_backup: String::new(),
            after_backup: String::new(),
            on_failure: String::new(),
            timeout_secs: 600,
        }
    }
}

impl HooksConfig {
    fn validate(&self) -> Result<()> {
        if self.timeout_secs == 0 {
            return Err(Error::Config(
                "[hooks] timeout_secs must be at least 1 (default 600)".into(),
            ));
        }
        Ok(())
    }
}

/// Hooks may carry secrets (an API key for curl): `Debug` shows only which are set.
impl std::fmt::Debug for HooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |c: &str| if c.is_empty() { "" } else { "<set>" };
        f.debug_struct("HooksConfig")
            .field("before_backup", &set(&self.before_backup))
            .field("after_backup", &set(&self.after_backup))
            .field("on_failure", &set(&self.on_failure))
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    /// Environment values keep their text (a secret "0123" is not the number 123) and still fill
    /// numeric, boolean and list keys. (nextest runs each test in its own process.)
    #[test]
    fn environment_overrides_keep_text_and_convert_types() {
        let vars = [
            ("IMMICH_BACKUP__DATABASE__PASSWORD", "0123"),
            ("IMMICH_BACKUP__DATABASE__PORT", "5433"),
            ("IMMICH_BACKUP__STORAGE__ALLOW_HTTP", "true"),
            ("IMMICH_BACKUP__IMMICH__FOLDERS", "library,upload"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let cfg = Config::load(None).expect("loads from the environment");
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        assert_eq!(cfg.database.password, "0123");
        assert_eq!(cfg.database.port, 5433);
        assert!(cfg.storage.allow_http);
        assert_eq!(
            cfg.immich.folders,
            vec!["library".to_string(), "upload".to_string()]
        );
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    /// Every path key given as a relative path in the file is read from the file's folder;
    /// absolute ones and empty ones stay as they are.
    #[test]
    fn relative_path_keys_are_read_from_the_config_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "[immich]\nupload_location = \"photos\"\n[database]\nbin_dir = \"pg/bin\"\n\
             [storage]\nservice_account = \"gcs.json\"\n\
             [encryption]\nrecipients_file = \"r.txt\"\nidentity_file = \"../id.txt\"\nsigning_key_file = \"/abs/s.key\"\n\
             [backup]\ncache_dir = \"cache\"\n[check]\nidentity_file = \"check-id.txt\"\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&file)).unwrap();
        let d = dir.path();
        assert_eq!(cfg.immich.upload_location, d.join("photos"));
        assert_eq!(cfg.database.bin_dir, d.join("pg/bin").display().to_string());
        assert_eq!(
            cfg.storage.service_account,
            d.join("gcs.json").display().to_string()
        );
        assert_eq!(
            cfg.encryption.recipients_file,
            d.join("r.txt").display().to_string()
        );
        assert_eq!(
            cfg.encryption.identity_file,
            d.join("../id.txt").display().to_string()
        );
        assert_eq!(cfg.encryption.signing_key_file, "/abs/s.key");
        assert_eq!(cfg.backup.cache_dir, d.join("cache").display().to_string());
        assert_eq!(
            cfg.check.identity_file,
            d.join("check-id.txt").display().to_string()
        );
        let e = cfg
            .existing_file("[check] identity_file", &cfg.check.identity_file)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[check] identity_file = \"check-id.txt\""),
            "{e}"
        );
        assert!(e.contains("no such file"), "{e}");
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_restic_bare_numbers() {
        assert_eq!(parse_rate("20MiB/s").unwrap(), Some(20 << 20));
        assert_eq!(parse_rate("500 KiB/s").unwrap(), Some(500 << 10));
        assert_eq!(parse_rate("50Mbit/s").unwrap(), Some(6_250_000));
        assert_eq!(parse_rate("2.5MB").unwrap(), Some(2_500_000));
        assert_eq!(parse_rate("1024").unwrap(), Some(1 << 20));
        assert_eq!(parse_rate("").unwrap(), None);
        assert_eq!(parse_rate("0").unwrap(), None);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs/s")
            .unwrap_err()
            .contains("unknown unit"));
    }
}

#[cfg(test)]
mod env_file_tests {
    use super::*;

    /// `[immich] env_file` (relative: from the config file's folder) fills the keys not set
    /// explicitly, in the file or the environment; Immich's `./library` is read from the `.env`'s
    /// folder; a missing file names the key. (nextest runs each test in its own process.)
    #[test]
    fn immichs_env_file_fills_what_is_not_set_explicitly() {
        let dir = tempfile::tempdir().unwrap();
        let immich = dir.path().join("immich-app");
        std::fs::create_dir_all(&immich).unwrap();
        std::fs::write(
            immich.join(".env"),
            "UPLOAD_LOCATION=./library\nDB_DATA_LOCATION=./postgres\nIMMICH_VERSION=release\n\
             DB_PASSWORD=from-env-file\nDB_USERNAME=immich_user\nDB_DATABASE_NAME=immich_db\n",
        )
        .unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "[immich]\nenv_file = \"immich-app/.env\"\n[database]\ndatabase = \"explicit\"\n",
        )
        .unwrap();
        std::env::set_var("IMMICH_BACKUP__DATABASE__USERNAME", "from-environment");
        let cfg = Config::load(Some(&file));
        std::env::remove_var("IMMICH_BACKUP__DATABASE__USERNAME");
        let cfg = cfg.unwrap();
        assert_eq!(cfg.immich.upload_location, immich.join("library"));
        assert_eq!(cfg.database.password, "from-env-file");
        assert_eq!(cfg.database.username, "from-environment");
        assert_eq!(cfg.database.database, "explicit");
        assert!(!format!("{cfg:?}").contains("from-env-file"));

        std::fs::write(
            &file,
            "[immich]\nenv_file = \"elsewhere/.env\"\nupload_location = \"/srv/photos\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(e.contains("[immich] env_file"), "{e}");
        assert!(
            e.contains("elsewhere/.env") && e.contains("no such file"),
            "{e}"
        );
    }
}
