//! The content objects: one listing of `data/` (is each referenced object there, with a size its
//! file can have?), then, when asked, reading a subset back (downloaded, decrypted, hashed against
//! its keyed address, its length the file list's).
//!
//! Without the identity a size is only checked against the smallest age file; with it, against the
//! exact size an age file of the file's length has (its header measured on the snapshot's file
//! list), so any truncation or extension is found from the listing alone.

use std::collections::{HashMap, HashSet};

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::Serialize;

use super::subset::{self, Subset};
use super::{CheckReport, Deep, Index, Problem, ReadSummary, UNKNOWN};
use crate::error::{Error, Result};
use crate::format::{ContentId, EntryKind, Manifest, Object};
use crate::progress::Progress;
use crate::repo::{sealed_payload_len, Fetched, Reader, Repository};

/// The smallest stored size a content object can have: an age header with one X25519 stanza, the
/// payload nonce and one (empty) chunk's tag. Anything smaller cannot decrypt.
pub const SMALLEST_SEALED: u64 = 150;

/// One listing of `data/`: referenced objects are marked present (with their size), sizes their
/// files cannot have are problems, the rest is counted; then what is referenced and was not found.
/// Returns the addresses found damaged.
pub(super) async fn list(
    repo: &Repository,
    report: &mut CheckReport,
    index: &mut Index,
) -> Result<HashSet<ContentId>> {
    let smallest = SMALLEST_SEALED.max(sealed_payload_len(0));
    let mut damaged = HashSet::new();
    let mut listing = std::pin::pin!(repo.data_objects());
    while let Some(item) = listing.next().await {
        let (object, id) = item?;
        let Some(id) = id else {
            report.leftovers.stray_objects.push(object.key);
            continue;
        };
        report.content_stored += 1;
        report.content_bytes += object.size;
        let Some(u) = index.content.get_mut(&id) else {
            report.leftovers.unreferenced_content += 1;
            report.leftovers.unreferenced_bytes += object.size;
            continue;
        };
        (u.present, u.stored) = (true, object.size);
        let header = (u.len != UNKNOWN)
            .then(|| index.keys[u.key as usize].header)
            .flatten();
        let why = match header {
            Some(h) if object.size != h + sealed_payload_len(u.len) => format!(
                "{} bytes, but an age file of its {}-byte file is {}: truncated or damaged",
                object.size,
                u.len,
                h + sealed_payload_len(u.len)
            ),
            None if object.size < smallest => format!(
                "{} bytes: smaller than any age file ({smallest} bytes at least), so truncated",
                object.size
            ),
            _ => continue,
        };
        damaged.insert(id);
        report.problems.push(content_problem(&id, why));
    }
    let mut lost: Vec<ContentId> = index
        .content
        .iter()
        .filter(|(_, u)| !u.present)
        .map(|(c, _)| *c)
        .collect();
    lost.sort_unstable();
    for c in lost {
        damaged.insert(c);
        report
            .problems
            .push(content_problem(&c, "missing from the store".into()));
    }
    Ok(damaged)
}

/// A problem of content object `id`; [`super::losses`] fills in who needs it.
fn content_problem(id: &ContentId, why: String) -> Problem {
    Problem::new(Object::Content(*id).key(), why, Vec::new())
}

/// Read `subset` of the content objects back (those found damaged already excepted, and those
/// whose file list did not open, whose length is not known).
pub(super) async fn read_back(
    d: &Deep,
    which: Subset,
    index: &Index,
    damaged: &HashSet<ContentId>,
    report: &mut CheckReport,
) -> Result<()> {
    let started = Instant::now();
    let mut candidates: Vec<(ContentId, u64)> = index
        .content
        .iter()
        .filter(|(c, u)| u.present && !damaged.contains(c))
        .map(|(c, u)| (*c, u.stored))
        .collect();
    let known = |c: &ContentId| index.content[c].len != UNKNOWN;
    let before = candidates.len();
    candidates.retain(|(c, _)| known(c));
    let not_readable = (before - candidates.len()) as u64;
    candidates.sort_unstable();
    let chosen = subset::select(which, candidates);
    let mut summary = ReadSummary {
        subset: which.to_string(),
        objects: chosen.len() as u64,
        bytes: chosen.iter().map(|(_, s)| s).sum(),
        not_readable,
        ..Default::default()
    };
    let items: Vec<(ContentId, u64, [u8; 32])> = chosen
        .iter()
        .map(|(c, _)| {
            let u = index.content[c];
            (*c, u.len, index.keys[u.key as usize].key)
        })
        .collect();
    tracing::info!(subset = %which, objects = summary.objects, bytes = summary.bytes, "reading content back");
    for (id, why) in read_objects(&d.reader, d.concurrency, &d.progress, items).await? {
        summary.damaged += 1;
        report.problems.push(content_problem(&id, why));
    }
    d.progress.finish();
    summary.duration_secs = started.elapsed().as_secs_f64();
    report.read_data = Some(summary);
    Ok(())
}

