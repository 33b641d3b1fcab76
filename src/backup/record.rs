//! The backup machine's record of the content a store across a network holds, so that a backup
//! need not list all of `data/` (a request per thousand objects, each a round trip) when nothing
//! can have removed any of it.
//!
//! The record is what the last backup knew to be stored, with the prune marks (`prunes/`) that
//! existed when the store was last listed. Only a prune deletes content, and it leaves a mark
//! first; so while the marks are the same, everything recorded is still there. A new mark, a
//! record older than [`KNOWN_MAX_AGE_DAYS`], or no record at all: the backup lists the store.
//! Objects deleted behind the tool's back (by hand, by a lifecycle rule) are what `check` finds.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::format::ContentId;
use crate::repo::{Repository, KNOWN_MAX_AGE_DAYS};

/// When the store was last listed, and the prune marks there were then.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Basis {
    listed_at: DateTime<Utc>,
    marks: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    #[serde(flatten)]
    basis: Basis,
    count: usize,
}

/// The record beside the metadata cache file `cache_path`.
pub(crate) fn path_beside(cache_path: &Path) -> PathBuf {
    let name = cache_path
        .file_name()
        .map(|n| n.to_string_lossy().replace("files-", "content-"))
        .unwrap_or_default();
    cache_path.with_file_name(name.replace(".jsonl", ".bin"))
}

/// The content recorded, if the record is still true of a store whose prune marks are `now`
/// (`basis.marks` of [`Basis::now`]): its basis, and the ids.
pub(crate) fn load(path: &Path, now: &Basis) -> Option<(Basis, Vec<ContentId>)> {
    let (basis, ids) = read(path)?;
    let age = now.listed_at.signed_duration_since(basis.listed_at);
    if age > chrono::Duration::days(KNOWN_MAX_AGE_DAYS) || age < chrono::Duration::zero() {
        return None;
    }
    if now.marks.iter().any(|m| !basis.marks.contains(m)) {
        tracing::debug!("a prune ran since the store was last listed: listing it again");
        return None;
    }
    Some((basis, ids))
}

impl Basis {
    /// The basis of a listing that starts now: the time, and the store's prune marks.
    pub(crate) async fn now(repo: &Repository) -> crate::error::Result<Basis> {
        Ok(Basis {
            listed_at: Utc::now(),
            marks: repo.prune_marks().await?,
        })
    }
}

fn read(path: &Path) -> Option<(Basis, Vec<ContentId>)> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path).ok()?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut f, &mut line).ok()?;
    let header: Header = serde_json::from_str(&line).ok()?;
    let mut ids = Vec::with_capacity(header.count);
    let mut buf = [0u8; 32];
    for _ in 0..header.count {
        f.read_exact(&mut buf).ok()?;
        ids.push(ContentId(buf));
    }
    // Nothing after the ids: a record cut short or grown is not trusted.
    (f.read(&mut [0u8; 1]).ok()? == 0).then_some((header.basis, ids))
}

/// Write the record (under a temporary name, then renamed into place). A failure only costs the
/// next backup a listing, so it is a warning.
pub(crate) fn save(path: &Path, basis: &Basis, ids: &[ContentId]) {
    let tmp = path.with_extension("bin.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let header = Header {
            basis: basis.clone(),
            count: ids.len(),
        };
        serde_json::to_writer(&mut f, &header)?;
        f.write_all(b"\n")?;
        for id in ids {
            f.write_all(&id.0)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(file = %path.display(), error = %e, "cannot record the stored content; the next backup lists the store");
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_damaged_one_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("content-x.bin");
        let basis = Basis {
            listed_at: Utc::now(),
            marks: vec!["20261205T000000Z-00000000.json".into()],
        };
        let ids = vec![ContentId([1; 32]), ContentId([2; 32])];
        save(&path, &basis, &ids);
        let (b, back) = read(&path).unwrap();
        assert_eq!(back, ids);
        assert_eq!(b.marks, basis.marks);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        assert!(read(&path).is_none());
        bytes.extend_from_slice(&[0, 0]);
        std::fs::write(&path, &bytes).unwrap();
        assert!(read(&path).is_none());
        assert_eq!(
            path_beside(Path::new("/c/r/files-abc.jsonl")),
            Path::new("/c/r/content-abc.bin")
        );
    }
}
