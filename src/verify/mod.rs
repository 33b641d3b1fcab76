//! `check`: can every snapshot in this store be restored whole?
//!
//! Three depths, each adding to the one before; all run under the shared lock, so that no prune
//! deletes anything meanwhile.
//!
//! - **Structure** (plaintext only, what the backup machine can read): every complete snapshot (one
//!   with a manifest) has its summary, refs, dump and file list; every content address its
//!   `refs.txt.gz` names exists in `data/`, at least as large as the smallest age file. Leftovers
//!   are counted and named, not errors: folders without a manifest (interrupted backups), staging
//!   folders of dead runs (folder stores), stale locks, objects in `data/` that are not content
//!   objects, content no snapshot references (what `prune` removes).
//! - **With the identity** (`lists.rs`): every manifest decrypts and is authentic (as a restore
//!   would believe it); every file list decrypts and matches its manifest's SHA-256; its
//!   addresses are those of `refs.txt.gz` (which prune trusts); every dump downloads, decrypts,
//!   matches its manifest's length and SHA-256 and holds only what `pg_dumpall` writes (the check
//!   the restore makes before it replays one); with a [`Subset`], only that part of the dumps. Each content object's stored size must then be
//!   exactly what an age file of its file's length is: a truncation is found without a download.
//! - **Reading the data back** (`content.rs`, `--read-data` or a [`Subset`]): content objects are
//!   downloaded, decrypted and hashed against their address, with the store's concurrency.
//!
//! Each problem names the object, the snapshots that need it and, with the identity, the paths
//! that use it (`losses.rs`): what a restore of each would miss.
//!
//! [`drill`] goes further, with the identity: it replays a snapshot's dump into a throwaway server.

mod content;
pub mod drill;
mod lists;
mod losses;
pub mod subset;

use std::collections::HashMap;

use serde::Serialize;

use crate::config::LockConfig;
use crate::error::{Error, Result};
use crate::format::{ContentId, Manifest, Object};
use crate::progress::Progress;
use crate::repo::lock::{self, Lock, LockKind};
use crate::repo::trust::Trust;
use crate::repo::{snapshots, Reader, Repository};

pub use content::{read_sample, SampleRead, SMALLEST_SEALED};
pub use losses::MAX_PATHS;
pub use subset::Subset;

/// How deep to check.
#[derive(Default)]
pub struct CheckOptions {
    /// The `[lock]` config, or `None` to check without the store lock (read-only credentials; a
    /// prune running meanwhile could make objects look missing).
    pub lock: Option<LockConfig>,
    /// With the identity: the file lists, the dumps, exact sizes, and reading data back.
    pub deep: Option<Deep>,
}

/// What a check with the identity needs.
pub struct Deep {
    pub reader: Reader,
    /// Which manifests to believe (as a restore would).
    pub trust: Trust,
    /// Which content objects to read back, if any.
    pub read: Option<Subset>,
    /// Downloads in flight.
    pub concurrency: usize,
    pub progress: Progress,
}

/// What `check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub store: String,
    /// The repository's id (from its marker).
    pub repository: String,
    /// The identity was used: manifests, file lists and dumps were read.
    pub with_identity: bool,
    /// Complete snapshots checked.
    pub snapshots: u64,
    /// Snapshots whose manifest and file list decrypted and matched (with the identity).
    pub file_lists_verified: u64,
    /// Dumps downloaded and verified (with the identity).
    pub dumps_verified: u64,
    /// Distinct content objects the snapshots reference.
    pub content_referenced: u64,
    /// Content objects in the store.
    pub content_stored: u64,
    /// Bytes of the content objects in the store.
    pub content_bytes: u64,
    /// What reading the data back did (`--read-data`, `--read-data-subset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_data: Option<ReadSummary>,
    /// What would make a restore fail or miss files, by object.
    pub problems: Vec<Problem>,
    pub leftovers: Leftovers,
    /// No problems.
    pub ok: bool,
}

/// One object that is missing or damaged, and what needs it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub problem: String,
    /// The complete snapshots that need the object.
    pub snapshots: Vec<String>,
    /// For a content object, with the identity: the paths (in those snapshots) whose content it
    /// holds, up to [`losses::MAX_PATHS`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

impl Problem {
    fn new(object: String, problem: impl Into<String>, snapshots: Vec<String>) -> Problem {
        Problem {
            object,
            problem: problem.into(),
            snapshots,
            paths: Vec::new(),
        }
    }
}

