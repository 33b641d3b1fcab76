//! Writing a local store's content objects, and the files a restore puts back, with `O_DIRECT`: the
//! bytes go from our buffer to the disk without a copy into the page cache.
//!
//! A backup writes hundreds of gigabytes that nobody reads back soon. Written through the page cache
//! they cost a copy per byte (on some virtual machines the largest single cost of a first backup),
//! then evict what the Immich server had cached, then must be written back before the commit's sync
//! anyway. Written directly, in aligned blocks of `BLOCK` bytes, they skip all three. The last
//! partial block of each object goes through the page cache as usual (`O_DIRECT` is switched off on
//! the descriptor for it), and the commit's `syncfs` makes everything durable exactly as before.
//!
//! Where the file system refuses `O_DIRECT` (at open, or with `EINVAL` on a write that needs another
//! alignment), the writer carries on through the page cache and the store stops asking for it.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes per direct write: large enough that the device is kept busy by few calls.
pub(crate) const BLOCK: usize = 1024 * 1024;
/// Alignment of buffer, offset and length of each direct write (the largest logical block size in
/// common use).
pub(crate) const ALIGN: usize = 4096;
/// Blocks kept for reuse (one per writer at a time; a fresh one faults in new pages).
const KEPT: usize = 16;

/// What the writers of one store share: whether direct writes work there, and spare blocks.
#[derive(Debug)]
pub(crate) struct Direct {
    enabled: AtomicBool,
    spare: Mutex<Vec<Block>>,
}

impl Direct {
    pub fn new(enabled: bool) -> Arc<Direct> {
        Arc::new(Direct {
            enabled: AtomicBool::new(enabled),
            spare: Mutex::new(Vec::new()),
        })
    }

    /// Whether new files should be opened with `O_DIRECT`.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The file system refused direct writes: use the page cache from now on.
    pub(crate) fn disable(&self) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::debug!(
                "the store's file system refuses O_DIRECT; writing through the page cache"
            );
        }
    }

    fn take(&self) -> Block {
        self.spare
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_else(Block::new)
    }

    fn give(&self, block: Block) {
        let mut spare = self.spare.lock().expect("not poisoned");
        if spare.len() < KEPT {
            spare.push(block);
        }
    }
}

/// A buffer of `BLOCK` bytes starting at an [`ALIGN`]ed address.
#[derive(Debug)]
struct Block {
    raw: Vec<u8>,
    start: usize,
}

impl Block {
    fn new() -> Block {
        let raw = vec![0u8; BLOCK + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Block { raw, start }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + BLOCK]
    }
}

/// How a store or a restore makes its new files: whether the file system takes direct writes and
/// unnamed (`O_TMPFILE`) files, each until it says it does not.
#[derive(Debug)]
pub(crate) struct NewFiles {
    direct: Arc<Direct>,
    /// Unnamed files are given their name through /proc/self/fd (`store::local::link_fd`).
    unnamed: AtomicBool,
}

impl NewFiles {
    /// New files in a folder where direct writes are wanted (`direct`) and [`suits`] them.
    pub fn new(direct: bool) -> NewFiles {
        NewFiles {
            direct: Direct::new(direct),
            unnamed: AtomicBool::new(std::path::Path::new("/proc/self/fd").is_dir()),
        }
    }

    /// These new files without unnamed (`O_TMPFILE`) files, as on a file system that lacks them.
    #[cfg(test)]
    pub(crate) fn without_unnamed(self) -> NewFiles {
        self.unnamed.store(false, Ordering::Relaxed);
        self
    }

    /// Whether files are opened with `O_DIRECT` (as far as is known yet).
    #[cfg(test)]
    pub(crate) fn direct(&self) -> bool {
        self.direct.enabled()
    }

    /// An unnamed file in `folder`, created with `mode`, for `len` bytes, to be named with
    /// `store::local::link_fd`; `None` where the file system cannot make them (then, or before).
    pub fn unnamed(
        &self,
        folder: &std::path::Path,
        mode: u32,
        len: u64,
    ) -> io::Result<Option<DirectWriter>> {
        use std::os::unix::fs::OpenOptionsExt;
        self.unnamed_with(len, |extra| {
            std::fs::OpenOptions::new()
                .write(true)
                .mode(mode)
                .custom_flags(libc::O_TMPFILE | extra)
                .open(folder)
        })
    }

    /// An unnamed file in the open folder `dir` (see [`NewFiles::unnamed`]).
    pub(crate) fn unnamed_in(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        mode: u32,
        len: u64,
    ) -> io::Result<Option<DirectWriter>> {
        self.unnamed_with(len, |extra| {
            openat(dir, ".", libc::O_WRONLY | libc::O_TMPFILE | extra, mode)
        })
    }

