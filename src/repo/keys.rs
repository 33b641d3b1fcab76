//! Repository keys (format 2): what lets the people who may read a store change without the
//! library being uploaded again.
//!
//! Every snapshot is sealed to one repository key ([`crate::crypto::repokey`]). Under
//! `keys/<time>-<key id>/` each key has one *key file* per person (its secret, sealed to their
//! recipient) and one *machine file* per backup machine (its public half, sealed to and MACed with
//! keys derived from that machine's signing key). So:
//!
//! - a backup ([`for_backup`]) learns the key to seal to from its machine file, with no identity,
//!   and can be sure the store did not substitute one;
//! - a restore ([`unlock`]) opens the key files its identity can, and then the snapshots;
//! - `key add` / `key remove` write or delete key files only; `key rotate` makes a new key for the
//!   snapshots to come; `key migrate` starts using keys in a store that had none (format 1).
//!
//! Key files are written before the machine files that make backups use a key, so a key is never
//! used before the people it is for can open it.

use std::collections::{BTreeMap, BTreeSet};

use age::secrecy::ExposeSecret;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::crypto::repokey::{self, Machine, MachineFile, RepositoryKey};
use crate::crypto::sign::SigningKey;
use crate::crypto::{Identities, Recipients};
use crate::error::{Error, Result};
use crate::format::{Object, RepoMarker, KEYS_DIR};

use super::read::open_bytes_with;
use super::write::seal_bytes;
use super::{Repository, Sealed};

/// At most this many key files are tried by an identity whose recipient is not known (an SSH
/// key): a store cannot make a restore fetch without end.
const MAX_BLIND_TRIES: usize = 64;

/// One repository key's folder, as listed (no secret needed).
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyFolder {
    /// `<YYYYMMDDTHHMMSSZ>-<key id>`: folders sort by the time their key was made.
    pub name: String,
    /// The recipient ids that have a key file.
    pub recipients: Vec<String>,
    /// The machine ids that have a machine file.
    pub machines: Vec<String>,
}

/// Every key folder, oldest first (one listing of `keys/`).
pub async fn list(repo: &Repository) -> Result<Vec<KeyFolder>> {
    let mut folders: BTreeMap<String, KeyFolder> = BTreeMap::new();
    let mut s = std::pin::pin!(repo.store().list(KEYS_DIR));
    while let Some(item) = s.next().await {
        let (key, _) = item?;
        let mut parts = key.split('/').skip(1);
        let (Some(folder), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".age") else {
            continue;
        };
        let entry = folders
            .entry(folder.to_string())
            .or_insert_with(|| KeyFolder {
                name: folder.to_string(),
                ..Default::default()
            });
        match stem.strip_prefix("machine-") {
            Some(machine) => entry.machines.push(machine.to_string()),
            None => entry.recipients.push(stem.to_string()),
        }
    }
    Ok(folders.into_values().collect())
}

/// One recipient as a recipient set, and its canonical text.
fn single(recipient: &str) -> Result<(Recipients, String)> {
    let r = Recipients::load(&[recipient.to_string()], None)?;
    let canonical = r.canonical()[0].clone();
    Ok((r, canonical))
}

/// Write `key`'s key file for `recipient` into `folder`.
async fn write_key_file(
    repo: &Repository,
    repository: &str,
    folder: &str,
    key: &RepositoryKey,
    recipient: &str,
) -> Result<()> {
    let (to, canonical) = single(recipient)?;
    let text = key.key_file_text(repository, &canonical);
    let sealed = seal_bytes(&to, text.expose_secret().as_bytes())?;
    let obj = Object::KeyFile {
        key: folder.to_string(),
        recipient: repokey::recipient_id(&canonical),
    };
    repo.create_sealed(&obj, &sealed).await
}

/// Write `key`'s machine file for the backup machine of `signing` into `folder`.
async fn write_machine_file(
    repo: &Repository,
    repository: &str,
    folder: &str,
    key: &RepositoryKey,
    signing: &SigningKey,
) -> Result<()> {
    let machine = Machine::of(signing);
    let file = machine.file_for(repository, key, folder);
    let (to, _) = single(machine.recipient())?;
    let sealed = seal_bytes(&to, &serde_json::to_vec_pretty(&file).expect("serialises"))?;
    let obj = Object::MachineFile {
        key: folder.to_string(),
        machine: machine.id().to_string(),
    };
    repo.create_sealed(&obj, &sealed).await
}

