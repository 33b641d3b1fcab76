//! `dump SNAPSHOT PATH`: one file of a snapshot to stdout; `dump SNAPSHOT --database`: the plain SQL
//! of its database dump.
//!
//! Nothing unverified is left behind. A file's content is checked against its keyed BLAKE3 address
//! (the check a restore makes) while it is read, and where it goes decides when it is written:
//!
//! - stdout redirected to a regular file (`> photo.jpg`, [`Output::File`]): written as it is read;
//!   when the content turns out damaged the file is cut back to the length it had before (empty
//!   after `>`, as it was after `>>`), and the error names the file and its object (exit 13);
//! - anything else, a pipe ([`Output::Stream`]): not one byte is written before the whole file
//!   has verified: up to [`BUFFER`] bytes (the CLI's choice) are held in memory, a bigger file is first decrypted into
//!   an unnamed temporary file in `$TMPDIR` (which needs room for it).
//!
//! The database is checked whole first, exactly as a restore checks it before replaying it
//! (`restore::database::verify_dump`: the manifest's SHA-256 and size, and every line one
//! `pg_dumpall` would write), then read again and written out gunzipped. The second read is pinned to
//! the same object by its age header MAC and authenticated chunk by chunk, and its SHA-256 is
//! checked again at the end; a regular file is cut back if that ever fails.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use flate2::read::GzDecoder;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{Entry, EntryKind, Manifest, Object};
use crate::repo::{read_error, Reader};
use crate::restore::database::{verify_dump, HashingReader};
use crate::restore::files::scan_list;
use crate::restore::parse_key;

/// The largest file a pipe gets from memory (the CLI's choice); bigger ones go through a
/// temporary file.
pub const BUFFER: u64 = 64 << 20;

/// Where dumped bytes go.
pub enum Output {
    /// A regular file (stdout redirected with `>` or `>>`): written as read, cut back to its
    /// earlier length on failure.
    File(std::fs::File),
    /// Anything else: written only once verified, from memory for files up to `buffer` bytes,
    /// through an unnamed temporary file in `$TMPDIR` for bigger ones.
    Stream {
        to: Box<dyn Write + Send>,
        buffer: u64,
    },
}

/// What was dumped.
#[derive(Debug, Clone, Serialize)]
pub struct Dumped {
    pub path: String,
    pub bytes: u64,
}

/// A regular file being written, and where it started.
struct Cut {
    file: std::fs::File,
    start: u64,
}

impl Cut {
    /// Writing to `file` from its current end (`O_APPEND`) or position.
    fn new(mut file: std::fs::File) -> io::Result<Cut> {
        let append = rustix::fs::fcntl_getfl(file.as_fd())
            .map(|f| f.contains(rustix::fs::OFlags::APPEND))
            .unwrap_or(false);
        let start = if append {
            file.metadata()?.len()
        } else {
            file.stream_position()?
        };
        Ok(Cut { file, start })
    }

    /// Remove everything written since [`Cut::new`].
    fn undo(&mut self) {
        if let Err(e) = self
            .file
            .set_len(self.start)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.start)).map(drop))
        {
            tracing::warn!("could not cut the output file back after the failure: {e}; delete it");
        }
    }
}

fn stdout_error(e: io::Error) -> Error {
    Error::io("stdout", e)
}

/// Name the file whose object could not be read, in an error about the object.
fn naming(path: &str, e: Error) -> Error {
    match e {
        Error::Corrupt { object, message } if !message.contains(path) => Error::Corrupt {
            object,
            message: format!("{message} (it holds {path})"),
        },
        Error::Missing { object, hint } => Error::Missing {
            object,
            hint: format!("{hint} (it holds {path})"),
        },
        e => e,
    }
}

/// The entry at `path` in `manifest`'s file list (read to its end, so the list is verified).
async fn entry(reader: &Reader, manifest: &Manifest, path: &str) -> Result<Entry> {
    let wanted = path.trim_matches('/').to_string();
    let found = scan_list(reader, manifest, None, None, move |found, e| {
        if e.path == wanted {
            *found = Some(e);
        }
        Ok(())
    })
    .await?;
    let id = &manifest.id;
    match found {
        None => Err(Error::Usage(format!(
            "snapshot {id} has no file {path:?}; find it with `immich-backup find '*name*'` or `immich-backup ls {id} FOLDER` (paths are relative to UPLOAD_LOCATION, as `library/admin/2024/IMG_0001.jpg`)"
        ))),
        Some(e) if e.kind == EntryKind::Dir => Err(Error::Usage(format!(
            "{path} is a folder in snapshot {id}; dump writes one file (list the folder with `immich-backup ls {id} {path}`)"
        ))),
        Some(e) if e.kind == EntryKind::Symlink => Err(Error::Usage(format!(
            "{path} is a symlink to {} in snapshot {id}; dump the file it points to",
            e.target.as_deref().unwrap_or("?")
        ))),
        Some(e) => Ok(e),
    }
}