    /// File `name` in the open folder `dir`, created (or emptied) with `mode`, for `len` bytes;
    /// never through a symlink. (Not `O_EXCL`: a file system that refuses `O_DIRECT` may create
    /// the file before it says so, and the open is then made again without it.)
    pub(crate) fn create_in(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::OsStr,
        mode: u32,
        len: u64,
    ) -> io::Result<DirectWriter> {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW;
        open(
            &self.direct,
            |extra| openat(dir, name, flags | extra, mode),
            len,
        )
    }

    fn unnamed_with(
        &self,
        len: u64,
        opener: impl Fn(libc::c_int) -> io::Result<File>,
    ) -> io::Result<Option<DirectWriter>> {
        if !self.unnamed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match open(&self.direct, opener, len) {
            Ok(w) => Ok(Some(w)),
            Err(e) if tmpfile_unsupported(&e) => {
                self.unnamed.store(false, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)` as a `File`.
fn openat(
    dir: std::os::fd::BorrowedFd<'_>,
    name: impl rustix::path::Arg,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::from_bits_retain(flags as _) | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::from_bits_truncate(mode as _))?;
    Ok(File::from(fd))
}

/// Whether `e`, from opening an `O_TMPFILE` file, says the file system cannot make unnamed files.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOSYS)
    )
}

/// Open a file with `opener` (given the extra flags to add) for `len` bytes, adding `O_DIRECT`
/// where `shared` allows, the file system takes it, and the file fills at least one aligned block.
fn open(
    shared: &Arc<Direct>,
    opener: impl Fn(libc::c_int) -> io::Result<File>,
    len: u64,
) -> io::Result<DirectWriter> {
    if shared.enabled() && len >= ALIGN as u64 {
        match opener(libc::O_DIRECT) {
            Ok(file) => return Ok(DirectWriter::new(file, shared.clone())),
            // EINVAL: no O_DIRECT here, if the same open without it works.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let file = opener(0)?;
                shared.disable();
                return Ok(DirectWriter::plain(file, shared.clone()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(DirectWriter::plain(opener(0)?, shared.clone()))
}

/// Whether direct writes suit the file system holding `path`: not on network or FUSE file
/// systems, where each would wait for a round trip and caching is the server's business anyway.
pub(crate) fn suits(path: &std::path::Path) -> bool {
    // statfs(2) magic numbers.
    const REMOTE: [i64; 8] = [
        0x6969,      // NFS
        0x517B,      // SMB
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x6573_5546, // FUSE
        0x0102_1997, // 9P
        0x00C3_6400, // Ceph
        0x5346_414F, // AFS
    ];
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
    else {
        return false;
    };
    // SAFETY: statfs with a valid path and a zeroed struct it fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    !REMOTE.contains(&(st.f_type as i64))
}

/// A file opened with `O_DIRECT`, written through an aligned block.
///
/// A direct write waits for the device. Many files written side by side keep both the CPU and the
/// device busy, but a single large one would alternate between them; so once a file has passed
/// [`PIPELINE_AFTER`] blocks, a helper thread writes each full block while the next one fills.
pub(crate) struct DirectWriter {
    file: Option<File>,
    block: Option<Block>,
    filled: usize,
    /// `O_DIRECT` is still set on the descriptor.
    direct: bool,
    shared: Arc<Direct>,
    /// Blocks written so far.
    blocks: u64,
    pipe: Option<Pipe>,
}

/// Blocks a file writes itself before a helper thread takes over its full blocks.
pub(crate) const PIPELINE_AFTER: u64 = 8;

/// The helper thread of a large file: full blocks go to it, written ones (or the error) come back.
struct Pipe {
    full: Option<std::sync::mpsc::SyncSender<Block>>,
    written: std::sync::mpsc::Receiver<io::Result<Block>>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl Pipe {
    /// A thread writing blocks to (a duplicate of) `file`.
    fn start(file: &File, direct: bool, shared: &Arc<Direct>) -> io::Result<Pipe> {
        let mut file = file.try_clone()?; // the same open file: offset and flags are shared
        let shared = shared.clone();
        let (full, blocks) = std::sync::mpsc::sync_channel::<Block>(1);
        let (done, written) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("direct-writer".into())
            .spawn(move || {
                let mut direct = direct;
                for mut block in blocks {
                    let result = write_all(&mut file, block.bytes(), &mut direct, &shared);
                    let failed = result.is_err();
                    if done.send(result.map(|()| block)).is_err() || failed {
                        return; // after an error, nothing more is written
                    }
                }
            })?;
        Ok(Pipe {
            full: Some(full),
            written,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    /// Hand over a full block; returns an empty one (a written one once two are in flight).
    fn send(&mut self, block: Block, shared: &Direct) -> io::Result<Block> {
        let full = self.full.as_ref().expect("not stopped");
        if full.send(block).is_err() {
            return Err(self.stop(shared).err().unwrap_or_else(stopped));
        }
        self.in_flight += 1;
        if self.in_flight < 2 {
            return Ok(shared.take());
        }
        self.in_flight -= 1;
        match self.written.recv() {
            Ok(result) => result,
            Err(_) => Err(self.stop(shared).err().unwrap_or_else(stopped)),
        }
    }

    /// Wait until every block handed over is written; the first error, if any.
    fn stop(&mut self, shared: &Direct) -> io::Result<()> {
        drop(self.full.take());
        let mut first = Ok(());
        for result in self.written.iter() {
            match result {
                Ok(block) => shared.give(block),
                Err(e) => {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() && first.is_ok() {
                first = Err(stopped());
            }
        }
        self.in_flight = 0;
        first
    }
}

fn stopped() -> io::Error {
    io::Error::other("the direct writer thread stopped")
}

/// Write all of `data` to `file`; a direct write the file system refuses is made through the page
/// cache (and `direct` cleared).
fn write_all(
    file: &mut File,
    mut data: &[u8],
    direct: &mut bool,
    shared: &Direct,
) -> io::Result<()> {
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if *direct && e.raw_os_error() == Some(libc::EINVAL) => {
                shared.disable();
                set_buffered(file)?;
                *direct = false;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Switch `file`'s open file description to the page cache.
fn set_buffered(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl DirectWriter {
    /// Write to `file`, which was opened with `O_DIRECT`.
    pub fn new(file: File, shared: Arc<Direct>) -> DirectWriter {
        DirectWriter {
            file: Some(file),
            block: Some(shared.take()),
            filled: 0,
            direct: true,
            shared,
            blocks: 0,
            pipe: None,
        }
    }

    /// Write to `file`, opened without `O_DIRECT`, through the same block (few, large writes).
    pub fn plain(file: File, shared: Arc<Direct>) -> DirectWriter {
        let mut w = DirectWriter::new(file, shared);
        w.direct = false;
        w
    }

    /// Write what is buffered and hand back the file (without `O_DIRECT`).
    pub fn finish(mut self) -> io::Result<File> {
        if let Some(mut pipe) = self.pipe.take() {
            pipe.stop(&self.shared)?;
        }
        let aligned = self.filled / ALIGN * ALIGN;
        let mut block = self.block.take().expect("finish runs once");
        let mut file = self.file.take().expect("finish runs once");
        let result = (|| {
            let data = block.bytes();
            write_all(&mut file, &data[..aligned], &mut self.direct, &self.shared)?;
            set_buffered(&file)?;
            self.direct = false;
            write_all(
                &mut file,
                &data[aligned..self.filled],
                &mut self.direct,
                &self.shared,
            )
        })();
        self.shared.give(block);
        result.map(|()| file)
    }

    fn flush_block(&mut self) -> io::Result<()> {
        let block = self.block.take().expect("not finished");
        self.filled = 0;
        self.blocks += 1;
        let file = self.file.as_mut().expect("not finished");
        if self.pipe.is_none() && self.blocks > PIPELINE_AFTER {
            self.pipe = Some(Pipe::start(file, self.direct, &self.shared)?);
        }
        if let Some(pipe) = self.pipe.as_mut() {
            self.block = Some(pipe.send(block, &self.shared)?);
            return Ok(());
        }
        let mut block = block;
        let result = write_all(file, block.bytes(), &mut self.direct, &self.shared);
        self.block = Some(block);
        result
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.stop(&self.shared); // abandoned: only wait for the thread
        }
        if let Some(block) = self.block.take() {
            self.shared.give(block);
        }
    }
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let filled = self.filled;
        let block = self.block.as_mut().expect("not finished").bytes();
        let n = data.len().min(BLOCK - filled);
        block[filled..filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        if self.filled == BLOCK {
            self.flush_block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn odd_writes_land_exactly_through_aligned_direct_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Direct::new(true);
        let data: Vec<u8> = (0..(PIPELINE_AFTER as usize + 5) * BLOCK + BLOCK / 2 + 123)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        for (name, flags) in [("direct", libc::O_DIRECT), ("plain", 0)] {
            let path = dir.path().join(name);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(flags)
                .open(&path)
                .unwrap();
            let mut w = DirectWriter::new(file, shared.clone());
            for piece in data.chunks(65_552) {
                w.write_all(piece).unwrap();
            }
            let file = w.finish().unwrap();
            // The descriptor is back to the page cache for whatever comes next.
            // SAFETY: F_GETFL on an open descriptor.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            assert_eq!(flags & libc::O_DIRECT, 0);
            drop(file);
            let mut back = Vec::new();
            std::fs::File::open(&path)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "{name}: {} bytes back", back.len());
        }
        assert!(shared.enabled(), "this file system takes direct writes");
        assert!(shared.spare.lock().unwrap().len() <= KEPT);
    }
}
