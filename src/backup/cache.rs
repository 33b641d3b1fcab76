//! The local metadata cache of the last backup: one line per file (path, size, times, inode,
//! content address), written in walk order, so this backup merge-joins it against the walk in
//! constant memory; a file whose metadata match is not read again.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backup::walk::Found;
use crate::error::{IoContext, Result};
use crate::format::{walk_order, ContentId};

/// One line of the local metadata cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CacheLine {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub content: ContentId,
}

/// Reads the previous backup's cache in walk order; a missing or damaged cache just means misses.
pub(crate) struct CacheReader {
    lines: Option<std::io::Lines<BufReader<File>>>,
    next: Option<CacheLine>,
}

impl CacheReader {
    pub fn open(path: &Path) -> CacheReader {
        let lines = File::open(path).ok().map(|f| BufReader::new(f).lines());
        let mut r = CacheReader { lines, next: None };
        r.advance();
        r
    }

    fn advance(&mut self) {
        self.next = None;
        if let Some(lines) = &mut self.lines {
            match lines.next() {
                Some(Ok(l)) => match serde_json::from_str(&l) {
                    Ok(c) => self.next = Some(c),
                    Err(_) => self.lines = None,
                },
                _ => self.lines = None,
            }
        }
    }

    /// The cached line for `found`, if its metadata still matches.
    pub(crate) fn lookup(&mut self, found: &Found) -> Option<ContentId> {
        while let Some(c) = &self.next {
            match walk_order(&c.path, &found.entry.path) {
                Ordering::Less => self.advance(),
                Ordering::Equal => {
                    let hit = (c.size, c.mtime_ns, c.ctime_ns, c.ino) == found.metadata();
                    let id = c.content;
                    self.advance();
                    return hit.then_some(id);
                }
                Ordering::Greater => return None,
            }
        }
        None
    }
}

/// Writes the new cache next to the old one; it replaces the old one only when the snapshot is done.
pub(crate) struct CacheWriter {
    tmp: PathBuf,
    dest: PathBuf,
    out: BufWriter<File>,
}

impl CacheWriter {
    pub fn create(dest: &Path) -> Result<CacheWriter> {
        let dir = dest.parent().expect("cache file has a folder");
        std::fs::create_dir_all(dir).at(dir)?;
        remove_stale_temps(dest);
        let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
        let out = BufWriter::new(File::create(&tmp).at(&tmp)?);
        Ok(CacheWriter {
            tmp,
            dest: dest.to_path_buf(),
            out,
        })
    }

    /// Remember `found`'s content for the next backup, unless it changed too recently for its
    /// metadata to prove it unchanged next time ([`Found::settled`]).
    pub fn add(&mut self, found: &Found, content: ContentId) -> Result<()> {
        if !found.settled() {
            return Ok(());
        }
        let line = CacheLine {
            path: found.entry.path.clone(),
            size: found.entry.size,
            mtime_ns: found.entry.mtime_ns,
            ctime_ns: found.ctime_ns,
            ino: found.ino,
            content,
        };
        serde_json::to_writer(&mut self.out, &line)
            .map_err(io::Error::other)
            .at(&self.tmp)?;
        self.out.write_all(b"\n").at(&self.tmp)
    }

    /// Make this the cache the next backup reads.
    pub fn commit(self) -> Result<()> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .at(&self.tmp)?;
        file.sync_all().at(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.dest).at(&self.dest)
    }

    /// Drop the new cache (the backup failed).
    pub(crate) fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Remove the temporary caches that killed runs left beside `dest` (`<name>.tmp<pid>` of a process
/// that no longer runs).
fn remove_stale_temps(dest: &Path) {
    let (Some(dir), Some(stem)) = (dest.parent(), dest.file_stem().and_then(|s| s.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(stem))
            .and_then(|r| r.strip_prefix(".tmp"))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where the cache for this store, content key and source lives.
pub(crate) fn cache_file(
    cache_dir: &Path,
    repo_id: &str,
    key: &[u8; 32],
    upload_location: &Path,
) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(upload_location.as_os_str().as_encoded_bytes());
    let tag = &h.finalize().to_hex()[..16];
    cache_dir.join(repo_id).join(format!("files-{tag}.jsonl"))
}
