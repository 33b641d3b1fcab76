//! Which snapshots a restore believes: only those this repository's backup machine signed.
//!
//! A snapshot is *authentic* when its `signature.json` carries a valid signature by a trusted
//! verification key (derived from the identity, or configured), over a statement that names this
//! very snapshot folder and the SHA-256 of the manifest and summary objects as they are stored; and
//! when the manifest, decrypted, names the same id and time. Everything else the restore reads is
//! bound to the manifest: the dump and the file list by their SHA-256 and age header MAC, the files
//! by their keyed content addresses. Copying an old snapshot under a newer id, editing any object,
//! or writing a whole new snapshot with the public recipients all fail here.
//!
//! Stores written before snapshots were signed (manifest format 1) have no signatures: a store in
//! which no snapshot is signed keeps working, with a loud warning (anyone with write access could
//! have written it); once any snapshot is signed, an unsigned one needs `--allow-unsigned`. `latest`
//! means the newest snapshot that is authentic: newer ones that are not are named and skipped.

use std::collections::BTreeMap;

use crate::crypto::sign::{self, SignatureFile, VerifyKey};
use crate::crypto::Identities;
use crate::error::{Error, Result};
use crate::format::{self, Manifest, Object};
use crate::repo::snapshots;
use crate::repo::{parse_json, Reader, Repository, Sealed};

/// What a restore trusts.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Verification keys whose signatures count.
    pub keys: Vec<VerifyKey>,
    /// Accept snapshots without a signature (stores written before signing existed).
    pub allow_unsigned: bool,
}

