//! What `check` reads with the identity, snapshot by snapshot: the manifest (decrypted and
//! authentic, as a restore would believe it), the file list (decrypted, its SHA-256 the
//! manifest's, every path one a restore would write), its addresses against `refs.txt.gz` (which
//! prune trusts, so a wrong one deletes content a snapshot needs), and the dump (downloaded,
//! decrypted, its length and SHA-256 the manifest's, and only what `pg_dumpall` writes: the check a
//! restore makes before it replays it).

use futures::StreamExt;

use super::subset::{self, Subset};
use super::{CheckReport, Deep, Index, Problem};
use crate::error::{Error, Result};
use crate::format::{ContentId, EntryKind, Manifest, Object};
use crate::repo::trust::{self, Trust};
use crate::restore;

/// A snapshot whose manifest and file list opened and matched.
pub(super) struct Checked {
    manifest: Manifest,
    key: [u8; 32],
    /// Length of the age header of the snapshot's objects.
    header: Option<u64>,
    /// `(address, length)` of each file, in list order.
    entries: Vec<(ContentId, u64)>,
    /// The refs object does not match the file list.
    refs_problem: Option<Problem>,
}

pub(super) enum Outcome {
    Checked(Box<Checked>),
    Problem(Problem),
    /// The identity does not open this snapshot's manifest.
    WrongKey(Error),
}

/// A problem of `obj` in snapshot `id` when `e` is one a damaged or missing object gives;
/// anything else (the store unreachable) stops the check.
fn damage(obj: &Object, id: &str, e: Error) -> Result<Problem> {
    let mut object = obj.key();
    let why = match e {
        // The object the error names: opening a manifest reads the summary too.
        Error::Missing { object: o, .. } => {
            object = o;
            "missing from the store".to_string()
        }
        Error::Corrupt { object: o, message } => {
            object = o;
            format!("damaged: {message}")
        }
        Error::Unauthentic { message, .. } => {
            format!("not authentic ({message}): a restore refuses this snapshot")
        }
        Error::WrongKey { message, .. } => format!("does not decrypt ({message})"),
        e => return Err(e),
    };
    Ok(Problem::new(object, why, vec![id.to_string()]))
}

/// Open snapshot `id`'s manifest and read its file list (stored as `files_size` bytes), comparing
/// its addresses with `refs`.
pub(super) async fn snapshot(
    d: &Deep,
    trust: &Trust,
    id: &str,
    files_size: u64,
    refs: Option<&[ContentId]>,
) -> Result<Outcome> {
    let manifest = match trust::open(&d.reader, trust, id).await {
        Ok(opened) => opened.manifest,
        Err(e @ Error::WrongKey { .. }) => return Ok(Outcome::WrongKey(e)),
        Err(e) => {
            let obj = Object::Manifest(id.to_string());
            return damage(&obj, id, e).map(Outcome::Problem);
        }
    };
    let key = match restore::parse_key(&manifest) {
        Ok(k) => k,
        Err(e) => return damage(&Object::Manifest(id.to_string()), id, e).map(Outcome::Problem),
    };
    let files = Object::Files(id.to_string());
    let list_key = files.key();
    d.progress.message(format!("file list of {id}"));
    let scanned = restore::files::scan_list(&d.reader, &manifest, None, Vec::new(), move |v, e| {
        if e.kind != EntryKind::File {
            return Ok(());
        }
        let Some(c) = e.content else {
            return Err(Error::Corrupt {
                object: list_key.clone(),
                message: format!("{} has no content address", e.path),
            });
        };
        v.push((c, e.size));
        Ok(())
    })
    .await;
    let entries = match scanned {
        Ok(v) => v,
        Err(e) => return damage(&files, id, e).map(Outcome::Problem),
    };
    let refs_problem = refs.and_then(|r| compare_refs(&entries, r)).map(|why| {
        Problem::new(
            Object::Refs(id.to_string()).key(),
            why,
            vec![id.to_string()],
        )
    });
    Ok(Outcome::Checked(Box::new(Checked {
        header: restore::files::header_len(&manifest, files_size),
        manifest,
        key,
        entries,
        refs_problem,
    })))
}

/// Add what a checked snapshot (at `at`) told to the index.
pub(super) fn record(
    checked: Box<Checked>,
    at: u32,
    index: &mut Index,
    problems: &mut Vec<Problem>,
) {
    let Checked {
        manifest,
        key,
        header,
        entries,
        refs_problem,
    } = *checked;
    let k = index.key_index(key, header);
    for (c, len) in entries {
        index.add(c, Some((len, k)));
    }
    index.manifests[at as usize] = Some(manifest);
    problems.extend(refs_problem);
}

