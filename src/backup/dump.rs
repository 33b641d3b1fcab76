//! The database dump: `pg_dumpall` → gzip → age → store, streamed, plus the row counts read off the
//! dump as it passes.
//!
//! The object decrypts to an ordinary `.sql.gz` (`age -d | gunzip | psql` restores it). Row counts are
//! counted in the dump's own `COPY` blocks, so they describe exactly what the dump holds even while
//! Immich keeps writing. A dump that exits non-zero is abandoned before its object is completed.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};
use tokio_util::io::SyncIoBridge;

use super::consistency::DbPaths;
use crate::db::{Database, DumpRun};
use crate::error::{Error, Result};
use crate::format::{Object, ObjectRef};
use crate::immich::copy::{self, connect_target};
use crate::repo::{SealedWriter, Writer};

/// What a finished dump left in the store.
pub(crate) struct DumpOutcome {
    pub object: ObjectRef,
    /// Rows per table of the Immich database, as the dump holds them.
    pub row_counts: BTreeMap<String, u64>,
    /// Size of the raw SQL text.
    pub sql_bytes: u64,
    /// The files the Immich database's rows name (`None`: the counter was given none to collect).
    pub paths: Option<DbPaths>,
}

/// What the dump reports while it runs.
pub(crate) struct DumpEvents<F> {
    /// Called with each number of SQL bytes read.
    pub on_bytes: F,
    /// Sent once the dump has reached the Immich database ([`RowCounter::reached_database`]);
    /// dropped without a message if it never does.
    pub snapshot_taken: tokio::sync::oneshot::Sender<()>,
}

/// Dump every database into the sealed object `object`; `counter` counts the rows of the Immich
/// one (and collects the paths they name).
pub(crate) async fn dump_to_store<F: Fn(u64) + Send + 'static>(
    db: &dyn Database,
    repo: &Writer,
    object: &Object,
    counter: RowCounter,
    level: u32,
    events: DumpEvents<F>,
) -> Result<DumpOutcome> {
    let DumpRun { stdout, done } = db.dump_all().await?;
    let (repo, object) = (repo.clone(), object.clone());
    let key = object.key();
    let pipe = tokio::task::spawn_blocking(move || {
        let writer = repo.sealed_writer(&object)?;
        let input = SyncIoBridge::new(stdout);
        stream_dump(input, writer, counter, level, events)
            .map_err(|e| crate::repo::write_error(&object.key(), e))
    });
    let (piped, exited) = tokio::join!(pipe, done);
    let piped = piped.map_err(|e| Error::Other(format!("dump thread: {e}")))?;
    match (piped, exited) {
        (Ok(p), Ok(())) => {
            let size = p.gz_bytes;
            let sha256 = p.sha256.clone();
            let header_mac = Some(hex::encode(p.header_mac));
            let writer = p.writer;
            tokio::task::spawn_blocking(move || writer.finish())
                .await
                .map_err(|e| Error::Other(format!("dump thread: {e}")))??;
            let (row_counts, paths) = p.counter.finish();
            Ok(DumpOutcome {
                object: ObjectRef {
                    key,
                    size,
                    sha256,
                    header_mac,
                },
                row_counts,
                sql_bytes: p.sql_bytes,
                paths,
            })
        }
        (Ok(p), Err(e)) => {
            let writer = p.writer;
            let _ = tokio::task::spawn_blocking(move || writer.abort()).await;
            Err(e)
        }
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
    }
}

/// The result of piping the dump, before its object is completed.
struct Piped {
    writer: SealedWriter,
    counter: RowCounter,
    sha256: String,
    gz_bytes: u64,
    sql_bytes: u64,
    header_mac: [u8; 32],
}

fn stream_dump<F: Fn(u64)>(
    mut input: impl Read,
    sealed: SealedWriter,
    mut counter: RowCounter,
    level: u32,
    events: DumpEvents<F>,
) -> io::Result<Piped> {
    let DumpEvents {
        on_bytes,
        snapshot_taken,
    } = events;
    let mut snapshot_taken = Some(snapshot_taken);
    let header_mac = sealed.header_mac();
    let mut gz = GzEncoder::new(HashingWriter::new(sealed), Compression::new(level));
    let mut buf = vec![0u8; 256 * 1024];
    let mut sql_bytes = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        counter.feed(&buf[..n]);
        if counter.reached_database() {
            if let Some(tx) = snapshot_taken.take() {
                let _ = tx.send(());
            }
        }
        gz.write_all(&buf[..n])?;
        sql_bytes += n as u64;
        on_bytes(n as u64);
    }
    let hashed = gz.finish()?;
    let (writer, sha256, gz_bytes) = hashed.into_parts();
    Ok(Piped {
        writer,
        counter,
        sha256,
        gz_bytes,
        sql_bytes,
        header_mac,
    })
}

