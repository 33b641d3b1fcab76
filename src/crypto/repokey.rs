//! The repository key (format 2): one age X25519 key pair per repository that every backup seals
//! to, so that the people who may read the store can change without re-uploading the library.
//!
//! Its public half names the content (the content-address key is derived from it exactly as from
//! any recipient set) and is what the backup machine encrypts to. Its secret half is stored only
//! inside *key files*: age files, one per person's recipient, whose plaintext is an identity file
//! that `age -d -i` takes. The backup machine, which holds no identity, learns the public half from
//! a *machine file*: an age file sealed to an X25519 key derived from its signing key, carrying the
//! public key and a MAC keyed by the same signing key, so a store that was tampered with cannot make
//! it encrypt to anyone else's key. The public key is never stored in plaintext: the storage
//! provider cannot derive the content-address key from it. See docs/FORMAT.md, "Repository keys".

use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use bech32::ToBase32;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::sign::SigningKey;

/// Context of the key id (the folder name under `keys/`), derived from the public key.
const KEY_ID_CONTEXT: &str = "immich-backup 2026-12 repository key id v1";
/// Context of a recipient's id (a key file's name), derived from the canonical recipient.
const RECIPIENT_ID_CONTEXT: &str = "immich-backup 2026-12 recipient id v1";
/// Context of the backup machine's X25519 secret, derived from its signing key's seed.
const MACHINE_SECRET_CONTEXT: &str = "immich-backup 2026-12 machine key v1";
/// Context of the key of a machine file's MAC, derived from the signing key's seed.
const MACHINE_MAC_CONTEXT: &str = "immich-backup 2026-12 machine file mac v1";
/// Context of a machine's id (a machine file's name), derived from its verification key.
const MACHINE_ID_CONTEXT: &str = "immich-backup 2026-12 machine id v1";
/// The first line of a key file's plaintext.
const KEY_FILE_HEADER: &str = "# immich-backup repository key";

/// A repository key pair, or an identity derived like one (a backup machine's).
pub struct RepositoryKey {
    secret: SecretString,
    public: String,
}

impl std::fmt::Debug for RepositoryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepositoryKey({})", self.id())
    }
}

impl RepositoryKey {
    /// A new random key pair.
    pub fn generate() -> RepositoryKey {
        let identity = age::x25519::Identity::generate();
        RepositoryKey {
            public: identity.to_public().to_string(),
            secret: SecretString::from(identity.to_string().expose_secret().to_string()),
        }
    }

    /// The key pair of the 32-byte X25519 secret `bytes`.
    fn from_secret(bytes: &[u8; 32]) -> RepositoryKey {
        let text = bech32::encode(
            "age-secret-key-",
            bytes.to_base32(),
            bech32::Variant::Bech32,
        )
        .expect("valid Bech32 parts")
        .to_uppercase();
        RepositoryKey::parse(&text).expect("a fresh secret parses")
    }

    /// The key pair of an `AGE-SECRET-KEY-1…` line; `None` if it is not one.
    pub fn parse(line: &str) -> Option<RepositoryKey> {
        let identity = age::x25519::Identity::from_str(line.trim()).ok()?;
        Some(RepositoryKey {
            public: identity.to_public().to_string(),
            secret: SecretString::from(identity.to_string().expose_secret().to_string()),
        })
    }

    /// The public half, `age1…`: what backups seal to.
    pub fn public(&self) -> &str {
        &self.public
    }

    /// The secret half, `AGE-SECRET-KEY-1…`.
    pub fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// The key's id (16 hex digits): the end of its folder's name under `keys/`.
    pub fn id(&self) -> String {
        key_id(&self.public)
    }

    /// The plaintext of this key's key file for `recipient`: an age identity file with comments.
    pub fn key_file_text(&self, repository: &str, recipient: &str) -> SecretString {
        let created = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        SecretString::from(format!(
            "{KEY_FILE_HEADER}: decrypt the snapshots of repository {repository} with it\n\
             # (age -d -i THIS_FILE OBJECT). Keep it as secret as the identity that opened it.\n\
             # repository: {repository}\n# key: {}\n# recipient: {recipient}\n# created: {created}\n\
             # public key: {}\n{}\n",
            self.id(),
            self.public,
            self.secret.expose_secret()
        ))
    }
}

/// The repository key in a key file's plaintext, and the recipient the file says it was made for.
pub fn parse_key_file(plain: &str) -> Option<(RepositoryKey, Option<String>)> {
    if !plain.starts_with(KEY_FILE_HEADER) {
        return None;
    }
    let key = plain.lines().find_map(|l| {
        l.trim()
            .starts_with("AGE-SECRET-KEY-")
            .then(|| RepositoryKey::parse(l))?
    })?;
    let recipient = plain
        .lines()
        .find_map(|l| l.strip_prefix("# recipient: "))
        .map(|r| r.trim().to_string());
    Some((key, recipient))
}

/// The id of the repository key whose public half is `public` (16 hex digits).
pub fn key_id(public: &str) -> String {
    short_id(KEY_ID_CONTEXT, public.as_bytes())
}

/// The id of recipient `canonical` (16 hex digits): the name of its key files.
pub fn recipient_id(canonical: &str) -> String {
    short_id(RECIPIENT_ID_CONTEXT, canonical.as_bytes())
}