/// What reading the data back did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadSummary {
    /// `all`, `5%`, `53687091200 bytes`, `3/7`.
    pub subset: String,
    /// Content objects read back, and their stored bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Of those, how many were damaged or missing.
    pub damaged: u64,
    /// Referenced objects not read: their snapshot's file list did not open (a problem already),
    /// so their length and key are not known.
    pub not_readable: u64,
    pub duration_secs: f64,
}

/// What is left over from interrupted or removed work: not errors (`prune` removes most of it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Leftovers {
    /// Snapshot folders without a manifest (interrupted backups, or forgets).
    pub incomplete_snapshots: Vec<String>,
    /// Staging folders of other runs (folder stores): the next backup adopts or removes them.
    pub staging: Vec<String>,
    /// Locks whose holder is gone, each with why.
    pub stale_locks: Vec<String>,
    /// Content objects no complete snapshot references.
    pub unreferenced_content: u64,
    pub unreferenced_bytes: u64,
    /// Objects in `data/` that are not content objects.
    pub stray_objects: Vec<String>,
}

/// One referenced content object, as the check knows it: 24 bytes beside its 32-byte address
/// (which snapshots need it is found again only for objects with a problem, [`losses`]).
#[derive(Debug, Clone, Copy)]
struct Use {
    /// The plaintext length its file list gives (with the identity), else [`UNKNOWN`].
    len: u64,
    /// Its size in the store, once listed (0 before).
    stored: u64,
    /// Its content key (index into [`Index::keys`]); meaningful when `len` is known.
    key: u16,
    /// Found in the listing of `data/`.
    present: bool,
}

const UNKNOWN: u64 = u64::MAX;

/// A content key of the store's snapshots, and the length of the age header of the objects sealed
/// for it (measured on a file list: the same recipients sealed both).
#[derive(Debug, Clone, Copy)]
struct Key {
    key: [u8; 32],
    header: Option<u64>,
}

/// What the check has learnt of the store so far.
#[derive(Default)]
struct Index {
    /// The complete snapshots, in order.
    ids: Vec<String>,
    /// With the identity: each snapshot's manifest, where it opened and was authentic.
    manifests: Vec<Option<Manifest>>,
    content: HashMap<ContentId, Use>,
    keys: Vec<Key>,
}

impl Index {
    /// Record that a snapshot references `id` (of plaintext length `len` under key `key`, when
    /// known).
    fn add(&mut self, id: ContentId, len: Option<(u64, u16)>) {
        let (len, key) = len.unwrap_or((UNKNOWN, 0));
        let u = self.content.entry(id).or_insert(Use {
            len,
            stored: 0,
            key,
            present: false,
        });
        if u.len == UNKNOWN && len != UNKNOWN {
            (u.len, u.key) = (len, key);
        }
    }

    /// The index of content key `key`, added if new.
    fn key_index(&mut self, key: [u8; 32], header: Option<u64>) -> u16 {
        if let Some(i) = self.keys.iter().position(|k| k.key == key) {
            let k = &mut self.keys[i];
            k.header = k.header.or(header);
            return i as u16;
        }
        self.keys.push(Key { key, header });
        (self.keys.len() - 1) as u16
    }
}

/// Check the store, as deep as `opts` says.
pub async fn check(repo: &Repository, opts: CheckOptions) -> Result<CheckReport> {
    let marker = snapshots::require_marker(repo).await?;
    let Some(cfg) = opts.lock.clone() else {
        tracing::warn!("--no-lock: checking without the store lock; a prune running meanwhile could make objects look missing");
        return check_locked(repo, &marker.id, &opts).await;
    };
    let work = check_locked(repo, &marker.id, &opts);
    Lock::hold(repo, LockKind::Shared, "check", &cfg, work).await
}

async fn check_locked(
    repo: &Repository,
    repository: &str,
    opts: &CheckOptions,
) -> Result<CheckReport> {
    let mut report = CheckReport {
        store: repo.url().to_string(),
        repository: repository.to_string(),
        with_identity: opts.deep.is_some(),
        ..Default::default()
    };
    let mut index = Index::default();
    snapshots_and_lists(repo, opts.deep.as_ref(), &mut report, &mut index).await?;
    report.content_referenced = index.content.len() as u64;
    let listed = content::list(repo, &mut report, &mut index).await?;
    if let Some(deep) = &opts.deep {
        lists::check_dumps(deep, &index, &mut report).await?;
        if let Some(subset) = deep.read {
            content::read_back(deep, subset, &index, &listed, &mut report).await?;
        }
    }
    // One problem can be found twice (a missing summary: by the listing, and by the manifest's
    // signature check, which reads it).
    let mut seen = std::collections::HashSet::new();
    report
        .problems
        .retain(|p| seen.insert((p.object.clone(), p.problem.clone())));
    losses::name(repo, opts.deep.as_ref(), &index, &mut report.problems).await?;
    if let Some(d) = &opts.deep {
        d.progress.finish();
    }
    leftovers(repo, &mut report, opts.lock.as_ref()).await?;
    report.ok = report.problems.is_empty();
    tracing::info!(
        snapshots = report.snapshots,
        content = report.content_stored,
        problems = report.problems.len(),
        "check done"
    );
    Ok(report)
}

