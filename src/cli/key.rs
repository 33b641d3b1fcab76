//! `key list|add|remove|rotate|migrate`: who holds the repository key, printed over
//! [`immich_backup::repo::keys`]. Kept apart from cli.rs, as the browsing commands are.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use immich_backup::config::Config;
use immich_backup::crypto::repokey;
use immich_backup::error::{exit, Error, Result};
use immich_backup::repo::{keys, snapshots, Repository};
use serde::Serialize;

use immich_backup::crypto::Identities;

use super::{print_json, recipients};

#[derive(Subcommand)]
pub(super) enum KeyAction {
    /// List the repository keys, newest first: who holds each one (recipients named in
    /// [encryption] recipients or opened with --identity), its backup machines, its snapshots.
    List {
        /// Also name the recipients whose key files this identity opens.
        #[arg(long, short = 'i')]
        identity: Option<PathBuf>,
    },
    /// Let RECIPIENT (an `age1…` or SSH public key) read the store: a key file for it in every
    /// repository key your identity opens. Nothing else is uploaded again.
    Add {
        recipient: String,
        /// An identity that opens a key file; default [encryption] identity_file.
        #[arg(long, short = 'i')]
        identity: Option<PathBuf>,
    },
    /// Delete RECIPIENT's key files (its public key, or its id from `key list`). It may have kept
    /// the repository key: run `key rotate` so new snapshots use one it never had.
    Remove {
        recipient: String,
        /// An identity that opens a key file; default [encryption] identity_file.
        #[arg(long, short = 'i')]
        identity: Option<PathBuf>,
    },
    /// Make a new repository key for the snapshots to come, for [encryption] recipients and this
    /// backup machine (the answer to a leaked identity). Older snapshots keep their key, and
    /// whoever held it can read them until they are forgotten.
    Rotate {
        /// Also when the current key has recipients [encryption] recipients does not name (they
        /// will not read new snapshots).
        #[arg(long)]
        force: bool,
    },
    /// Start sealing snapshots to a repository key in a store made before keys existed (format
    /// 1). The next backup uploads the library once more; older snapshots stay restorable with
    /// the identities they were made for.
    Migrate,
}

pub(super) async fn run(cfg: &Config, action: KeyAction, json: bool) -> Result<i32> {
    let repo = Repository::open(&cfg.storage)?;
    let marker = snapshots::require_marker(&repo).await?;
    match action {
        KeyAction::List { identity } => list(cfg, &repo, identity, json).await,
        KeyAction::Add {
            recipient,
            identity,
        } => {
            let identities = identity_of(cfg, identity, "key add")?;
            let r = keys::add(&repo, &marker, &identities, &recipient).await?;
            if json {
                print_json(&r);
            } else {
                print_add(&r);
            }
            Ok(exit::OK)
        }
        KeyAction::Remove {
            recipient,
            identity,
        } => {
            let identities = identity_of(cfg, identity, "key remove")?;
            let r = keys::remove(&repo, &identities, &recipient).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "removed {}'s key files from {} repository key(s): {}",
                    r.recipient,
                    r.removed.len(),
                    r.removed.join(", ")
                );
                println!("Its holder could read the repository key before: run `immich-backup key rotate` so new snapshots are sealed to a key it never had (older snapshots stay readable to it until forgotten).");
            }
            Ok(exit::OK)
        }
        KeyAction::Rotate { force } => {
            let (signing, _) = cfg.encryption.signing_keys()?;
            let folder = keys::rotate(&repo, &marker, &recipients(cfg)?, &signing, force).await?;
            print_new_key(&folder, json, "rotated");
            if !json {
                println!("New snapshots are sealed to it. Older snapshots keep the key they were sealed to: whoever held that key (or a leaked identity that opens it) can still read them until you forget them (`immich-backup forget`, then `prune`).");
            }
            Ok(exit::OK)
        }
        KeyAction::Migrate => {
            let (signing, _) = cfg.encryption.signing_keys()?;
            let folder = keys::migrate(&repo, &marker, &recipients(cfg)?, &signing).await?;
            print_new_key(&folder, json, "migrated");
            if !json {
                println!("The next backup seals to the repository key and so uploads the library once more (content names change with the key). Older snapshots stay restorable with the identities they were sealed to; forget them and prune to free their space.");
            }
            Ok(exit::OK)
        }
    }
}