/// Why `refs` (what prune keeps) differs from the addresses of the file list, if it does.
fn compare_refs(entries: &[(ContentId, u64)], refs: &[ContentId]) -> Option<String> {
    // The backup writes refs in list order, each run of one address once.
    let mut listed: Vec<ContentId> = entries.iter().map(|(c, _)| *c).collect();
    listed.dedup();
    if listed == refs {
        return None;
    }
    listed.sort_unstable();
    listed.dedup();
    let mut kept: Vec<ContentId> = refs.to_vec();
    kept.sort_unstable();
    kept.dedup();
    let unknown = listed
        .iter()
        .filter(|c| kept.binary_search(c).is_err())
        .count();
    let extra = kept
        .iter()
        .filter(|c| listed.binary_search(c).is_err())
        .count();
    match (unknown, extra) {
        (0, 0) => None,
        (0, extra) => Some(format!(
            "names {extra} content address(es) the file list does not use: it was damaged or edited (prune keeps that content needlessly)"
        )),
        (unknown, _) => Some(format!(
            "lacks {unknown} content address(es) of the file list: a prune would delete content this snapshot needs; it was damaged or edited"
        )),
    }
}

/// Snapshots the identity did not open: when it opened none, it is the wrong identity (exit 12);
/// otherwise those snapshots were encrypted to other recipients, a problem each.
pub(super) fn wrong_key_verdict(
    wrong: Vec<(String, Error)>,
    index: &Index,
    report: &mut CheckReport,
) -> Result<()> {
    let opened = index.manifests.iter().any(Option::is_some);
    let mut wrong = wrong.into_iter();
    if !opened {
        if let Some((_, e)) = wrong.next() {
            return Err(e);
        }
    }
    for (id, _) in wrong {
        report.problems.push(Problem::new(
            Object::Manifest(id.clone()).key(),
            "does not decrypt with this identity: the snapshot was encrypted to other recipients, and only their identity restores it",
            vec![id],
        ));
    }
    Ok(())
}

/// Download and verify the dump of every snapshot whose manifest opened, several at once.
pub(super) async fn check_dumps(d: &Deep, index: &Index, report: &mut CheckReport) -> Result<()> {
    let known_missing: Vec<String> = report.problems.iter().map(|p| p.object.clone()).collect();
    let manifests: Vec<&Manifest> = index
        .manifests
        .iter()
        .flatten()
        .filter(|m| !known_missing.contains(&m.dump.key))
        .collect();
    let manifests = dumps_to_read(d.read, manifests);
    let total = manifests.iter().map(|m| m.dump.size).sum();
    d.progress.phase("dumps", Some(total));
    let checks = futures::stream::iter(manifests)
        .map(|m| async move {
            let r = restore::database::verify_dump(&d.reader, m).await;
            d.progress.inc(m.dump.size);
            (m, r)
        })
        .buffer_unordered(d.concurrency.clamp(1, 4));
    let mut checks = std::pin::pin!(checks);
    while let Some((m, r)) = checks.next().await {
        match r {
            Ok(_) => report.dumps_verified += 1,
            Err(e) => report
                .problems
                .push(damage(&Object::Dump(m.id.clone()), &m.id, e)?),
        }
    }
    Ok(())
}

/// The dumps a check reads: all of them, or with a subset, the part of them that subset takes (a
/// dump stands for its snapshot like an address: `n/m` slices partition the dumps too, so that m
/// scheduled runs read every dump once instead of every dump every run).
fn dumps_to_read(read: Option<Subset>, manifests: Vec<&Manifest>) -> Vec<&Manifest> {
    let which = match read {
        None | Some(Subset::All) => return manifests,
        Some(s) => s,
    };
    let stand_in = |m: &Manifest| ContentId(*blake3::hash(m.dump.key.as_bytes()).as_bytes());
    let chosen: Vec<ContentId> = subset::select(
        which,
        manifests
            .iter()
            .map(|m| (stand_in(m), m.dump.size))
            .collect(),
    )
    .into_iter()
    .map(|(c, _)| c)
    .collect();
    manifests
        .into_iter()
        .filter(|m| chosen.contains(&stand_in(m)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ContentId {
        ContentId([n; 32])
    }

    #[test]
    fn refs_that_lack_an_address_are_told_apart_from_refs_with_extra_ones() {
        let entries: Vec<(ContentId, u64)> = [1, 1, 2, 3, 2].iter().map(|n| (id(*n), 10)).collect();
        assert_eq!(compare_refs(&entries, &[id(1), id(2), id(3), id(2)]), None);
        // Another order, the same set: what prune needs is there.
        assert_eq!(compare_refs(&entries, &[id(3), id(2), id(1)]), None);
        let lacking = compare_refs(&entries, &[id(1), id(2)]).unwrap();
        assert!(
            lacking.contains("lacks 1") && lacking.contains("prune would delete"),
            "{lacking}"
        );
        let extra = compare_refs(&entries, &[id(1), id(2), id(3), id(9)]).unwrap();
        assert!(extra.contains("names 1"), "{extra}");
    }
}
