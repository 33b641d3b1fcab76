//! Snapshot signatures: a restore replays only what this repository's own backup machine wrote.
//!
//! Encryption alone does not authenticate: the recipients are public (they are in the config), so
//! anyone who can write to the bucket can write a complete snapshot that decrypts. So the backup
//! machine also holds a **signing key** (Ed25519) and signs each snapshot's statement
//! (`snapshots/<id>/signature.json`: the snapshot's id and time and the SHA-256 of its manifest,
//! summary and refs objects; the manifest in turn binds the dump and the file list, down to their age
//! headers). The signing key is *derived from the identity* (HKDF-SHA256 of its secret), so the
//! restorer, who holds only the identity, derives the same verification key and needs nothing else;
//! the backup machine holds only the derived key, which cannot decrypt anything and from which the
//! identity cannot be recovered. `keygen` writes both files; `signing-key` derives the key of an
//! existing identity (age-keygen, `age -p`, SSH). Extra verification keys (another family member's
//! identity, a check run without any identity) can be trusted explicitly (`[encryption] verify_keys`).
//!
//! Formats (docs/FORMAT.md): a signing key is `IMMICH-BACKUP-SIGNING-KEY-1…` (Bech32 of the 32-byte
//! Ed25519 seed, like age's identities), a verification key `immich-verify1…` (Bech32 of the 32-byte
//! Ed25519 public key); the statement is plain text, so it can be checked by hand with any Ed25519
//! tool.

use std::fmt;
use std::io::Write;
use std::path::Path;

use age::secrecy::{ExposeSecret, SecretBox, SecretString};
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::prelude::{Engine, BASE64_STANDARD};
use bech32::ToBase32;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::seal::{decode_bech32, hkdf_sha256};
use crate::error::{Error, IoContext, Result};

/// Bech32 human-readable part of signing keys (written upper-case, like age's identities).
pub(crate) const SIGNING_KEY_HRP: &str = "immich-backup-signing-key-";
/// Bech32 human-readable part of verification keys.
pub(crate) const VERIFY_KEY_HRP: &str = "immich-verify";
/// HKDF salt of the derivation of a signing key from an identity's secret.
const DERIVE_SALT: &[u8] = b"immich-backup signing key v1";
/// First line of every signed statement.
pub(crate) const STATEMENT_HEADER: &str = "immich-backup snapshot signature v1";
/// Format of `signature.json`.
pub(crate) const SIGNATURE_FORMAT: u32 = 1;

/// The public half: checks signatures.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyKey(pub [u8; 32]);

impl fmt::Display for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = bech32::encode(VERIFY_KEY_HRP, self.0.to_base32(), bech32::Variant::Bech32)
            .map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyKey({self})")
    }
}

impl std::str::FromStr for VerifyKey {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        decode_bech32(s.trim(), VERIFY_KEY_HRP)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(VerifyKey)
            .ok_or_else(|| format!("{s:?} is not an immich-verify1… verification key"))
    }
}

impl VerifyKey {
    /// Whether `sig` is this key's signature of `message`.
    pub(crate) fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(message, sig)
            .is_ok()
    }
}

/// The secret half, held by the backup machine beside its config.
pub struct SigningKey {
    seed: SecretBox<[u8; 32]>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(verify key {})", self.verify_key())
    }
}

