//! Storing one file: read it (once, into memory, when small), hash it into its content address and,
//! unless the store has that content, seal it into a new content object. Runs on blocking threads,
//! several files at a time.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use crate::backup::dedupe::{Claim, Known};
use crate::backup::walk::Found;
use crate::error::{Error, Result};
use crate::format::{ContentId, Object, DATA_DIR};
use crate::repo::{SealedWriter, Writer};

/// Files up to this size are read once into memory; larger ones are hashed, then streamed.
pub(crate) const SMALL_FILE: u64 = 4 * 1024 * 1024;
/// Read size for large files.
const READ_BUFFER: usize = 256 * 1024;

/// Buffers for small files, reused: a fresh allocation per file would fault in (and zero) new
/// pages every time, which cost more than the encryption. At most one per worker is kept.
#[derive(Default)]
pub struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_default()
    }

    fn give(&self, buf: Vec<u8>) {
        let mut kept = self.0.lock().expect("not poisoned");
        if kept.len() < MAX_KEPT_BUFFERS {
            kept.push(buf);
        }
    }
}

/// Small-file buffers kept for reuse (each up to [`SMALL_FILE`]).
const MAX_KEPT_BUFFERS: usize = 8;

/// What storing one file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Unchanged since the last backup (cache hit); not read.
    Unchanged,
    /// Read; the content was already in the store.
    Deduplicated { read: u64 },
    /// Read and uploaded.
    Uploaded { read: u64, stored: u64 },
}

/// A failure storing one file: its source could not be read, or the store failed.
#[derive(Debug)]
pub(crate) enum StoreFileError {
    Source(String),
    Store(Error),
}

/// Everything the per-file work needs, shared by the workers.
pub struct FileStorer {
    pub writer: Writer,
    pub key: [u8; 32],
    pub known: Arc<Known>,
    pub buffers: Buffers,
}

/// What storing one file on a worker gave: the file, and its content or why it was not stored.
pub(crate) type Worked = (
    Found,
    std::result::Result<(ContentId, Stored), StoreFileError>,
);

/// Small files in flight per large-file worker, on a store across a network.
const SMALL_PER_WORKER: usize = 4;
/// At most this many bytes of small files in flight at once (their data and their sealed copy
/// are in memory), in KiB.
const SMALL_KIB_IN_FLIGHT: usize = 32 * 1024;

/// The blocking threads that read, seal and upload files. `concurrency` of them take large files.
/// On a store across a network, small files have their own, more of them: each one's upload waits
/// mostly on the link's round trip, not on bandwidth, so more in flight fill the link where eight
/// would leave it idle; their bytes in flight stay under `SMALL_KIB_IN_FLIGHT` (32 MiB).
pub struct Workers {
    large: Arc<tokio::sync::Semaphore>,
    small: Option<(tokio::sync::Semaphore, tokio::sync::Semaphore)>,
}

impl Workers {
    /// Workers for `concurrency` large files at once; `remote`: a store across a network.
    pub fn new(concurrency: usize, remote: bool) -> Workers {
        Workers {
            large: Arc::new(tokio::sync::Semaphore::new(concurrency)),
            small: remote.then(|| {
                (
                    tokio::sync::Semaphore::new(concurrency * SMALL_PER_WORKER),
                    tokio::sync::Semaphore::new(SMALL_KIB_IN_FLIGHT),
                )
            }),
        }
    }

    /// Wait for a worker for a file of `size` bytes; it is free again when the permit is dropped.
    async fn acquire(&self, size: u64) -> Result<Vec<tokio::sync::SemaphorePermit<'_>>> {
        let closed = |e: tokio::sync::AcquireError| Error::Other(format!("file worker: {e}"));
        match &self.small {
            Some((count, bytes)) if size <= SMALL_FILE => {
                let kib = (size.div_ceil(1024).max(1) as u32).min(SMALL_KIB_IN_FLIGHT as u32);
                let one = count.acquire().await.map_err(closed)?;
                Ok(vec![one, bytes.acquire_many(kib).await.map_err(closed)?])
            }
            _ => Ok(vec![self.large.acquire().await.map_err(closed)?]),
        }
    }
}