/// Passes bytes through while computing their SHA-256 and length.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, the hex digest and the length.
    pub(crate) fn into_parts(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts the rows of each `COPY … FROM stdin;` block of one database in `pg_dumpall` output, and
/// hands the rows of the tables that name files to the consistency check ([`DbPaths`]).
pub(crate) struct RowCounter {
    database: String,
    current_db: Option<String>,
    copying: Option<String>,
    line: Vec<u8>,
    /// The line being read was longer than what is kept of it.
    truncated: bool,
    counts: BTreeMap<String, u64>,
    reached: bool,
    paths: Option<DbPaths>,
    /// The rows of the current block go to `paths`.
    keep_rows: bool,
    /// Rows of the current block so far (of the configured database).
    block_rows: u64,
}

/// The longest line prefix kept for parsing; longer lines are only counted.
const LINE_PREFIX: usize = 64 * 1024;

impl RowCounter {
    /// Count the rows of `database`, and hand its file-naming rows to `paths`.
    pub fn new(database: &str, paths: Option<DbPaths>) -> Self {
        RowCounter {
            database: database.to_string(),
            current_db: None,
            copying: None,
            line: Vec::new(),
            truncated: false,
            counts: BTreeMap::new(),
            reached: false,
            paths,
            keep_rows: false,
            block_rows: 0,
        }
    }

    /// Feed the next bytes of the dump.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while let Some(pos) = memchr::memchr(b'\n', data) {
            if self.line.is_empty() && !self.truncated {
                // A whole line in this piece: read where it is.
                let line = &data[..pos.min(self.limit())];
                self.truncated = line.len() < pos;
                self.end_line(line);
            } else {
                self.keep(&data[..pos]);
                let line = std::mem::take(&mut self.line);
                self.end_line(&line);
                self.line = line;
                self.line.clear();
            }
            self.truncated = false;
            data = &data[pos + 1..];
        }
        self.keep(data);
    }

    /// How much of a line is kept. Inside a COPY block only `\.` matters, unless its rows are
    /// wanted: just enough to recognise it.
    fn limit(&self) -> usize {
        if self.copying.is_some() && !self.keep_rows {
            3
        } else {
            LINE_PREFIX
        }
    }

    fn keep(&mut self, part: &[u8]) {
        let room = self.limit().saturating_sub(self.line.len());
        self.truncated |= part.len() > room;
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn in_database(&self) -> bool {
        self.current_db.as_deref() == Some(self.database.as_str())
    }

    fn end_line(&mut self, line: &[u8]) {
        if let Some(table) = &self.copying {
            if line == b"\\." {
                if let Some(n) = self.counts.get_mut(table) {
                    *n += std::mem::take(&mut self.block_rows);
                }
                self.copying = None;
                if std::mem::take(&mut self.keep_rows) {
                    self.paths.as_mut().expect("rows kept for it").end();
                }
            } else if self.current_db.as_deref() == Some(self.database.as_str()) {
                self.block_rows += 1;
                if self.keep_rows {
                    let paths = self.paths.as_mut().expect("rows kept for it");
                    paths.row(line, self.truncated);
                }
            }
            return;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return;
        };
        if let Some(rest) = text.strip_prefix("\\connect ") {
            let db = connect_target(rest);
            self.reached |= db == self.database;
            self.current_db = Some(db);
        } else if let Some(header) = copy::parse_header(text) {
            if self.in_database() {
                self.counts.entry(header.table.clone()).or_default();
                self.block_rows = 0;
                self.keep_rows = self.paths.as_mut().is_some_and(|p| p.begin(&header));
            }
            self.copying = Some(header.table);
        }
    }

    /// Whether the dump has reached the configured database. Its `\connect` line comes from
    /// `pg_dump`, which writes nothing before it has taken its snapshot: from here on, the dump's
    /// view of that database is fixed.
    pub(crate) fn reached_database(&self) -> bool {
        self.reached
    }

    /// The counts of the configured database, and the paths its rows named.
    pub fn finish(self) -> (BTreeMap<String, u64>, Option<DbPaths>) {
        (self.counts, self.paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_copy_rows_of_the_configured_database_only() {
        let dump = b"\\connect template1\nCOPY public.t (a) FROM stdin;\n1\n\\.\n\
\\connect -reuse-previous=on \"dbname='immich'\"\nCOPY public.\"user\" (id, name) FROM stdin;\n1\ta\n2\tb\n\\.\n\
COPY public.empty (a) FROM stdin;\n\\.\nSELECT 1;\n";
        // Feed in awkward pieces to exercise the line joining.
        let mut c = RowCounter::new("immich", None);
        let at = dump.windows(10).position(|w| w == b"\\connect -").unwrap();
        let mut reached_at = None;
        for (i, chunk) in dump.chunks(5).enumerate() {
            c.feed(chunk);
            if c.reached_database() && reached_at.is_none() {
                reached_at = Some(i * 5);
            }
        }
        // The files may start once the Immich database's `\connect` line has gone by, not before.
        let reached_at = reached_at.expect("the immich database was reached");
        assert!(reached_at > at, "{reached_at} > {at}");
        let (counts, _) = c.finish();
        assert_eq!(counts.get("public.user"), Some(&2));
        assert_eq!(counts.get("public.empty"), Some(&0));
        assert_eq!(counts.get("public.t"), None);
    }

    #[test]
    fn connect_forms() {
        assert_eq!(connect_target("immich"), "immich");
        assert_eq!(connect_target("\"my db\""), "my db");
        assert_eq!(
            connect_target("-reuse-previous=on \"dbname='im\\'m'\""),
            "im'm"
        );
    }
}