impl SigningKey {
    /// The key with Ed25519 seed `seed`.
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .expect("every 32-byte string is an Ed25519 seed");
        SigningKey {
            seed: SecretBox::new(Box::new(seed)),
            pair,
        }
    }

    /// The signing key of an identity whose secret is `material`, of kind `kind` (`age-x25519`,
    /// `ssh-ed25519`, `ssh-rsa`): HKDF-SHA256 with a fixed salt, so the restorer derives it again.
    pub fn derive(kind: &str, material: &[u8]) -> SigningKey {
        SigningKey::from_seed(hkdf_sha256(DERIVE_SALT, kind.as_bytes(), material))
    }

    /// A 32-byte secret derived from the seed for `context` (BLAKE3 `derive_key`): the backup
    /// machine's other keys ([`crate::crypto::repokey::Machine`]), independent of the signatures.
    pub fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.seed.expose_secret())
    }

    /// Its verification key.
    pub fn verify_key(&self) -> VerifyKey {
        let public: [u8; 32] = self
            .pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes");
        VerifyKey(public)
    }

    /// Sign `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// `IMMICH-BACKUP-SIGNING-KEY-1…`.
    pub fn to_text(&self) -> SecretString {
        let text = bech32::encode(
            SIGNING_KEY_HRP,
            self.seed.expose_secret().to_base32(),
            bech32::Variant::Bech32,
        )
        .expect("valid Bech32 parts");
        SecretString::from(text.to_uppercase())
    }

    /// Parse one `IMMICH-BACKUP-SIGNING-KEY-1…` line.
    pub fn parse(line: &str) -> Option<SigningKey> {
        let bytes = SecretBox::new(Box::new(decode_bech32(
            &line.trim().to_lowercase(),
            SIGNING_KEY_HRP,
        )?));
        let seed: [u8; 32] = bytes.expose_secret().as_slice().try_into().ok()?;
        Some(SigningKey::from_seed(seed))
    }

    /// The text of a signing key file: comments saying what it is, then the key.
    pub fn file_text(&self, recipient: Option<&str>) -> SecretString {
        let created = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut text = format!(
            "# immich-backup signing key: the backup machine signs its snapshots with it, so that a\n\
             # restore replays only what this machine wrote. Keep it beside the config (mode 0600).\n\
             # It cannot decrypt anything. Made from the identity it belongs to; made again with\n\
             # `immich-backup signing-key --identity FILE`.\n\
             # created: {created}\n"
        );
        if let Some(r) = recipient {
            text.push_str(&format!("# recipient: {r}\n"));
        }
        text.push_str(&format!("# verify key: {}\n", self.verify_key()));
        text.push_str(self.to_text().expose_secret());
        text.push('\n');
        SecretString::from(text)
    }
}

/// Signing keys as the config gives them: inline (`[encryption] signing_key`, often from the
/// environment; several separated by commas) and/or in a file (one key per line, `#` comments). Returns the keys and the
/// recipients the file says they were made for.
pub(crate) fn load_signing_keys(
    inline: &str,
    file: Option<&Path>,
) -> Result<(Vec<SigningKey>, Vec<String>)> {
    let mut keys = Vec::new();
    let mut recipients = Vec::new();
    let mut parse = |line: &str, origin: &str| -> Result<()> {
        let line = line.trim();
        if let Some(r) = line.strip_prefix("# recipient:") {
            recipients.push(r.trim().to_string());
            return Ok(());
        }
        if line.is_empty() || line.starts_with('#') {
            return Ok(());
        }
        if line.starts_with("AGE-SECRET-KEY-") {
            return Err(Error::Config(format!(
                "{origin}: this is an age identity, not a signing key; never put the identity on the backup machine. Make the signing key with `immich-backup signing-key --identity FILE` where the identity is kept"
            )));
        }
        let key = SigningKey::parse(line).ok_or_else(|| {
            Error::Config(format!(
                "{origin}: not an IMMICH-BACKUP-SIGNING-KEY-1… signing key (make one with `immich-backup keygen` or `immich-backup signing-key`)"
            ))
        })?;
        keys.push(key);
        Ok(())
    };
    for key in inline
        .split([',', ' ', '\n'])
        .filter(|k| !k.trim().is_empty())
    {
        parse(key, "[encryption] signing_key")?;
    }
    if let Some(path) = file {
        warn_if_readable_by_others(path, "signing key");
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "[encryption] signing_key_file {}: {e}",
                path.display()
            ))
        })?;
        for (n, line) in text.lines().enumerate() {
            parse(line, &format!("{}:{}", path.display(), n + 1))?;
        }
    }
    Ok((keys, recipients))
}