impl FileStorer {
    /// Store `found` on a blocking thread once a worker for its size is free; `guard` is held
    /// until the thread is done with the file (even if the caller stops waiting).
    pub(crate) async fn store_on_worker(
        self: Arc<Self>,
        found: Found,
        workers: &Workers,
        guard: impl Send + 'static,
    ) -> Result<Worked> {
        let _worker = workers.acquire(found.entry.size).await?;
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let res = self.store_file(&found);
            (found, res)
        })
        .await
        .map_err(|e| Error::Other(format!("file worker: {e}")))
    }

    /// Hash `found` and upload it unless the store has it. Runs on a blocking thread.
    pub(crate) fn store_file(
        &self,
        found: &Found,
    ) -> std::result::Result<(ContentId, Stored), StoreFileError> {
        let src = |e: io::Error| StoreFileError::Source(e.to_string());
        let mut file = File::open(&found.abs).map_err(src)?;
        if self.known.is_empty() {
            if let Some(sealed) = self.writer.unnamed_content_writer() {
                let sealed = sealed.map_err(StoreFileError::Store)?;
                return self.store_in_one_pass(file, sealed, found.entry.size);
            }
        }
        if found.entry.size <= SMALL_FILE {
            let mut data = self.buffers.take();
            let result = self.store_small(&mut file, &mut data, found.entry.size);
            self.buffers.give(data);
            return result;
        }
        let (id, read) = self.hash_stream(&mut file)?;
        self.known.check_size(&id, read);
        let Some(claim) = self.known.claim(&id) else {
            return Ok((id, Stored::Deduplicated { read }));
        };
        let file = File::open(&found.abs).map_err(src)?;
        let stored = self.upload(claim, Source::File(file), read)?;
        Ok((id, Stored::Uploaded { read, stored }))
    }

    /// A small file: read into `data` once, hashed, encrypted from memory.
    fn store_small(
        &self,
        file: &mut File,
        data: &mut Vec<u8>,
        size: u64,
    ) -> std::result::Result<(ContentId, Stored), StoreFileError> {
        data.clear();
        data.reserve(size as usize);
        file.read_to_end(data)
            .map_err(|e| StoreFileError::Source(e.to_string()))?;
        let id = ContentId(*blake3::keyed_hash(&self.key, data).as_bytes());
        let read = data.len() as u64;
        self.known.check_size(&id, read);
        let Some(claim) = self.known.claim(&id) else {
            return Ok((id, Stored::Deduplicated { read }));
        };
        self.upload(claim, Source::Memory(data), read)
            .map(|stored| (id, Stored::Uploaded { read, stored }))
    }

    /// The first backup into a local store: encrypt while hashing and name the object at the end,
    /// reading the file once, in pieces, instead of twice (hash, then encrypt) or whole into memory.
    /// With content already stored this would encrypt what is then dropped, so it is used only
    /// while the store holds none.
    fn store_in_one_pass(
        &self,
        mut file: File,
        mut sealed: SealedWriter,
        expect_len: u64,
    ) -> std::result::Result<(ContentId, Stored), StoreFileError> {
        let key = sealed.key().to_string();
        let (id, read) = self.copy_hashed(&mut file, &mut sealed, &key)?;
        if read != expect_len {
            return Err(changed_meanwhile());
        }
        let Some(claim) = self.known.claim(&id) else {
            return Ok((id, Stored::Deduplicated { read })); // dropping the writer abandons it
        };
        let stored = sealed.finish_as(&id).map_err(StoreFileError::Store)?;
        claim.stored();
        Ok((id, Stored::Uploaded { read, stored }))
    }

    fn hash_stream(
        &self,
        r: &mut impl Read,
    ) -> std::result::Result<(ContentId, u64), StoreFileError> {
        self.copy_hashed(r, &mut io::sink(), DATA_DIR)
    }

    /// Copy `src` into `dst` (the object `object`) through a reused buffer, hashing it on the way:
    /// (keyed hash, length).
    fn copy_hashed(
        &self,
        src: &mut impl Read,
        dst: &mut impl Write,
        object: &str,
    ) -> std::result::Result<(ContentId, u64), StoreFileError> {
        let mut buf = self.buffers.take();
        if buf.len() < READ_BUFFER {
            buf.resize(READ_BUFFER, 0);
        }
        let result = copy_hashed(&self.key, src, dst, object, &mut buf[..READ_BUFFER]);
        self.buffers.give(buf);
        result
    }

    /// Encrypt `src` into `data/…`, then complete the object.
    fn upload(
        &self,
        claim: Claim<'_>,
        src: Source<'_>,
        expect_len: u64,
    ) -> std::result::Result<u64, StoreFileError> {
        let stored = self.try_upload(&claim.id, src, expect_len)?;
        claim.stored();
        Ok(stored)
    }

    fn try_upload(
        &self,
        id: &ContentId,
        src: Source<'_>,
        expect_len: u64,
    ) -> std::result::Result<u64, StoreFileError> {
        let key = id.key();
        let replace = self.known.replaces(id);
        let mut sealed = if replace {
            self.writer.replacing_writer(id)
        } else {
            self.writer.sealed_writer(&Object::Content(*id))
        }
        .map_err(StoreFileError::Store)?;
        sealed.expect_plaintext_len(expect_len);
        let unchanged = match src {
            // Hashed from these very bytes: nothing can have changed.
            Source::Memory(data) => {
                sealed
                    .write_all(data)
                    .map_err(|e| StoreFileError::Store(sealed.error(e)))?;
                true
            }
            Source::File(mut file) => {
                let (hashed, len) = self.copy_hashed(&mut file, &mut sealed, &key)?;
                len == expect_len && hashed == *id
            }
        };
        if !unchanged {
            return Err(changed_meanwhile()); // dropping the writer abandons the object
        }
        let stored = sealed.finish().map_err(StoreFileError::Store)?;
        if replace {
            tracing::info!(object = %key, "replaced a damaged object");
            if let Some(r) = &self.known.repair {
                r.mark_repaired(id);
            }
        }
        Ok(stored)
    }
}

/// Copy `src` into `dst` (the object `object`) through `buf`, hashing it on the way (large reads
/// let BLAKE3 hash many chunks at once): (keyed hash, length).
fn copy_hashed(
    key: &[u8; 32],
    src: &mut impl Read,
    dst: &mut impl Write,
    object: &str,
    buf: &mut [u8],
) -> std::result::Result<(ContentId, u64), StoreFileError> {
    let mut hasher = blake3::Hasher::new_keyed(key);
    let mut len = 0u64;
    loop {
        let n = match src.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreFileError::Source(e.to_string())),
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|e| StoreFileError::Store(crate::repo::write_error(object, e)))?;
        len += n as u64;
    }
    Ok((ContentId(*hasher.finalize().as_bytes()), len))
}

fn changed_meanwhile() -> StoreFileError {
    StoreFileError::Source("file changed while it was being backed up; run the backup again".into())
}

/// What [`FileStorer::upload`] encrypts: a small file already read (and hashed), or a large one
/// read again, which is hashed again on the way to prove it did not change.
enum Source<'a> {
    Memory(&'a [u8]),
    File(File),
}
