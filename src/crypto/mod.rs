//! age encryption: recipients for backing up, identities for restoring, and the content-address key.
//!
//! Backing up needs only public recipients (`age1…` or SSH public keys), so the machine that backs up
//! cannot read old backups. Content addresses are BLAKE3 in keyed mode, with a key derived from the
//! canonical recipient set: the storage provider, who never sees the recipients, cannot test whether a
//! known photo is stored; the backup machine can compute addresses without any secret; restore reads the
//! key from the (encrypted) snapshot manifest. See docs/FORMAT.md.

pub mod repokey;
pub mod seal;
pub mod sign;
pub mod unseal;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use age::secrecy::{ExposeSecret, SecretBox, SecretString};
use age::Identity;

use crate::crypto::seal::{Sealer, Wrapper};
use crate::crypto::sign::{SigningKey, VerifyKey};
use crate::error::{Error, IoContext, Result};
use unseal::{Opened, X25519Identity};

/// Context string for deriving the content-address key (BLAKE3 `derive_key`).
pub(crate) const CONTENT_KEY_CONTEXT: &str = "immich-backup 2026-11 content address key v1";

/// Environment variable holding the passphrase of a passphrase-protected identity file.
pub(crate) const PASSPHRASE_ENV: &str = "IMMICH_BACKUP_PASSPHRASE";

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

/// The secret half: what restore decrypts with, and the verification keys it derives
/// ([`crate::crypto::sign`]): a snapshot counts only if one of them signed it.
///
/// A format-2 store adds the repository keys its key files hold ([`Identities::with_repository_keys`]):
/// they open the snapshots, and are tried first.
#[derive(Clone)]
pub struct Identities {
    identities: Arc<Vec<Box<dyn Identity + Send + Sync>>>,
    repository: Arc<Vec<X25519Identity>>,
    recipients: Vec<String>,
    verify_keys: Vec<VerifyKey>,
    origin: String,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities(from {})", self.origin)
    }
}

/// An identity's secret, from which its signing key is derived ([`SigningKey::derive`]).
/// (Only age X25519 identities: the age crate does not give SSH keys' secrets away.)
struct Secret {
    kind: &'static str,
    material: SecretBox<Vec<u8>>,
    recipient: String,
}

impl Secret {
    fn signing_key(&self) -> SigningKey {
        SigningKey::derive(self.kind, self.material.expose_secret())
    }
}

