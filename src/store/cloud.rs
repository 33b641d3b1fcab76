//! Cloud backends: build object_store's S3, GCS and Azure clients from `[storage]`.
//!
//! Every builder starts from its `from_env()` (the standard `AWS_*`, `GOOGLE_*`, `AZURE_*` variables),
//! then the URL, then what `[storage]` sets explicitly, which wins. For S3 without any keys in the
//! config or the environment, the shared credentials file (`~/.aws/credentials`, profile `AWS_PROFILE`
//! or `default`) is read too, since object_store itself does not read profiles; without any of
//! these, object_store falls back to web identity, ECS and EC2 instance credentials.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use crate::config::StorageConfig;
use crate::error::{Error, Result};

/// Which service a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    S3,
    Gcs,
    Azure,
    /// A WebDAV folder ([`crate::store::webdav`]).
    WebDav,
    /// A folder on an SFTP server ([`crate::store::sftp`]).
    Sftp,
}

impl Backend {
    /// What the service calls a bucket.
    pub(crate) fn bucket_word(self) -> &'static str {
        match self {
            Backend::Azure => "container",
            Backend::Local | Backend::WebDav | Backend::Sftp => "folder",
            Backend::S3 | Backend::Gcs => "bucket",
        }
    }

    /// Where this backend's credentials come from, for remedies.
    pub(crate) fn credentials_hint(self) -> &'static str {
        match self {
            Backend::S3 => "check [storage] access_key_id and secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE), that the key may read and write the bucket, and [storage] region",
            Backend::Gcs => "check [storage] service_account (or GOOGLE_APPLICATION_CREDENTIALS) and that the account has Storage Object Admin on the bucket",
            Backend::Azure => "check [storage] account_name and account_key (or AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY, or options.sas_token) and the key's permissions on the container",
            Backend::WebDav => "check the user name in [storage] url (or [storage] username) and [storage] password (or IMMICH_BACKUP__STORAGE__PASSWORD), and that the user may write the folder",
            Backend::Sftp => "check the user in [storage] url, and [storage] ssh_key_file (its public key must be in the server's authorized_keys; a protected key needs ssh_key_passphrase) or the ssh-agent's keys (SSH_AUTH_SOCK), or [storage] password (or IMMICH_BACKUP__STORAGE__PASSWORD), and that the user may write the folder",
            Backend::Local => "run as a user that may read and write the folder",
        }
    }
}

/// The retry policy: exponential backoff from 1 s to 15 s, up to `max_retries` retries and
/// `retry_timeout_secs` seconds from the first attempt. object_store retries 5xx answers, connection
/// errors and (for idempotent requests) timeouts.
pub(crate) fn retry_config(cfg: &StorageConfig) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            // object_store draws each wait at random between this and twice the last one: from
            // 100 ms, ten retries were over in 2-3 s, and a link that dropped for 10 s failed the
            // backup. From 1 s they take half a minute (at least 14 s in 99 runs of 100).
            init_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(15)
                .min(Duration::from_secs(cfg.retry_timeout_secs.max(1))),
            base: 2.0,
        },
        max_retries: cfg.max_retries,
        retry_timeout: Duration::from_secs(cfg.retry_timeout_secs),
    }
}

fn set(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

fn bad_option(key: &str, backend: &str) -> Error {
    Error::Config(format!(
        "[storage] options: {key:?} is not an {backend} option of object_store; see the README's cloud section"
    ))
}

fn build_error(shown: &str, e: object_store::Error, scrub: &crate::redact::Redactor) -> Error {
    Error::Config(format!(
        "[storage] url {shown}: {}",
        scrub.clean(&crate::redact::error_chain(&e))
    ))
}

/// Build the object store for a cloud URL.
pub fn build(
    cfg: &StorageConfig,
    url: &url::Url,
    backend: Backend,
    shown: &str,
    scrub: &crate::redact::Redactor,
) -> Result<Arc<dyn ObjectStore>> {
    let timeout = format!("{}s", cfg.request_timeout_secs);
    let store: Arc<dyn ObjectStore> = match backend {
        Backend::S3 => {
            let mut b = AmazonS3Builder::from_env().with_url(url.as_str());
            if let Some(v) = set(&cfg.endpoint) {
                b = b.with_endpoint(v);
            }
            if cfg.allow_http {
                b = b.with_allow_http(true);
            }
            let env_keys = std::env::var("AWS_ACCESS_KEY_ID").is_ok_and(|v| !v.is_empty());
            match (set(&cfg.access_key_id), set(&cfg.secret_access_key)) {
                (Some(id), Some(secret)) => {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(t) = set(&cfg.session_token) {
                        b = b.with_token(t);
                    }
                }
                (None, None) if !env_keys => {
                    if let Some(p) = aws_profile()? {
                        b = b
                            .with_access_key_id(p.access_key_id)
                            .with_secret_access_key(p.secret_access_key);
                        if let Some(t) = p.session_token {
                            b = b.with_token(t);
                        }
                        if let (Some(r), None) = (p.region, set(&cfg.region)) {
                            if std::env::var("AWS_REGION").is_err()
                                && std::env::var("AWS_DEFAULT_REGION").is_err()
                            {
                                b = b.with_region(r);
                            }
                        }
                    }
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Config(
                        "[storage] access_key_id and secret_access_key go together: set both or neither".into(),
                    ))
                }
            }
            if let Some(v) = set(&cfg.region) {
                b = b.with_region(v);
            }
            for (k, v) in &cfg.options {
                let key: AmazonS3ConfigKey = k.parse().map_err(|_| bad_option(k, "S3"))?;
                b = b.with_config(key, v);
            }
            b = b.with_retry(retry_config(cfg)).with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                &timeout,
            );
            Arc::new(b.build().map_err(|e| build_error(shown, e, scrub))?)
        }
        Backend::Gcs => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(url.as_str());
            if let Some(v) = set(&cfg.endpoint) {
                b = b.with_base_url(v);
            }
            if cfg.allow_http {
                b = b.with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), "true");
            }
            if let Some(v) = set(&cfg.service_account) {
                b = b.with_service_account_path(v);
            }
            for (k, v) in &cfg.options {
                let key: GoogleConfigKey = k.parse().map_err(|_| bad_option(k, "GCS"))?;
                b = b.with_config(key, v);
            }
            b = b
                .with_retry(retry_config(cfg))
                .with_config(GoogleConfigKey::Client(ClientConfigKey::Timeout), &timeout);
            Arc::new(b.build().map_err(|e| build_error(shown, e, scrub))?)
        }
        Backend::Azure => {
            let mut b = MicrosoftAzureBuilder::from_env();
            // The Azure CLI's names, when object_store's own are not set.
            for (cli, key) in [
                ("AZURE_STORAGE_ACCOUNT", AzureConfigKey::AccountName),
                ("AZURE_STORAGE_KEY", AzureConfigKey::AccessKey),
            ] {
                if b.get_config_value(&key).is_none() {
                    if let Ok(v) = std::env::var(cli) {
                        b = b.with_config(key, v);
                    }
                }
            }
            b = b.with_url(url.as_str());
            if let Some(v) = set(&cfg.endpoint) {
                b = b.with_endpoint(v.to_string());
            }
            if cfg.allow_http {
                b = b.with_allow_http(true);
            }
            if let Some(v) = set(&cfg.account_name) {
                b = b.with_account(v);
            }
            if let Some(v) = set(&cfg.account_key) {
                b = b.with_access_key(v);
            }
            for (k, v) in &cfg.options {
                let key: AzureConfigKey = k.parse().map_err(|_| bad_option(k, "Azure"))?;
                b = b.with_config(key, v);
            }
            b = b
                .with_retry(retry_config(cfg))
                .with_config(AzureConfigKey::Client(ClientConfigKey::Timeout), &timeout);
            Arc::new(b.build().map_err(|e| build_error(shown, e, scrub))?)
        }
        Backend::Local | Backend::WebDav | Backend::Sftp => {
            unreachable!("folder, WebDAV and SFTP stores are opened by store/mod.rs")
        }
    };
    Ok(store)
}