/// Read `items` (address, plaintext length, content key) back, `concurrency` at once, with a
/// progress phase; returns the damaged or missing ones, each with why. Other errors (the store
/// unreachable) stop it.
async fn read_objects(
    reader: &Reader,
    concurrency: usize,
    progress: &Progress,
    items: Vec<(ContentId, u64, [u8; 32])>,
) -> Result<Vec<(ContentId, String)>> {
    progress.phase("reading", Some(items.iter().map(|(_, len, _)| len).sum()));
    let reads = futures::stream::iter(items)
        .map(|(id, len, key)| async move {
            let progress = progress.clone();
            let read = async {
                let fetched = reader.fetch_content(&id).await?;
                tokio::task::spawn_blocking(move || verify(fetched, &key, &id, len, &progress))
                    .await
                    .map_err(|e| Error::Other(format!("read-data worker: {e}")))?
            };
            (id, read.await)
        })
        .buffer_unordered(concurrency.max(1));
    let mut reads = std::pin::pin!(reads);
    let mut damaged = Vec::new();
    while let Some((id, r)) = reads.next().await {
        let why = match r {
            Ok(()) => continue,
            Err(Error::Missing { .. }) => "missing from the store".to_string(),
            Err(Error::Corrupt { message, .. } | Error::WrongKey { message, .. }) => {
                format!("read back, it is damaged: {message}")
            }
            Err(e) => return Err(e),
        };
        damaged.push((id, why));
    }
    progress.finish();
    Ok(damaged)
}

/// What reading a sample of one snapshot's files back found ([`read_sample`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SampleRead {
    /// Distinct content objects read, and their files' bytes.
    pub objects: u64,
    pub bytes: u64,
    /// `(path, object, why)` of each file whose object is damaged or missing.
    pub damaged: Vec<(String, String, String)>,
}

/// Read `which` of snapshot `m`'s files back (its file list opened with `reader`), as a restore
/// would read them: what a drill samples.
pub async fn read_sample(
    reader: &Reader,
    m: &Manifest,
    which: Subset,
    concurrency: usize,
    progress: &Progress,
) -> Result<SampleRead> {
    let key = crate::restore::parse_key(m)?;
    let mut files = crate::restore::files::scan_list(reader, m, None, Vec::new(), |v, e| {
        if let (EntryKind::File, Some(c)) = (e.kind, e.content) {
            v.push((c, e.size));
        }
        Ok(())
    })
    .await?;
    files.sort_unstable();
    files.dedup_by_key(|(c, _)| *c);
    let chosen = subset::select(which, files);
    let mut read = SampleRead {
        objects: chosen.len() as u64,
        bytes: chosen.iter().map(|(_, len)| len).sum(),
        ..Default::default()
    };
    let items = chosen.into_iter().map(|(c, len)| (c, len, key)).collect();
    let damaged: HashMap<ContentId, String> = read_objects(reader, concurrency, progress, items)
        .await?
        .into_iter()
        .collect();
    if damaged.is_empty() {
        return Ok(read);
    }
    let wanted = Arc::new(damaged.keys().copied().collect::<HashSet<ContentId>>());
    let paths = crate::restore::files::scan_list(reader, m, None, Vec::new(), move |v, e| {
        if let Some(c) = e.content.filter(|c| wanted.contains(c)) {
            v.push((e.path, c));
        }
        Ok(())
    })
    .await?;
    read.damaged = paths
        .into_iter()
        .map(|(path, c)| (path, c.key(), damaged[&c].clone()))
        .collect();
    Ok(read)
}

/// Decrypt one content object and check it is the `len` bytes its address `id` names.
fn verify(
    fetched: Fetched,
    key: &[u8; 32],
    id: &ContentId,
    len: u64,
    progress: &Progress,
) -> Result<()> {
    fetched.open()?.copy_content(key, id, len, "", |chunk| {
        progress.inc(chunk.len() as u64);
        Ok(())
    })
}
