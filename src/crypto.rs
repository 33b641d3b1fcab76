//! age encryption: recipients for backing up, identities for restoring, and the content-address key.
//!
//! Backing up needs only public recipients (`age1…` or SSH public keys), so the machine that backs up
//! cannot read old backups. Content addresses are BLAKE3 in keyed mode, with a key derived from the
//! canonical recipient set: the storage provider, who never sees the recipients, cannot test whether a
//! known photo is stored; the backup machine can compute addresses without any secret; restore reads the
//! key from the (encrypted) snapshot manifest. See docs/FORMAT.md.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use age::Identity;

use crate::error::{Error, IoContext, Result};
use crate::seal::{Sealer, Wrapper};
use crate::unseal::{self, Opened, X25519Identity};

/// Context string for deriving the content-address key (BLAKE3 `derive_key`).
pub const CONTENT_KEY_CONTEXT: &str = "immich-backup 2026-11 content address key v1";

/// Environment variable holding the passphrase of a passphrase-protected identity file.
pub const PASSPHRASE_ENV: &str = "IMMICH_BACKUP_PASSPHRASE";

/// The public half: what backup encrypts to.
pub struct Recipients {
    recipients: Vec<Wrapper>,
    canonical: Vec<String>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipients")
            .field("recipients", &self.canonical)
            .finish()
    }
}

impl Recipients {
    /// Parse recipients given inline and/or in a recipients file (one per line, `#` comments).
    pub fn load(inline: &[String], file: Option<&Path>) -> Result<Recipients> {
        let mut lines: Vec<(String, String)> = inline
            .iter()
            .map(|r| (r.clone(), "[encryption] recipients".to_string()))
            .collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).at(path)?;
            for (n, line) in text.lines().enumerate() {
                lines.push((line.to_string(), format!("{}:{}", path.display(), n + 1)));
            }
        }
        let mut out = Recipients {
            recipients: Vec::new(),
            canonical: Vec::new(),
        };
        for (line, origin) in lines {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (recipient, canonical) = parse_recipient(line).map_err(|why| {
                Error::Config(format!("{origin}: {why}; expected an age1… public key or an ssh-ed25519/ssh-rsa public key"))
            })?;
            if !out.canonical.contains(&canonical) {
                out.recipients.push(recipient);
                out.canonical.push(canonical);
            }
        }
        if out.recipients.is_empty() {
            return Err(Error::Config(
                "no recipients: set [encryption] recipients or recipients_file (run `immich-backup keygen` to make a key)".into(),
            ));
        }
        out.canonical.sort();
        Ok(out)
    }

    /// The key of the keyed hash that names file contents in the store.
    pub fn content_key(&self) -> [u8; 32] {
        blake3::derive_key(CONTENT_KEY_CONTEXT, self.canonical.join("\n").as_bytes())
    }

    /// The recipients as `age` prints them, sorted.
    pub fn canonical(&self) -> &[String] {
        &self.canonical
    }

    /// Wrap `out` so that what is written to it is encrypted to every recipient (an age file).
    pub fn encrypt<W: Write>(&self, out: W) -> io::Result<Sealer<W>> {
        Sealer::new(out, &self.recipients)
    }
}

fn parse_recipient(line: &str) -> std::result::Result<(Wrapper, String), String> {
    if line.starts_with("age1") {
        let r = age::x25519::Recipient::from_str(line)
            .map_err(|e| format!("invalid age recipient: {e}"))?;
        let canonical = r.to_string();
        return Ok((Wrapper::x25519(&canonical)?, canonical));
    }
    if line.starts_with("ssh-") {
        let r = age::ssh::Recipient::from_str(line)
            .map_err(|e| format!("invalid SSH recipient: {e:?}"))?;
        let canonical = r.to_string();
        return Ok((Wrapper::Age(Box::new(r)), canonical));
    }
    if line.starts_with("AGE-SECRET-KEY-") {
        return Err(
            "this is a secret identity, not a public recipient; never give it to backup".into(),
        );
    }
    Err("unrecognised recipient".into())
}

/// The secret half: what restore decrypts with.
pub struct Identities {
    identities: Vec<Box<dyn Identity + Send + Sync>>,
    origin: String,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities(from {})", self.origin)
    }
}

