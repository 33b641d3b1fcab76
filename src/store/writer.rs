//! [`ObjectWriter`]: one object written from a blocking thread (the encryption threads), so a whole
//! object never sits in memory. Small objects go up in one conditional put, large ones as a
//! multipart upload that becomes visible only when complete; a folder store writes a file
//! (`local.rs`) instead.

use std::io::{self, Write};

use bytes::Bytes;

use object_store::{MultipartUpload, PutMultipartOptions, PutPayload};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use super::local::LocalWriter;
use super::{error_from_io, part_size_for, parts_in_flight, Store};
use crate::error::Result;

/// A multipart upload in progress: its parts upload on the runtime while the writer goes on.
pub(super) struct Multipart {
    upload: Box<dyn MultipartUpload>,
    tasks: JoinSet<object_store::Result<()>>,
}

/// Writes one object from a blocking thread: a single conditional put when it is small, a multipart
/// upload (visible only once complete) when it is not. Call [`ObjectWriter::finish`]; dropping it
/// abandons the object.
pub struct ObjectWriter {
    pub(super) store: Store,
    pub(super) key: String,
    pub(super) handle: Handle,
    pub(super) buf: Vec<u8>,
    pub(super) upload: Option<Multipart>,
    pub(super) written: u64,
    /// Bytes per multipart part: [`super::PART_SIZE`], or more for an object announced as large
    /// ([`ObjectWriter::expect_len`]).
    pub(super) part_size: usize,
    /// Parts sent so far.
    pub(super) parts: u64,
    /// A local store's file (or why it could not be created).
    pub(super) local: Option<io::Result<LocalWriter>>,
    /// Replace an existing object (`backup --repair`) instead of leaving it.
    pub(super) replace: bool,
}

impl ObjectWriter {
    /// Announce the object's length before writing it, so that its parts are large enough for it
    /// to fit the store's part limit (a video of 78 GiB or more). Only before the first part is
    /// sent; an object longer than announced still fails cleanly at the limit.
    pub fn expect_len(&mut self, len: u64) {
        if self.upload.is_none() && self.local.is_none() {
            self.part_size = part_size_for(len, self.store.max_parts);
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The local file, or the error that prevented creating it.
    fn local_file(&mut self) -> Option<io::Result<&mut LocalWriter>> {
        match self.local.as_mut()? {
            Ok(w) => Some(Ok(w)),
            Err(e) => Some(Err(io::Error::new(e.kind(), e.to_string()))),
        }
    }

    fn fail(&self, e: object_store::Error) -> io::Error {
        io::Error::other(self.store.error(&self.key, e))
    }

    /// Wait until at most `max` parts of this object are uploading; the first failure is returned.
    fn drain(&mut self, max: usize) -> io::Result<()> {
        loop {
            let next = match self.upload.as_mut() {
                Some(mp) if mp.tasks.len() > max => self.handle.block_on(mp.tasks.join_next()),
                _ => return Ok(()),
            };
            match next {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(e))) => return Err(self.fail(e)),
                Some(Err(join)) => return Err(io::Error::other(join)),
            }
        }
    }

    /// Send the buffer as the next part, starting the multipart upload if needed.
    fn send_part(&mut self) -> io::Result<()> {
        if self.parts >= self.store.max_parts {
            return Err(io::Error::other(crate::error::Error::StorageObject {
                object: self.key.clone(),
                message: format!(
                    "larger than {} parts of {} MiB, the most one upload can have: it cannot be stored in this store",
                    self.store.max_parts,
                    self.part_size / (1024 * 1024)
                ),
            }));
        }
        if self.upload.is_none() {
            let path = self.store.path(&self.key);
            let opts = PutMultipartOptions {
                attributes: self.store.attributes.clone(),
                ..Default::default()
            };
            let upload = self
                .handle
                .block_on(self.store.inner.put_multipart_opts(&path, opts))
                .map_err(|e| self.fail(e))?;
            self.upload = Some(Multipart {
                upload,
                tasks: JoinSet::new(),
            });
        }
        self.drain(parts_in_flight(self.part_size) - 1)?;
        let permit = self
            .handle
            .block_on(self.store.part_slots.clone().acquire_owned())
            .map_err(io::Error::other)?;
        let data = Bytes::from(std::mem::take(&mut self.buf));
        self.parts += 1;
        let mp = self.upload.as_mut().expect("started above");
        let part = mp.upload.put_part(PutPayload::from(data));
        mp.tasks.spawn_on(
            async move {
                let _slot = permit;
                part.await
            },
            &self.handle,
        );
        Ok(())
    }

    /// Name an object made by `Store::unnamed_writer`.
    pub fn name(&mut self, key: &str) {
        self.key = key.to_string();
        if let Some(Ok(w)) = self.local.as_mut() {
            w.name(key);
        }
    }

    /// Complete the object. Returns the number of bytes stored; 0 when an object with this key
    /// already existed (content addresses make that the same content).
    pub fn finish(mut self) -> Result<u64> {
        let written = self.written;
        if let Some(local) = self.local.take() {
            let key = self.key.clone();
            return match local.and_then(LocalWriter::finish) {
                Ok(created) => Ok(if created { written } else { 0 }),
                Err(e) => Err(self.store.local_error(&key, e)),
            };
        }
        if self.upload.is_none() {
            let data = Bytes::from(std::mem::take(&mut self.buf));
            if self.replace {
                self.handle
                    .block_on(self.store.put_overwrite(&self.key, data))?;
                return Ok(written);
            }
            let created = self.handle.block_on(self.store.put_new(&self.key, data))?;
            return Ok(if created { written } else { 0 });
        }
        let key = self.key.clone();
        let result = (|| {
            if !self.buf.is_empty() {
                self.send_part()?;
            }
            self.drain(0)
        })();
        if let Err(e) = result {
            self.abort();
            return Err(error_from_io(&key, e));
        }
        let mut mp = self.upload.take().expect("multipart");
        match self.handle.block_on(mp.upload.complete()) {
            Ok(_) => Ok(written),
            Err(e) => {
                let _ = self.handle.block_on(mp.upload.abort());
                Err(self.store.error(&key, e))
            }
        }
    }

    /// Abandon the object: a multipart upload is aborted, nothing becomes visible.
    pub fn abort(mut self) {
        if let Some(mut mp) = self.upload.take() {
            mp.tasks.abort_all();
            let _ = self.handle.block_on(async {
                while mp.tasks.join_next().await.is_some() {}
                mp.upload.abort().await
            });
        }
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(file) = self.local_file() {
            let n = file?.write(data)?;
            self.written += n as u64;
            return Ok(n);
        }
        if self.buf.capacity() == 0 && self.upload.is_some() {
            self.buf.reserve_exact(self.part_size);
        }
        let n = data.len().min(self.part_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() >= self.part_size {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(mut mp) = self.upload.take() {
            // Best effort: an abandoned multipart upload never becomes a visible object anyway.
            mp.tasks.abort_all();
            let handle = self.handle.clone();
            handle.spawn(async move {
                let _ = mp.upload.abort().await;
            });
        }
    }
}