/// Write snapshot `manifest`'s file `path` to `out`, verified (see the module's documentation).
pub async fn file(reader: &Reader, manifest: &Manifest, path: &str, out: Output) -> Result<Dumped> {
    let e = entry(reader, manifest, path).await?;
    let key = parse_key(manifest)?;
    let id = e.content.ok_or_else(|| Error::Corrupt {
        object: manifest.files.key.clone(),
        message: format!("{} has no content address", e.path),
    })?;
    let fetched = reader
        .fetch_content(&id)
        .await
        .map_err(|err| naming(&e.path, err))?;
    let shown = e.path.clone();
    tokio::task::spawn_blocking(move || {
        let plain = fetched.open().map_err(|err| naming(&e.path, err))?;
        let written = (|| match out {
            Output::File(f) => {
                let mut cut = Cut::new(f).map_err(stdout_error)?;
                let r = plain
                    .copy_content(&key, &id, e.size, &e.path, |chunk| {
                        cut.file.write_all(chunk).map_err(stdout_error)
                    })
                    .and_then(|()| cut.file.flush().map_err(stdout_error));
                if r.is_err() {
                    cut.undo();
                }
                r
            }
            Output::Stream { to: mut w, buffer } if e.size <= buffer => {
                let mut held = Vec::with_capacity(e.size as usize);
                plain.copy_content(&key, &id, e.size, &e.path, |chunk| {
                    held.extend_from_slice(chunk);
                    Ok(())
                })?;
                w.write_all(&held)
                    .and_then(|()| w.flush())
                    .map_err(stdout_error)
            }
            Output::Stream { to: mut w, .. } => {
                let tmp_err = |err| Error::io(std::env::temp_dir(), err);
                let mut tmp = tempfile::tempfile().map_err(tmp_err)?;
                plain.copy_content(&key, &id, e.size, &e.path, |chunk| {
                    tmp.write_all(chunk).map_err(tmp_err)
                })?;
                tmp.seek(SeekFrom::Start(0)).map_err(tmp_err)?;
                io::copy(&mut tmp, &mut w)
                    .and_then(|_| w.flush())
                    .map_err(stdout_error)
            }
        })();
        written
            .map(|()| Dumped {
                path: e.path.clone(),
                bytes: e.size,
            })
            .map_err(|err| naming(&e.path, err))
    })
    .await
    .map_err(|err| Error::Other(format!("dump of {shown}: {err}")))?
}

/// Write snapshot `manifest`'s database dump to `out` as plain SQL, verified first (see the
/// module's documentation); returns the SQL's length.
pub async fn database(reader: &Reader, manifest: &Manifest, out: Output) -> Result<u64> {
    verify_dump(reader, manifest).await?;
    let dump = reader
        .fetch(&Object::Dump(manifest.id.clone()), &manifest.dump)
        .await?;
    let want = manifest.dump.clone();
    tokio::task::spawn_blocking(move || {
        let (mut w, mut cut): (Box<dyn Write>, Option<Cut>) = match out {
            Output::File(f) => {
                let cut = Cut::new(f.try_clone().map_err(stdout_error)?).map_err(stdout_error)?;
                (Box::new(f), Some(cut))
            }
            Output::Stream { to, .. } => (to, None),
        };
        let r = (|| {
            let mut hashed = HashingReader::new(dump.open()?);
            let sql = copy_sql(GzDecoder::new(&mut hashed), &mut w, &want.key)?;
            let note = if cut.is_none() {
                " when read a second time (what stdout received is not the dump: discard it)"
            } else {
                " when read a second time"
            };
            hashed.drain_and_check(&want, note)?;
            Ok(sql)
        })();
        if let (Err(_), Some(cut)) = (&r, cut.as_mut()) {
            cut.undo();
        }
        r
    })
    .await
    .map_err(|e| Error::Other(format!("database dump: {e}")))?
}

/// Copy the gunzipped SQL to `w`; returns its length.
fn copy_sql(mut sql: impl Read, w: &mut dyn Write, key: &str) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let got = sql.read(&mut buf).map_err(|e| read_error(key, e))?;
        if got == 0 {
            break;
        }
        w.write_all(&buf[..got]).map_err(stdout_error)?;
        n += got as u64;
    }
    w.flush().map_err(stdout_error)?;
    Ok(n)
}