impl Identities {
    /// Load an identity file: `age-keygen` output, an `age -p` passphrase-protected identity file,
    /// or an SSH private key (passphrase-protected or not). A passphrase comes from
    /// `IMMICH_BACKUP_PASSPHRASE` or a terminal prompt, asked once, here.
    pub fn load(path: &Path) -> Result<Identities> {
        let origin = path.display().to_string();
        let mut data = Vec::new();
        File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|e| {
            Error::Config(format!("identity file {origin}: {e}; pass --identity FILE or set [encryption] identity_file"))
        })?;
        crate::crypto::sign::warn_if_readable_by_others(path, "identity");
        let (identities, secrets) = parse_identities(data, &origin)?;
        if identities.is_empty() {
            return Err(Error::Config(format!(
                "identity file {origin}: no identity found in the file"
            )));
        }
        let verify_keys = secrets
            .iter()
            .map(|s| s.signing_key().verify_key())
            .collect();
        Ok(Identities {
            identities: Arc::new(identities),
            repository: Arc::new(Vec::new()),
            recipients: secrets.iter().map(|s| s.recipient.clone()).collect(),
            verify_keys,
            origin,
        })
    }

    /// These identities and the repository keys `keys` (read from the store's key files). The
    /// verification keys stay those of the identities alone: a key file, which anyone who knows a
    /// recipient can write, never makes a snapshot trusted.
    pub fn with_repository_keys(&self, keys: &[repokey::RepositoryKey]) -> Identities {
        let repository = keys
            .iter()
            .filter_map(|k| X25519Identity::parse(k.secret().expose_secret()))
            .collect();
        Identities {
            repository: Arc::new(repository),
            ..self.clone()
        }
    }

    /// Identities that are `keys` alone (a backup machine's key, to open its machine files).
    pub fn of_keys(keys: &[repokey::RepositoryKey]) -> Identities {
        Identities {
            identities: Arc::new(Vec::new()),
            repository: Arc::new(Vec::new()),
            recipients: Vec::new(),
            verify_keys: Vec::new(),
            origin: "repository keys".into(),
        }
        .with_repository_keys(keys)
    }

    /// The repository keys added by [`Identities::with_repository_keys`].
    pub fn repository_keys(&self) -> usize {
        self.repository.len()
    }

    /// The recipients of these identities that are known (age X25519 identities'), canonical.
    pub fn recipients(&self) -> &[String] {
        &self.recipients
    }

    /// The verification keys of the signing keys derived from these identities.
    pub fn verify_keys(&self) -> &[VerifyKey] {
        &self.verify_keys
    }

    /// The signing keys derived from these identities (for `keygen` and `signing-key`).
    pub fn signing_keys_of(path: &Path) -> Result<Vec<SigningKey>> {
        let origin = path.display().to_string();
        let data = std::fs::read(path)
            .map_err(|e| Error::Config(format!("identity file {origin}: {e}")))?;
        let (_, secrets) = parse_identities(data, &origin)?;
        if secrets.is_empty() {
            return Err(Error::Config(format!(
                "identity file {origin}: no age X25519 identity to make a signing key from (for an SSH key, make a new signing key with `immich-backup signing-key --new` and trust its verify key in [encryption] verify_keys)"
            )));
        }
        Ok(secrets.iter().map(Secret::signing_key).collect())
    }

    /// Decrypt the age file `input` (unseal.rs); `object` names it in errors.
    pub fn decrypt<R: Read>(&self, input: R, object: &str) -> Result<Opened<BufReader<R>>> {
        unseal::open(
            input,
            self.repository
                .iter()
                .map(|i| i as &dyn Identity)
                .chain(self.identities.iter().map(|i| i.as_ref() as &dyn Identity)),
        )
        .map_err(|e| decrypt_error(object, e))
    }

    /// Decrypt `input` and, when `header_mac` is given (the manifest pins it), check that the
    /// object is the very one the backup wrote: its age header, and so its file key, are the same.
    pub(crate) fn decrypt_pinned<R: Read>(
        &self,
        input: R,
        object: &str,
        header_mac: Option<&str>,
    ) -> Result<Opened<BufReader<R>>> {
        let opened = self.decrypt(input, object)?;
        if let Some(want) = header_mac {
            if hex::encode(opened.header_mac()) != want {
                return Err(Error::Corrupt {
                    object: object.to_string(),
                    message:
                        "it was replaced: its age header is not the one the signed manifest names"
                            .into(),
                });
            }
        }
        Ok(opened)
    }
}

type Parsed = (Vec<Box<dyn Identity + Send + Sync>>, Vec<Secret>);