impl Trust {
    /// The keys derived from `identities` plus `extra` ones.
    pub fn new(identities: &Identities, extra: Vec<VerifyKey>, allow_unsigned: bool) -> Trust {
        let mut keys = identities.verify_keys().to_vec();
        for k in extra {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        Trust {
            keys,
            allow_unsigned,
        }
    }
}

/// A snapshot that passed [`open`], with its manifest.
#[derive(Debug, Clone)]
pub struct Opened {
    pub id: String,
    pub manifest: Manifest,
    /// The verification key of the signature that was trusted; `None`: unsigned, accepted with
    /// `--allow-unsigned`.
    pub signed_by: Option<VerifyKey>,
}

fn unauthentic(id: &str, message: String) -> Error {
    Error::Unauthentic {
        snapshot: id.to_string(),
        message,
    }
}

/// Read snapshot `id`, check that it is authentic, and decrypt its manifest.
pub async fn open(reader: &Reader, trust: &Trust, id: &str) -> Result<Opened> {
    let repo = reader.repo();
    let object = Object::Manifest(id.to_string());
    let sealed = repo.get_sealed(&object).await?;
    // Decrypted first: a wrong identity is told as such, not as an untrusted snapshot.
    let manifest: Manifest = parse_json(&object, &reader.open_bytes(&object, &sealed)?)?;
    let statement = match signature_bytes(repo, id).await? {
        Some(bytes) => {
            let file: SignatureFile = serde_json::from_slice(&bytes)
                .map_err(|e| unauthentic(id, format!("signature.json is malformed ({e})")))?;
            let statement = file
                .verify(&trust.keys)
                .map_err(|why| unauthentic(id, why))?;
            check_statement(repo, id, &statement, &sealed).await?;
            Some((statement, signer(&file, &trust.keys)))
        }
        None if trust.allow_unsigned => {
            tracing::warn!(snapshot = %id, "snapshot is NOT signed: restoring it all the same (a store without signatures, or --allow-unsigned). Anyone who could write to the store could have written it");
            None
        }
        None => {
            return Err(unauthentic(
                id,
                "it has no signature (signature.json is missing)".into(),
            ))
        }
    };
    if manifest.id != id {
        return Err(unauthentic(
            id,
            format!(
                "its manifest belongs to snapshot {}: it was copied under another name",
                manifest.id
            ),
        ));
    }
    if manifest.format > format::MANIFEST_FORMAT {
        return Err(Error::Usage(format!(
            "snapshot {id} has manifest format {} but this immich-backup reads up to {}; upgrade immich-backup",
            manifest.format,
            format::MANIFEST_FORMAT
        )));
    }
    let signed_by = match statement {
        Some((statement, signer)) => {
            if manifest.time != statement.time {
                return Err(unauthentic(
                    id,
                    "its manifest's time is not the signed one".into(),
                ));
            }
            if manifest.dump.header_mac.is_none() || manifest.files.header_mac.is_none() {
                return Err(unauthentic(
                    id,
                    "its signed manifest does not pin the dump and the file list".into(),
                ));
            }
            signer
        }
        None => None,
    };
    Ok(Opened {
        id: id.to_string(),
        manifest,
        signed_by,
    })
}

/// Snapshot `id`'s `signature.json`, if it has one.
async fn signature_bytes(repo: &Repository, id: &str) -> Result<Option<bytes::Bytes>> {
    match repo.get(&Object::Signature(id.to_string())).await {
        Ok(b) => Ok(Some(b)),
        Err(Error::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The first trusted key that signed `file`.
fn signer(file: &SignatureFile, trusted: &[VerifyKey]) -> Option<VerifyKey> {
    file.signatures
        .iter()
        .filter_map(|s| s.key.parse::<VerifyKey>().ok())
        .find(|k| trusted.contains(k))
}

/// The signed statement must name this folder and the objects as they are stored.
async fn check_statement(
    repo: &Repository,
    id: &str,
    statement: &sign::Statement,
    sealed_manifest: &Sealed,
) -> Result<()> {
    if statement.id != id {
        return Err(unauthentic(
            id,
            format!(
                "it carries the signature of snapshot {}: it was copied under another name",
                statement.id
            ),
        ));
    }
    if sign::sha256_hex(sealed_manifest.as_bytes()) != statement.manifest_sha256 {
        return Err(unauthentic(id, "its manifest is not the signed one".into()));
    }
    let summary = repo.get(&Object::Summary(id.to_string())).await?;
    if sign::sha256_hex(&summary) != statement.summary_sha256 {
        return Err(unauthentic(
            id,
            "its summary.json is not the signed one".into(),
        ));
    }
    Ok(())
}

/// A store in which no complete snapshot carries a signature was written before snapshots were
/// signed (immich-backup 0.1): it keeps working, loudly. Once any snapshot is signed, an unsigned
/// one needs `--allow-unsigned` (it may be old, or planted).
pub(crate) fn legacy_aware(trust: &Trust, folders: &BTreeMap<String, snapshots::Folder>) -> Trust {
    let any_signed = folders.values().any(|f| f.complete && f.signed);
    let mut trust = trust.clone();
    if !any_signed && !trust.allow_unsigned && folders.values().any(|f| f.complete) {
        tracing::warn!("no snapshot in this store is signed: it was written before immich-backup signed snapshots (0.1), or someone removed every signed one. Restoring unsigned snapshots; anyone who could write to the store could have written them. Back up with a signing key (`immich-backup signing-key`) from now on");
        trust.allow_unsigned = true;
    }
    trust
}

/// Resolve `wanted` (`latest`, an id or a unique prefix) to an authentic snapshot. For `latest`,
/// newer snapshots that are not authentic (or whose manifest is damaged) are skipped, with a warning
/// naming each.
pub async fn resolve(reader: &Reader, trust: &Trust, wanted: &str) -> Result<Opened> {
    let folders = snapshots::list_folders(reader.repo()).await?;
    let trust = &legacy_aware(trust, &folders);
    if wanted != "latest" {
        let id = snapshots::resolve(reader.repo(), wanted).await?;
        return open(reader, trust, &id).await;
    }
    let mut skipped: Vec<(String, Error)> = Vec::new();
    for id in folders
        .iter()
        .rev()
        .filter(|(_, f)| f.complete)
        .map(|(id, _)| id)
    {
        match open(reader, trust, id).await {
            Ok(o) => {
                for (s, why) in &skipped {
                    tracing::warn!(snapshot = %s, "skipped a newer snapshot that cannot be trusted: {why}");
                }
                return Ok(o);
            }
            Err(
                e @ (Error::Unauthentic { .. } | Error::Corrupt { .. } | Error::Missing { .. }),
            ) => skipped.push((id.clone(), e)),
            Err(e) => return Err(e),
        }
    }
    match skipped.into_iter().next() {
        Some((_, newest)) => Err(newest),
        None => Err(Error::Usage(format!(
            "no complete snapshot in {}; run `immich-backup backup` first",
            reader.repo().url()
        ))),
    }
}

/// What a snapshot's signature says, checked without the identity (`snapshots`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureStatus {
    /// Signed by one of the keys given, over this folder's manifest and summary.
    Trusted,
    /// Signed, but not by any key given, or not over what is stored: not written by this backup
    /// machine, or changed since.
    Untrusted,
    /// No signature (written by immich-backup 0.1, or without a signing key).
    Unsigned,
    /// Signed, but no key was given to check it with.
    Unchecked,
}

/// Check snapshot `id`'s signature against `keys`, reading only plaintext objects and the stored
/// manifest's bytes.
pub async fn signature_status(
    repo: &Repository,
    id: &str,
    keys: &[VerifyKey],
) -> Result<SignatureStatus> {
    let Some(bytes) = signature_bytes(repo, id).await? else {
        return Ok(SignatureStatus::Unsigned);
    };
    if keys.is_empty() {
        return Ok(SignatureStatus::Unchecked);
    }
    let Ok(file) = serde_json::from_slice::<SignatureFile>(&bytes) else {
        return Ok(SignatureStatus::Untrusted);
    };
    let Ok(statement) = file.verify(keys) else {
        return Ok(SignatureStatus::Untrusted);
    };
    let sealed = repo.get_sealed(&Object::Manifest(id.to_string())).await?;
    Ok(match check_statement(repo, id, &statement, &sealed).await {
        Ok(()) => SignatureStatus::Trusted,
        Err(Error::Unauthentic { .. } | Error::Missing { .. }) => SignatureStatus::Untrusted,
        Err(e) => return Err(e),
    })
}