impl Identities {
    /// Load an identity file: `age-keygen` output, an `age -p` passphrase-protected identity file
    /// (the passphrase comes from `IMMICH_BACKUP_PASSPHRASE` or a terminal prompt), or an SSH private key.
    pub fn load(path: &Path) -> Result<Identities> {
        let origin = path.display().to_string();
        let mut data = Vec::new();
        File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|e| {
            Error::Config(format!("identity file {origin}: {e}; pass --identity FILE or set [encryption] identity_file"))
        })?;
        let bad = |e: &dyn std::fmt::Display| Error::Config(format!("identity file {origin}: {e}"));
        let identities: Vec<Box<dyn Identity + Send + Sync>> = if is_age_file(&data) {
            let id = age::encrypted::Identity::from_buffer(
                BufReader::new(io::Cursor::new(data)),
                Some(origin.clone()),
                PassphrasePrompt,
                None,
            )
            .map_err(|e| bad(&e))?
            .ok_or_else(|| bad(&"an age file, but not a passphrase-protected identity"))?;
            vec![Box::new(SyncIdentity(std::sync::Mutex::new(Box::new(id))))]
        } else if data.starts_with(b"-----BEGIN OPENSSH PRIVATE KEY-----")
            || data.starts_with(b"-----BEGIN RSA PRIVATE KEY-----")
        {
            let id = age::ssh::Identity::from_buffer(
                BufReader::new(io::Cursor::new(data)),
                Some(origin.clone()),
            )
            .map_err(|e| bad(&e))?;
            if let age::ssh::Identity::Unsupported(k) = &id {
                return Err(bad(&format!("unsupported SSH key type {k:?}")));
            }
            vec![Box::new(SyncIdentity(std::sync::Mutex::new(Box::new(
                id.with_callbacks(PassphrasePrompt),
            ))))]
        } else {
            // X25519 keys are unwrapped with AWS-LC first (unseal.rs); the age crate's identities
            // (which also check the whole file) come after.
            let fast = std::str::from_utf8(&data)
                .unwrap_or_default()
                .lines()
                .filter_map(X25519Identity::parse)
                .map(|i| Box::new(i) as Box<dyn Identity + Send + Sync>)
                .collect::<Vec<_>>();
            let parsed = age::IdentityFile::from_buffer(BufReader::new(io::Cursor::new(data)))
                .map_err(|e| bad(&e))?
                .into_identities()
                .map_err(|e| bad(&e))?
                .into_iter()
                .map(|i| {
                    Box::new(SyncIdentity(std::sync::Mutex::new(i)))
                        as Box<dyn Identity + Send + Sync>
                });
            fast.into_iter().chain(parsed).collect()
        };
        if identities.is_empty() {
            return Err(bad(&"no identity found in the file"));
        }
        Ok(Identities { identities, origin })
    }

    /// Decrypt the age file `input` (unseal.rs); `object` names it in errors.
    pub fn decrypt<R: Read>(&self, input: R, object: &str) -> Result<Opened<BufReader<R>>> {
        unseal::open(
            input,
            self.identities.iter().map(|i| i.as_ref() as &dyn Identity),
        )
        .map_err(|e| decrypt_error(object, e))
    }
}

/// Map an age header error to the right kind: wrong key, or a damaged object.
pub fn decrypt_error(object: &str, e: age::DecryptError) -> Error {
    match e {
        age::DecryptError::NoMatchingKeys | age::DecryptError::KeyDecryptionFailed => {
            Error::WrongKey {
                object: object.to_string(),
                message: e.to_string(),
            }
        }
        age::DecryptError::Io(io) => read_error(object, io),
        other => Error::Corrupt {
            object: object.to_string(),
            message: other.to_string(),
        },
    }
}

/// Map an error while reading a decrypted stream: age reports a bad chunk or truncation as
/// `InvalidData`/`UnexpectedEof`, which means the object is damaged.
pub fn read_error(object: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => Error::Corrupt {
            object: object.to_string(),
            message: format!("{e} (failed authentication or truncated)"),
        },
        _ => Error::StorageObject {
            object: object.to_string(),
            message: e.to_string(),
        },
    }
}

fn is_age_file(data: &[u8]) -> bool {
    data.starts_with(b"age-encryption.org/v1")
        || data.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----")
}

/// age's `Identity` is not `Sync`; the encrypted identities cache their unlocked key in a `Cell`.
/// A mutex makes them shareable between restore's worker threads.
struct SyncIdentity(std::sync::Mutex<Box<dyn Identity>>);

// SAFETY: every access to the inner identity goes through the mutex.
unsafe impl Send for SyncIdentity {}
unsafe impl Sync for SyncIdentity {}

impl Identity for SyncIdentity {
    fn unwrap_stanza(
        &self,
        stanza: &age_core::format::Stanza,
    ) -> Option<std::result::Result<age_core::format::FileKey, age::DecryptError>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_stanza(stanza)
    }
    fn unwrap_stanzas(
        &self,
        stanzas: &[age_core::format::Stanza],
    ) -> Option<std::result::Result<age_core::format::FileKey, age::DecryptError>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_stanzas(stanzas)
    }
}

/// Asks for the passphrase of a protected identity: from the environment, else on the terminal.
#[derive(Clone, Copy)]
struct PassphrasePrompt;

impl age::Callbacks for PassphrasePrompt {
    fn display_message(&self, message: &str) {
        eprintln!("{message}");
    }
    fn confirm(&self, _: &str, _: &str, _: Option<&str>) -> Option<bool> {
        None
    }
    fn request_public_string(&self, _: &str) -> Option<String> {
        None
    }
    fn request_passphrase(&self, description: &str) -> Option<SecretString> {
        if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
            return Some(SecretString::from(p));
        }
        rpassword::prompt_password(format!("{description}: "))
            .ok()
            .map(SecretString::from)
    }
}

/// A new identity as `age-keygen` writes it, and its recipient.
pub struct NewKey {
    pub file_text: SecretString,
    pub recipient: String,
}

/// Generate an X25519 identity in age-keygen's file format.
pub fn generate_key() -> NewKey {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let text = format!(
        "# created: {created}\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    NewKey {
        file_text: SecretString::from(text),
        recipient,
    }
}

/// Write a new identity file with mode 0600; never overwrites.
pub fn write_identity_file(path: &Path, key: &NewKey) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::Usage(format!(
                    "{} already exists; refusing to overwrite an identity (choose another path)",
                    path.display()
                ))
            } else {
                Error::io(path, e)
            }
        })?;
    f.write_all(key.file_text.expose_secret().as_bytes())
        .at(path)?;
    f.sync_all().at(path)
}

/// Read an identity file's public key line (for `keygen -y`-like uses and tests).
pub fn recipient_of_identity_file(path: &Path) -> Result<Option<String>> {
    let f = File::open(path).at(path)?;
    for line in BufReader::new(f).lines() {
        let line = line.at(path)?;
        if let Some(k) = line.trim().strip_prefix("AGE-SECRET-KEY-") {
            let id = age::x25519::Identity::from_str(&format!("AGE-SECRET-KEY-{k}"))
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            return Ok(Some(id.to_public().to_string()));
        }
    }
    Ok(None)
}