/// Make a new repository key for `marker`'s repository: a key file for each of `recipients`, then a
/// machine file for each of `signing`. Returns its folder's name.
pub async fn create(
    repo: &Repository,
    marker: &RepoMarker,
    recipients: &Recipients,
    signing: &[SigningKey],
) -> Result<String> {
    if signing.is_empty() {
        return Err(Error::Config("a repository key needs the backup machine's signing key: set [encryption] signing_key_file (`immich-backup keygen` wrote it beside the identity)".into()));
    }
    let key = RepositoryKey::generate();
    let folder = format!("{}-{}", Utc::now().format("%Y%m%dT%H%M%SZ"), key.id());
    for r in recipients.canonical() {
        write_key_file(repo, &marker.id, &folder, &key, r).await?;
    }
    for s in signing {
        write_machine_file(repo, &marker.id, &folder, &key, s).await?;
    }
    tracing::info!(key = %folder, recipients = recipients.canonical().len(), "repository key made");
    Ok(folder)
}

/// What a backup seals to: the repository key (and its folder), or, in a store without keys
/// (format 1), the recipients themselves.
#[derive(Debug)]
pub struct SealTo {
    pub recipients: Recipients,
    /// The key folder's name; `None` for format 1.
    pub key: Option<String>,
}

/// The key a backup seals to: from the newest key folder's machine file for one of `signing`.
/// A store without keys whose marker says format 2 gets its first key here; one that says format
/// 1 keeps sealing to `recipients` until `key migrate`.
pub async fn for_backup(
    repo: &Repository,
    marker: &RepoMarker,
    recipients: Recipients,
    signing: &[SigningKey],
) -> Result<SealTo> {
    let folders = list(repo).await?;
    let Some(newest) = folders.last() else {
        if marker.format < 2 || signing.is_empty() {
            return Ok(SealTo {
                recipients,
                key: None,
            });
        }
        let name = create(repo, marker, &recipients, signing).await?;
        let made = KeyFolder {
            name,
            recipients: recipients
                .canonical()
                .iter()
                .map(|r| repokey::recipient_id(r))
                .collect(),
            machines: Vec::new(),
        };
        return seal_to(repo, marker, &made, signing, &recipients).await;
    };
    if signing.is_empty() {
        return Err(Error::Config("this store seals snapshots to a repository key, which a backup finds with its signing key: set [encryption] signing_key_file".into()));
    }
    seal_to(repo, marker, newest, signing, &recipients).await
}

/// The [`SealTo`] of key folder `folder`, read from this machine's machine file.
async fn seal_to(
    repo: &Repository,
    marker: &RepoMarker,
    folder: &KeyFolder,
    signing: &[SigningKey],
    recipients: &Recipients,
) -> Result<SealTo> {
    let public = machine_public_key(repo, marker, &folder.name, signing).await?;
    warn_missing_recipients(folder, recipients);
    Ok(SealTo {
        recipients: Recipients::load(&[public], None)?,
        key: Some(folder.name.clone()),
    })
}

/// The public key in this machine's machine file of `folder`, checked.
async fn machine_public_key(
    repo: &Repository,
    marker: &RepoMarker,
    folder: &str,
    signing: &[SigningKey],
) -> Result<String> {
    for s in signing {
        let machine = Machine::of(s);
        let obj = Object::MachineFile {
            key: folder.to_string(),
            machine: machine.id().to_string(),
        };
        let sealed = match repo.get_sealed(&obj).await {
            Ok(s) => s,
            Err(Error::Missing { .. }) => continue,
            Err(e) => return Err(e),
        };
        let forged = || {
            Error::Corrupt {
            object: obj.key(),
            message: "it does not verify with this machine's signing key: the store was changed by someone else; do not back up to it before you know why".into(),
        }
        };
        let plain = open_with(machine.identity(), &obj, &sealed).map_err(|_| forged())?;
        let file: MachineFile = serde_json::from_slice(&plain).map_err(|_| forged())?;
        return machine
            .check(&file, &marker.id, folder)
            .map(str::to_string)
            .ok_or_else(forged);
    }
    Err(Error::Config(format!(
        "the store's newest repository key (keys/{folder}) was not made for this backup machine's signing key: run `immich-backup key rotate` here to make a key it can seal to (or set [encryption] signing_key_file to the key it was made for)"
    )))
}

/// Warn about configured recipients that have no key file for `folder` (they cannot read the
/// snapshots sealed to it).
fn warn_missing_recipients(folder: &KeyFolder, recipients: &Recipients) {
    for r in recipients.canonical() {
        if !folder.recipients.contains(&repokey::recipient_id(r)) {
            tracing::warn!(recipient = %r, key = %folder.name, "this recipient in [encryption] recipients has no key file for the repository key, so cannot read new snapshots: run `immich-backup key add RECIPIENT` with an identity that can");
        }
    }
}