/// The identities in an identity file's bytes, and the secrets their signing keys come from.
fn parse_identities(data: Vec<u8>, origin: &str) -> Result<Parsed> {
    let bad = |e: &dyn std::fmt::Display| Error::Config(format!("identity file {origin}: {e}"));
    if is_age_file(&data) {
        let plain = decrypt_passphrase_file(data, origin)?;
        return parse_identities(plain, origin);
    }
    if data.starts_with(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        || data.starts_with(b"-----BEGIN RSA PRIVATE KEY-----")
    {
        let id = age::ssh::Identity::from_buffer(
            BufReader::new(io::Cursor::new(data)),
            Some(origin.to_string()),
        )
        .map_err(|e| bad(&e))?;
        let key = match id {
            age::ssh::Identity::Unencrypted(k) => k,
            age::ssh::Identity::Encrypted(k) => {
                let passphrase =
                    passphrase(&format!("Passphrase of the SSH key {origin}"), origin)?;
                k.decrypt(passphrase).map_err(|_| {
                    Error::Config(format!(
                        "identity file {origin}: wrong passphrase for the SSH key (check {PASSPHRASE_ENV})"
                    ))
                })?
            }
            age::ssh::Identity::Unsupported(k) => {
                return Err(bad(&format!("unsupported SSH key type {k:?}")))
            }
        };
        // SSH keys give no signing key of their own (the age crate keeps their secret to
        // itself): trust a signing key made with `signing-key --new` through
        // [encryption] verify_keys instead.
        let id: Box<dyn Identity + Send + Sync> = Box::new(SyncIdentity(std::sync::Mutex::new(
            Box::new(age::ssh::Identity::Unencrypted(key)),
        )));
        return Ok((vec![id], Vec::new()));
    }
    // X25519 keys are unwrapped with AWS-LC first (unseal.rs); the age crate's identities
    // (which also check the whole file) come after.
    let text = std::str::from_utf8(&data).unwrap_or_default();
    let mut secrets = Vec::new();
    let mut fast: Vec<Box<dyn Identity + Send + Sync>> = Vec::new();
    for line in text.lines() {
        if let Some(i) = X25519Identity::parse(line) {
            fast.push(Box::new(i));
        }
        if let Some(bytes) = crate::crypto::seal::decode_bech32(line.trim(), "age-secret-key-") {
            let recipient = age::x25519::Identity::from_str(line.trim())
                .map(|i| i.to_public().to_string())
                .unwrap_or_default();
            secrets.push(Secret {
                kind: "age-x25519",
                material: SecretBox::new(Box::new(bytes)),
                recipient,
            });
        }
    }
    let parsed = age::IdentityFile::from_buffer(BufReader::new(io::Cursor::new(data)))
        .map_err(|e| bad(&e))?
        .into_identities()
        .map_err(|e| bad(&e))?
        .into_iter()
        .map(|i| {
            Box::new(SyncIdentity(std::sync::Mutex::new(i))) as Box<dyn Identity + Send + Sync>
        });
    Ok((fast.into_iter().chain(parsed).collect(), secrets))
}

/// The plaintext of an `age -p` (scrypt) identity file, armored or not.
fn decrypt_passphrase_file(data: Vec<u8>, origin: &str) -> Result<Vec<u8>> {
    let bad = |e: &dyn std::fmt::Display| Error::Config(format!("identity file {origin}: {e}"));
    let reader = age::armor::ArmoredReader::new(io::Cursor::new(data));
    let decryptor = age::Decryptor::new(reader).map_err(|e| bad(&e))?;
    if !decryptor.is_scrypt() {
        return Err(bad(&"an age file, but not a passphrase-protected identity"));
    }
    let passphrase = passphrase(&format!("Passphrase of the identity file {origin}"), origin)?;
    let identity = age::scrypt::Identity::new(passphrase);
    let mut plain = Vec::new();
    decryptor
        .decrypt(std::iter::once(&identity as &dyn Identity))
        .map_err(|e| match e {
            age::DecryptError::DecryptionFailed
            | age::DecryptError::KeyDecryptionFailed
            | age::DecryptError::NoMatchingKeys => Error::WrongKey {
                object: origin.to_string(),
                message: format!("wrong passphrase (check {PASSPHRASE_ENV})"),
            },
            other => bad(&other),
        })?
        .read_to_end(&mut plain)
        .map_err(|e| bad(&e))?;
    Ok(plain)
}

/// A passphrase: from `IMMICH_BACKUP_PASSPHRASE`, else asked on the terminal.
fn passphrase(prompt: &str, origin: &str) -> Result<SecretString> {
    // An empty variable is an unset one: no age passphrase is empty.
    if let Some(p) = std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty()) {
        return Ok(SecretString::from(p));
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(Error::Config(format!(
            "identity file {origin}: this identity needs a passphrase: set {PASSPHRASE_ENV} or run on a terminal"
        )));
    }
    rpassword::prompt_password(format!("{prompt}: "))
        .map(SecretString::from)
        .map_err(|e| {
            Error::Config(format!(
                "identity file {origin}: cannot read the passphrase: {e}"
            ))
        })
}

/// Map an age header error to the right kind: wrong key, or a damaged object.
pub(crate) fn decrypt_error(object: &str, e: age::DecryptError) -> Error {
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
pub(crate) fn read_error(object: &str, e: io::Error) -> Error {
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

/// A new identity as `age-keygen` writes it, its recipient, and the signing key derived from it.
pub struct NewKey {
    pub file_text: SecretString,
    pub recipient: String,
    pub signing: SigningKey,
}

/// Generate an X25519 identity in age-keygen's file format.
pub fn generate_key() -> NewKey {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let secret = identity.to_string();
    let material = crate::crypto::seal::decode_bech32(
        &secret.expose_secret().to_lowercase(),
        "age-secret-key-",
    )
    .expect("a fresh identity decodes");
    let signing = SigningKey::derive("age-x25519", &material);
    let text = format!(
        "# created: {created}\n# public key: {recipient}\n{}\n",
        secret.expose_secret()
    );
    NewKey {
        file_text: SecretString::from(text),
        recipient,
        signing,
    }
}

/// Write a new identity file with mode 0600; never overwrites.
pub fn write_identity_file(path: &Path, key: &NewKey) -> Result<()> {
    crate::crypto::sign::write_secret_file(path, &key.file_text, "identity")
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