/// Warn, as ssh does, when a secret key file can be read by other users.
pub(crate) fn warn_if_readable_by_others(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{what} file {} can be read by other users (mode {:o}); restrict it with `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
}

/// Write a new secret key file with mode 0600; never overwrites.
pub fn write_secret_file(path: &Path, text: &SecretString, what: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Usage(format!(
                    "{} already exists; refusing to overwrite a {what} (choose another path)",
                    path.display()
                ))
            } else {
                Error::io(path, e)
            }
        })?;
    f.write_all(text.expose_secret().as_bytes()).at(path)?;
    f.sync_all().at(path)
}

/// What a snapshot's signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub id: String,
    pub time: DateTime<Utc>,
    /// SHA-256 of the stored `manifest.json.age` (its ciphertext, as stored).
    pub manifest_sha256: String,
    /// SHA-256 of the stored `summary.json`.
    pub summary_sha256: String,
    /// SHA-256 of the stored `refs.txt.gz`.
    pub refs_sha256: String,
}

impl Statement {
    /// The exact text that is signed.
    pub fn text(&self) -> String {
        format!(
            "{STATEMENT_HEADER}\nid {}\ntime {}\nmanifest {}\nsummary {}\nrefs {}\n",
            self.id,
            self.time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            self.manifest_sha256,
            self.summary_sha256,
            self.refs_sha256
        )
    }

    /// Parse a statement's text; `None` unless it is exactly what [`Statement::text`] writes.
    pub fn parse(text: &str) -> Option<Statement> {
        let mut lines = text.strip_suffix('\n')?.split('\n');
        if lines.next()? != STATEMENT_HEADER {
            return None;
        }
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_string)
        };
        let statement = Statement {
            id: field("id")?,
            time: DateTime::parse_from_rfc3339(&field("time")?)
                .ok()?
                .with_timezone(&Utc),
            manifest_sha256: field("manifest")?,
            summary_sha256: field("summary")?,
            refs_sha256: field("refs")?,
        };
        let id_ok = !statement.id.is_empty()
            && statement
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        let hex_ok = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
        if lines.next().is_some()
            || statement.text() != text
            || !id_ok
            || ![
                &statement.manifest_sha256,
                &statement.summary_sha256,
                &statement.refs_sha256,
            ]
            .iter()
            .all(|h| hex_ok(h))
        {
            return None;
        }
        Some(statement)
    }
}

/// One signature in `signature.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The verification key, `immich-verify1…`.
    pub key: String,
    /// The Ed25519 signature of the statement text, base64.
    pub ed25519: String,
}

/// `snapshots/<id>/signature.json`: the statement and its signatures. Plaintext.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignatureFile {
    pub format: u32,
    pub statement: String,
    pub signatures: Vec<SignatureEntry>,
}

impl SignatureFile {
    /// Sign `statement` with every key.
    pub fn sign(statement: &Statement, keys: &[SigningKey]) -> SignatureFile {
        let text = statement.text();
        SignatureFile {
            format: SIGNATURE_FORMAT,
            signatures: keys
                .iter()
                .map(|k| SignatureEntry {
                    key: k.verify_key().to_string(),
                    ed25519: BASE64_STANDARD.encode(k.sign(text.as_bytes())),
                })
                .collect(),
            statement: text,
        }
    }