/// Open a sealed object with one repository key (or machine key).
fn open_with(key: &RepositoryKey, obj: &Object, sealed: &Sealed) -> Result<Vec<u8>> {
    let ids = Identities::of_keys(std::slice::from_ref(key));
    open_bytes_with(&ids, obj, sealed)
}

/// A repository key an identity opened, with its folder.
pub struct Opened {
    pub folder: String,
    pub key: RepositoryKey,
    /// The recipient the key file says it is for.
    pub recipient: Option<String>,
}

/// The repository keys `identities` open, oldest folder first. Key files that are not what they
/// claim (a key whose id is not its folder's) are skipped with a warning.
pub async fn open_keys(repo: &Repository, identities: &Identities) -> Result<Vec<Opened>> {
    open_keys_in(repo, identities, &list(repo).await?).await
}

/// [`open_keys`] of the key folders `folders` (as [`list`] gave them).
async fn open_keys_in(
    repo: &Repository,
    identities: &Identities,
    folders: &[KeyFolder],
) -> Result<Vec<Opened>> {
    let mine: BTreeSet<String> = identities
        .recipients()
        .iter()
        .map(|r| repokey::recipient_id(r))
        .collect();
    let mut tries = Vec::new();
    for f in folders {
        for rid in &f.recipients {
            if mine.is_empty() || mine.contains(rid) {
                tries.push(Object::KeyFile {
                    key: f.name.clone(),
                    recipient: rid.clone(),
                });
            }
        }
    }
    tries.truncate(MAX_BLIND_TRIES.max(mine.len() * folders.len()));
    let opened: Vec<Option<Opened>> = futures::stream::iter(tries)
        .map(|obj| open_key_file(repo, identities, obj))
        .buffered(8)
        .try_collect()
        .await?;
    Ok(opened.into_iter().flatten().collect())
}