/// The identity of `--identity`, else `[encryption] identity_file`.
fn identity_of(cfg: &Config, flag: Option<PathBuf>, what: &str) -> Result<Identities> {
    let path = match (flag, cfg.encryption.identity_file.as_str()) {
        (Some(p), _) => p,
        (None, "") => {
            return Err(Error::Usage(format!(
                "{what} needs an identity that opens a key file: pass --identity FILE or set [encryption] identity_file"
            )))
        }
        (None, file) => cfg.existing_file("[encryption] identity_file", file)?,
    };
    Identities::load(&path)
}

fn print_add(r: &keys::AddReport) {
    println!(
        "{}: key file added to {} repository key(s){}",
        r.recipient,
        r.added.len(),
        match r.present.len() {
            0 => String::new(),
            n => format!(", already there in {n}"),
        }
    );
    if !r.unopened.is_empty() {
        println!("Not added to {} older key(s) your identity does not open ({}): the snapshots sealed to them stay unreadable to this recipient.", r.unopened.len(), r.unopened.join(", "));
    }
    println!("Add it to [encryption] recipients on the backup machine too, so that `key rotate` there includes it. Its restore trusts this store's snapshots once [encryption] verify_keys names the backup machine's verify key (`immich-backup init` prints it).");
}

fn print_new_key(folder: &str, json: bool, what: &str) {
    if json {
        print_json(&serde_json::json!({ what: true, "key": folder }));
    } else {
        println!("repository key keys/{folder} made");
    }
}

/// One key folder, for `key list`.
#[derive(Serialize)]
struct Listed {
    key: String,
    current: bool,
    snapshots: usize,
    recipients: Vec<ListedRecipient>,
    machines: usize,
}

#[derive(Serialize)]
struct ListedRecipient {
    id: String,
    recipient: Option<String>,
}

async fn list(
    cfg: &Config,
    repo: &Repository,
    identity: Option<PathBuf>,
    json: bool,
) -> Result<i32> {
    let folders = keys::list(repo).await?;
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    if let Ok(r) = recipients(cfg) {
        for c in r.canonical() {
            known.insert(repokey::recipient_id(c), c.clone());
        }
    }
    if let Some(path) = identity {
        let ids = Identities::load(&path)?;
        for o in keys::open_keys(repo, &ids).await? {
            if let Some(r) = o.recipient {
                known.insert(repokey::recipient_id(&r), r);
            }
        }
    }
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    for s in snapshots::list(repo).await? {
        if let Some(k) = s.summary.and_then(|s| s.repository_key) {
            *used.entry(k).or_default() += 1;
        }
    }
    let newest = folders.last().map(|f| f.name.clone());
    let listed: Vec<Listed> = folders
        .into_iter()
        .rev()
        .map(|f| Listed {
            current: Some(&f.name) == newest.as_ref(),
            snapshots: used.get(&f.name).copied().unwrap_or(0),
            recipients: f
                .recipients
                .iter()
                .map(|id| ListedRecipient {
                    id: id.clone(),
                    recipient: known.get(id).cloned(),
                })
                .collect(),
            machines: f.machines.len(),
            key: f.name,
        })
        .collect();
    if json {
        print_json(&listed);
        return Ok(exit::OK);
    }
    if listed.is_empty() {
        println!("no repository key: snapshots are sealed to [encryption] recipients themselves (format 1); `immich-backup key migrate` starts using one");
        return Ok(exit::OK);
    }
    for l in &listed {
        println!(
            "keys/{}{}  {} snapshot(s), {} backup machine(s)",
            l.key,
            if l.current { "  (current)" } else { "" },
            l.snapshots,
            l.machines
        );
        for r in &l.recipients {
            match &r.recipient {
                Some(name) => println!("  {name}"),
                None => println!("  {}  (a recipient not in [encryption] recipients; pass --identity to name yours)", r.id),
            }
        }
    }
    Ok(exit::OK)
}

/// After `init` made a new repository: its first repository key, when the config names the
/// recipients and the signing key (else the first backup makes it).
pub(super) async fn first_key(cfg: &Config, repo: &Repository) -> Result<Option<String>> {
    let marker = snapshots::require_marker(repo).await?;
    let (signing, _) = cfg.encryption.signing_keys()?;
    if marker.format < 2 || signing.is_empty() || !keys::list(repo).await?.is_empty() {
        return Ok(None);
    }
    // Without recipients there is no one to make it for yet: the first backup makes it.
    let Ok(recipients) = recipients(cfg) else {
        return Ok(None);
    };
    keys::create(repo, &marker, &recipients, &signing)
        .await
        .map(Some)
}