/// Credentials from the AWS shared credentials file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AwsProfile {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub region: Option<String>,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// The profile `AWS_PROFILE` (or `default`) from `AWS_SHARED_CREDENTIALS_FILE` (or
/// `~/.aws/credentials`), with its region from `AWS_CONFIG_FILE` (or `~/.aws/config`).
fn aws_profile() -> Result<Option<AwsProfile>> {
    let profile = std::env::var("AWS_PROFILE")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "default".into());
    let creds = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".aws/credentials")));
    let config = std::env::var_os("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".aws/config")));
    let read = |p: &Option<PathBuf>| -> Result<Option<String>> {
        match p {
            Some(p) if p.is_file() => std::fs::read_to_string(p)
                .map(Some)
                .map_err(|e| Error::io(p, e)),
            _ => Ok(None),
        }
    };
    let (Some(creds_text), config_text) = (read(&creds)?, read(&config)?) else {
        return Ok(None);
    };
    Ok(parse_aws_profile(
        &creds_text,
        config_text.as_deref(),
        &profile,
    ))
}

/// Parse an INI-style section `[name]` of an AWS file into key → value.
fn ini_section(text: &str, wanted: &[String]) -> Option<BTreeMap<String, String>> {
    let mut current: Option<String> = None;
    let mut out: Option<BTreeMap<String, String>> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim().to_string());
            continue;
        }
        if current.as_ref().is_some_and(|c| wanted.contains(c)) {
            if let Some((k, v)) = line.split_once('=') {
                out.get_or_insert_with(BTreeMap::new)
                    .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

/// The credentials and region of `profile` in the given file contents.
pub(crate) fn parse_aws_profile(
    credentials: &str,
    config: Option<&str>,
    profile: &str,
) -> Option<AwsProfile> {
    let section = ini_section(credentials, &[profile.to_string()])?;
    let access_key_id = section.get("aws_access_key_id")?.clone();
    let secret_access_key = section.get("aws_secret_access_key")?.clone();
    let config_names = if profile == "default" {
        vec!["default".to_string(), "profile default".to_string()]
    } else {
        vec![format!("profile {profile}")]
    };
    let region = section.get("region").cloned().or_else(|| {
        config
            .and_then(|c| ini_section(c, &config_names))
            .and_then(|s| s.get("region").cloned())
    });
    Some(AwsProfile {
        access_key_id,
        secret_access_key,
        session_token: section.get("aws_session_token").cloned(),
        region,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_named_profile_and_its_region() {
        let creds = "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s1\n\n[backup]\naws_access_key_id=AKIABACKUP\naws_secret_access_key=s2\naws_session_token = tok\n";
        let config = "[default]\nregion = us-east-2\n[profile backup]\nregion = eu-central-1\n";
        let p = parse_aws_profile(creds, Some(config), "backup").unwrap();
        assert_eq!(
            p,
            AwsProfile {
                access_key_id: "AKIABACKUP".into(),
                secret_access_key: "s2".into(),
                session_token: Some("tok".into()),
                region: Some("eu-central-1".into()),
            }
        );
        let d = parse_aws_profile(creds, Some(config), "default").unwrap();
        assert_eq!(d.access_key_id, "AKIADEFAULT");
        assert_eq!(d.region.as_deref(), Some("us-east-2"));
        assert!(parse_aws_profile(creds, None, "missing").is_none());
    }
}