    /// The statement, if one of `trusted` signed it; else why not.
    pub fn verify(&self, trusted: &[VerifyKey]) -> std::result::Result<Statement, String> {
        if self.format > SIGNATURE_FORMAT {
            return Err(format!(
                "signature format {} is newer than this immich-backup reads ({SIGNATURE_FORMAT}); upgrade immich-backup",
                self.format
            ));
        }
        let statement = Statement::parse(&self.statement)
            .ok_or_else(|| "its signed statement is malformed".to_string())?;
        let signed_by_trusted = self.signatures.iter().any(|s| {
            let (Ok(key), Ok(sig)) = (
                s.key.parse::<VerifyKey>(),
                BASE64_STANDARD.decode(&s.ed25519),
            ) else {
                return false;
            };
            trusted.contains(&key) && key.verifies(self.statement.as_bytes(), &sig)
        });
        if !signed_by_trusted {
            let keys: Vec<&str> = self.signatures.iter().map(|s| s.key.as_str()).collect();
            return Err(format!(
                "no valid signature by a trusted key (signed for {}; trusted: {})",
                if keys.is_empty() {
                    "no key".to_string()
                } else {
                    keys.join(", ")
                },
                trusted
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(statement)
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> Statement {
        Statement {
            id: "20261125T035314.976Z-67811777".into(),
            time: "2026-11-25T03:53:14.976Z".parse().unwrap(),
            manifest_sha256: sha256_hex(b"m"),
            summary_sha256: sha256_hex(b"s"),
            refs_sha256: sha256_hex(b"r"),
        }
    }

    #[test]
    fn keys_round_trip_and_derivation_is_deterministic() {
        let a = SigningKey::derive("age-x25519", &[7u8; 32]);
        let b = SigningKey::derive("age-x25519", &[7u8; 32]);
        let c = SigningKey::derive("ssh-ed25519", &[7u8; 32]);
        assert_eq!(a.verify_key(), b.verify_key());
        assert_ne!(a.verify_key(), c.verify_key(), "the kind separates domains");
        let text = a.to_text();
        assert!(text
            .expose_secret()
            .starts_with("IMMICH-BACKUP-SIGNING-KEY-1"));
        let back = SigningKey::parse(text.expose_secret()).unwrap();
        assert_eq!(back.verify_key(), a.verify_key());
        let vk = a.verify_key().to_string();
        assert!(vk.starts_with("immich-verify1"), "{vk}");
        assert_eq!(vk.parse::<VerifyKey>().unwrap(), a.verify_key());
        assert!("age1xyz".parse::<VerifyKey>().is_err());
        // The file form parses back, with its recipient comment.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        write_secret_file(&path, &a.file_text(Some("age1abc")), "signing key").unwrap();
        let (keys, recipients) = load_signing_keys("", Some(&path)).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].verify_key(), a.verify_key());
        assert_eq!(recipients, vec!["age1abc".to_string()]);
        assert!(write_secret_file(&path, &a.file_text(None), "signing key").is_err());
    }

    #[test]
    fn statements_are_signed_and_verified_only_by_trusted_keys() {
        let key = SigningKey::derive("age-x25519", &[1u8; 32]);
        let other = SigningKey::derive("age-x25519", &[2u8; 32]);
        let st = statement();
        assert_eq!(Statement::parse(&st.text()), Some(st.clone()));
        let file = SignatureFile::sign(&st, &[key]);
        let trusted = [SigningKey::derive("age-x25519", &[1u8; 32]).verify_key()];
        assert_eq!(file.verify(&trusted).unwrap(), st);
        assert!(file.verify(&[other.verify_key()]).is_err());
        assert!(file.verify(&[]).is_err());
        // A changed statement no longer verifies.
        let mut forged = file.clone();
        forged.statement = forged.statement.replace("67811777", "67811778");
        assert!(forged.verify(&trusted).is_err());
        // A signature by another key, claiming to be the trusted one, does not verify.
        let mut forged = SignatureFile::sign(&st, &[other]);
        forged.signatures[0].key = trusted[0].to_string();
        assert!(forged.verify(&trusted).is_err());
        // Extra text, or a statement that is not in canonical form, is refused.
        assert!(Statement::parse(&format!("{}extra\n", st.text())).is_none());
        assert!(Statement::parse(&st.text().replace("\nid ", "\nid  ")).is_none());
    }
}