/// Each complete snapshot's objects, its refs and (with the identity) its manifest and file list,
/// into `index`.
async fn snapshots_and_lists(
    repo: &Repository,
    deep: Option<&Deep>,
    report: &mut CheckReport,
    index: &mut Index,
) -> Result<()> {
    let folders = snapshots::list_folders(repo).await?;
    let trust = deep.map(|d| crate::repo::trust::legacy_aware(&d.trust, &folders));
    let mut wrong_key: Vec<(String, Error)> = Vec::new();
    if let Some(d) = deep {
        d.progress.phase("lists", None);
    }
    for (id, folder) in &folders {
        if !folder.complete {
            report.leftovers.incomplete_snapshots.push(id.clone());
            continue;
        }
        report.snapshots += 1;
        let at = index.ids.len() as u32;
        index.ids.push(id.clone());
        index.manifests.push(None);
        let size_of = |obj: &Object| {
            let key = obj.key();
            folder.objects.iter().find(|o| o.key == key).map(|o| o.size)
        };
        for obj in [Object::Summary(id.clone()), Object::Dump(id.clone())] {
            if size_of(&obj).is_none() {
                report.problems.push(missing(&obj, id));
            }
        }
        let refs = read_refs(repo, id, size_of(&Object::Refs(id.clone())), report).await?;
        let files = Object::Files(id.clone());
        let Some(files_size) = size_of(&files) else {
            report.problems.push(missing(&files, id));
            refs.iter().flatten().for_each(|c| index.add(*c, None));
            continue;
        };
        let (Some(d), Some(trust)) = (deep, &trust) else {
            refs.iter().flatten().for_each(|c| index.add(*c, None));
            continue;
        };
        match lists::snapshot(d, trust, id, files_size, refs.as_deref()).await? {
            lists::Outcome::Checked(checked) => {
                report.file_lists_verified += 1;
                lists::record(checked, at, index, &mut report.problems);
            }
            lists::Outcome::Problem(p) => {
                report.problems.push(p);
                refs.iter().flatten().for_each(|c| index.add(*c, None));
            }
            lists::Outcome::WrongKey(e) => {
                wrong_key.push((id.clone(), e));
                refs.iter().flatten().for_each(|c| index.add(*c, None));
            }
        }
    }
    lists::wrong_key_verdict(wrong_key, index, report)
}

/// The snapshot's `refs.txt.gz`, as a list of addresses; `None` (and a problem) when it is missing
/// or damaged.
async fn read_refs(
    repo: &Repository,
    id: &str,
    size: Option<u64>,
    report: &mut CheckReport,
) -> Result<Option<Vec<ContentId>>> {
    let refs = Object::Refs(id.to_string());
    if size.is_none() {
        report.problems.push(Problem::new(
            refs.key(),
            "missing from the store: prune cannot tell which content this snapshot needs (a prune would delete it); the next backup references that content again",
            vec![id.to_string()],
        ));
        return Ok(None);
    }
    let mut ids = Vec::new();
    let why = match snapshots::read_refs(repo, id, |c| ids.push(c)).await {
        Ok(()) => return Ok(Some(ids)),
        Err(Error::Missing { .. }) => "missing from the store".to_string(),
        Err(Error::Corrupt { message, .. }) => format!("damaged ({message})"),
        Err(e) => return Err(e),
    };
    report.problems.push(Problem::new(
        refs.key(),
        format!("{why}: the content this snapshot needs is not known to prune"),
        vec![id.to_string()],
    ));
    Ok(None)
}

fn missing(obj: &Object, id: &str) -> Problem {
    Problem::new(obj.key(), "missing from the store", vec![id.to_string()])
}

/// Staging folders and stale locks.
async fn leftovers(
    repo: &Repository,
    report: &mut CheckReport,
    lock_cfg: Option<&LockConfig>,
) -> Result<()> {
    report.leftovers.staging = repo
        .other_staging()
        .await?
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    let stale = lock_cfg.cloned().unwrap_or_default().stale();
    report.leftovers.stale_locks = lock::list(repo, stale)
        .await?
        .into_iter()
        .filter_map(|l| {
            l.stale
                .clone()
                .map(|why| format!("{}: {why}", l.describe()))
        })
        .collect();
    Ok(())
}