async fn open_key_file(
    repo: &Repository,
    identities: &Identities,
    obj: Object,
) -> Result<Option<Opened>> {
    let Object::KeyFile { key: folder, .. } = &obj else {
        unreachable!("only key files are tried")
    };
    let sealed = match repo.get_sealed(&obj).await {
        Ok(s) => s,
        Err(Error::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let plain = match open_bytes_with(identities, &obj, &sealed) {
        Ok(p) => p,
        Err(Error::WrongKey { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let text = String::from_utf8_lossy(&plain);
    match repokey::parse_key_file(&text) {
        Some((key, recipient)) if repokey::folder_matches(folder, key.public()) => {
            Ok(Some(Opened {
                folder: folder.clone(),
                key,
                recipient,
            }))
        }
        _ => {
            tracing::warn!(object = %obj.key(), "ignored: it opens with this identity but holds no repository key of its folder (forged or damaged)");
            Ok(None)
        }
    }
}

/// `identities` with the repository keys they open in this store: what a [`super::Reader`] needs.
pub async fn unlock(repo: &Repository, identities: &Identities) -> Result<Identities> {
    let folders = list(repo).await?;
    let opened = open_keys_in(repo, identities, &folders).await?;
    if opened.is_empty() && !folders.is_empty() {
        tracing::warn!("no key file in keys/ opens with this identity, so the snapshots sealed to a repository key will not open: its recipient is not one of the store's (`immich-backup key list` shows them; a recipient who is adds it with `key add`)");
    }
    let keys: Vec<RepositoryKey> = opened.into_iter().map(|o| o.key).collect();
    Ok(identities.with_repository_keys(&keys))
}

/// What `key add` did.
#[derive(Debug, Default, Serialize)]
pub struct AddReport {
    pub recipient: String,
    /// Key folders that got a key file for the recipient.
    pub added: Vec<String>,
    /// Key folders that had one already.
    pub present: Vec<String>,
    /// Key folders the identity could not open (their snapshots stay unreadable to the recipient).
    pub unopened: Vec<String>,
}

/// `key add RECIPIENT`: a key file for `recipient` in every key folder `identities` can open.
pub async fn add(
    repo: &Repository,
    marker: &RepoMarker,
    identities: &Identities,
    recipient: &str,
) -> Result<AddReport> {
    let (_, canonical) = single(recipient)?;
    let rid = repokey::recipient_id(&canonical);
    let folders = list(repo).await?;
    if folders.is_empty() {
        return Err(no_keys());
    }
    let opened = open_keys_in(repo, identities, &folders).await?;
    if opened.is_empty() {
        return Err(cannot_open());
    }
    let mut report = AddReport {
        recipient: canonical.clone(),
        ..Default::default()
    };
    for f in &folders {
        let Some(o) = opened.iter().find(|o| o.folder == f.name) else {
            report.unopened.push(f.name.clone());
            continue;
        };
        if f.recipients.contains(&rid) {
            report.present.push(f.name.clone());
            continue;
        }
        write_key_file(repo, &marker.id, &f.name, &o.key, &canonical).await?;
        report.added.push(f.name.clone());
    }
    Ok(report)
}

/// What `key remove` did.
#[derive(Debug, Default, Serialize)]
pub struct RemoveReport {
    pub recipient: String,
    /// Key folders whose key file for the recipient was deleted.
    pub removed: Vec<String>,
}

/// `key remove RECIPIENT`: delete `recipient`'s key files. Refused when the identity opens no key
/// file, or when a key would be left with no key file at all (its snapshots would be lost).
pub async fn remove(
    repo: &Repository,
    identities: &Identities,
    recipient: &str,
) -> Result<RemoveReport> {
    let canonical = match single(recipient) {
        Ok((_, c)) => c,
        // A recipient id (from `key list`) for a recipient whose key is not known.
        Err(_) if is_recipient_id(recipient) => recipient.to_string(),
        Err(e) => return Err(e),
    };
    let rid = if is_recipient_id(&canonical) {
        canonical.clone()
    } else {
        repokey::recipient_id(&canonical)
    };
    let folders = list(repo).await?;
    if folders.is_empty() {
        return Err(no_keys());
    }
    if open_keys_in(repo, identities, &folders).await?.is_empty() {
        return Err(cannot_open());
    }
    let holding: Vec<&KeyFolder> = folders
        .iter()
        .filter(|f| f.recipients.contains(&rid))
        .collect();
    if holding.is_empty() {
        return Err(Error::Usage(format!(
            "{canonical} has no key file in this store (`immich-backup key list` shows who has)"
        )));
    }
    if let Some(last) = holding.iter().find(|f| f.recipients.len() == 1) {
        return Err(Error::Usage(format!(
            "{canonical} is the only recipient of repository key {}: removing it would leave that key's snapshots unreadable; add another recipient first (`immich-backup key add`)",
            last.name
        )));
    }
    let mut report = RemoveReport {
        recipient: canonical,
        ..Default::default()
    };
    for f in holding {
        repo.delete(&Object::KeyFile {
            key: f.name.clone(),
            recipient: rid.clone(),
        })
        .await?;
        report.removed.push(f.name.clone());
    }
    Ok(report)
}

fn is_recipient_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `key rotate`: a new repository key for the snapshots to come, for `recipients` and this
/// machine's `signing` keys. Refused (unless `force`) when the newest key has a key file for a
/// recipient `recipients` does not name: the new key would silently shut them out.
pub async fn rotate(
    repo: &Repository,
    marker: &RepoMarker,
    recipients: &Recipients,
    signing: &[SigningKey],
    force: bool,
) -> Result<String> {
    let folders = list(repo).await?;
    let Some(newest) = folders.last() else {
        return Err(no_keys());
    };
    let named: BTreeSet<String> = recipients
        .canonical()
        .iter()
        .map(|r| repokey::recipient_id(r))
        .collect();
    let dropped: Vec<&String> = newest
        .recipients
        .iter()
        .filter(|r| !named.contains(*r))
        .collect();
    if !dropped.is_empty() && !force {
        return Err(Error::Usage(format!(
            "the current repository key is also held by {} recipient(s) that [encryption] recipients does not name (ids {}): add them there so the new key is theirs too, or pass --force to leave them out",
            dropped.len(),
            dropped.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    create(repo, marker, recipients, signing).await
}

/// `key migrate`: the first repository key of a store whose snapshots are sealed to the
/// recipients themselves (format 1).
pub async fn migrate(
    repo: &Repository,
    marker: &RepoMarker,
    recipients: &Recipients,
    signing: &[SigningKey],
) -> Result<String> {
    if let Some(newest) = list(repo).await?.last() {
        return Err(Error::Usage(format!(
            "this store already seals its snapshots to a repository key ({}); nothing to migrate",
            newest.name
        )));
    }
    create(repo, marker, recipients, signing).await
}

fn no_keys() -> Error {
    Error::Usage("this store has no repository key yet (format 1: snapshots are sealed to the recipients themselves): run `immich-backup key migrate` first".into())
}

fn cannot_open() -> Error {
    Error::WrongKey {
        object: format!("{KEYS_DIR}/"),
        message: "no key file opens with this identity: only a recipient of the repository key can change who holds it (`immich-backup key list` shows the recipients)".into(),
    }
}