/// Whether key folder `folder` (`<time>-<key id>`) is the folder of public key `public`.
pub fn folder_matches(folder: &str, public: &str) -> bool {
    folder
        .rsplit_once('-')
        .is_some_and(|(_, id)| id == key_id(public))
}

fn short_id(context: &str, material: &[u8]) -> String {
    hex::encode(&blake3::derive_key(context, material)[..8])
}

/// What a backup machine knows through its signing key: the identity its machine files are sealed
/// to, and the key of their MAC.
pub struct Machine {
    identity: RepositoryKey,
    mac_key: [u8; 32],
    id: String,
}

impl Machine {
    /// The machine of signing key `signing`.
    pub fn of(signing: &SigningKey) -> Machine {
        let identity = RepositoryKey::from_secret(&signing.derive_secret(MACHINE_SECRET_CONTEXT));
        Machine {
            identity,
            mac_key: signing.derive_secret(MACHINE_MAC_CONTEXT),
            id: short_id(MACHINE_ID_CONTEXT, &signing.verify_key().0),
        }
    }

    /// Its id (a machine file is `keys/<key id>/machine-<id>.age`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The identity that opens its machine files (as an identity file line).
    pub fn identity(&self) -> &RepositoryKey {
        &self.identity
    }

    /// The recipient its machine files are sealed to (never stored anywhere).
    pub fn recipient(&self) -> &str {
        &self.identity.public
    }

    /// The machine file telling this machine to seal the snapshots of `repository` to `key`,
    /// stored in folder `keys/<folder>/`.
    pub fn file_for(&self, repository: &str, key: &RepositoryKey, folder: &str) -> MachineFile {
        let mut file = MachineFile {
            repository: repository.to_string(),
            key: folder.to_string(),
            public_key: key.public.clone(),
            created: Utc::now(),
            mac: String::new(),
        };
        file.mac = self.mac(&file);
        file
    }

    /// The public key a machine file gives, if its MAC is this machine's and it is for
    /// `repository` and the key folder `folder` (whose name ends in the key's id).
    pub fn check<'a>(
        &self,
        file: &'a MachineFile,
        repository: &str,
        folder: &str,
    ) -> Option<&'a str> {
        let ok = file.repository == repository
            && file.key == folder
            && folder_matches(folder, &file.public_key)
            && constant_time_eq(self.mac(file).as_bytes(), file.mac.as_bytes());
        ok.then_some(file.public_key.as_str())
    }

    fn mac(&self, f: &MachineFile) -> String {
        let statement = format!(
            "immich-backup machine file v1\nrepository {}\nkey {}\npublic {}\ncreated {}\n",
            f.repository,
            f.key,
            f.public_key,
            f.created.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
        blake3::keyed_hash(&self.mac_key, statement.as_bytes())
            .to_hex()
            .to_string()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A machine file's plaintext (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineFile {
    /// The repository's id (the marker's).
    pub repository: String,
    /// The key id.
    pub key: String,
    /// The repository key's public half.
    pub public_key: String,
    /// When it was made: the backup machine seals to the newest key it has a file for.
    pub created: DateTime<Utc>,
    /// BLAKE3 keyed with the machine's MAC key, over the fields above (docs/FORMAT.md).
    pub mac: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_is_an_identity_file() {
        let key = RepositoryKey::generate();
        let text = key.key_file_text("r1", "age1xyz");
        let (back, recipient) = parse_key_file(text.expose_secret()).unwrap();
        assert_eq!(back.public(), key.public());
        assert_eq!(recipient.as_deref(), Some("age1xyz"));
        // age's own parser reads it as an identity file (what `age -d -i` does).
        let ids = age::IdentityFile::from_buffer(text.expose_secret().as_bytes())
            .unwrap()
            .into_identities()
            .unwrap();
        assert_eq!(ids.len(), 1);
        assert!(parse_key_file("AGE-SECRET-KEY-1 not a key file").is_none());
    }

    #[test]
    fn machine_files_verify_only_with_their_own_signing_key() {
        let signing = SigningKey::from_seed([7; 32]);
        let other = SigningKey::from_seed([8; 32]);
        let key = RepositoryKey::generate();
        let m = Machine::of(&signing);
        let folder = format!("20261205T000000Z-{}", key.id());
        let file = m.file_for("r1", &key, &folder);
        assert_eq!(m.check(&file, "r1", &folder), Some(key.public()));
        assert_eq!(Machine::of(&other).check(&file, "r1", &folder), None);
        assert_eq!(m.check(&file, "r2", &folder), None);
        assert_eq!(m.check(&file, "r1", "20261205T000000Z-0000"), None);
        let mut forged = file.clone();
        forged.public_key = RepositoryKey::generate().public().to_string();
        assert_eq!(m.check(&forged, "r1", &folder), None);
        let forged_folder = format!("20261205T000000Z-{}", key_id(&forged.public_key));
        forged.key = forged_folder.clone();
        assert_eq!(m.check(&forged, "r1", &forged_folder), None);
        // Derived deterministically from the signing key, and distinct per key.
        assert_eq!(Machine::of(&signing).recipient(), m.recipient());
        assert_ne!(Machine::of(&other).recipient(), m.recipient());
    }
}
