//! The database half of a restore: check the target server, check the dump, replay it, compare.
//!
//! Before anything is written: the target database must hold no tables, the server must be new
//! enough and have the snapshot's extensions, no other client may be connected to a database the
//! dump drops (its `DROP DATABASE` would fail and psql would load into the old one), and the whole
//! dump is downloaded, decrypted (pinned to the object the signed manifest names), checked against
//! the manifest's SHA-256 and read by `DumpChecker`, which refuses anything `pg_dumpall` would not
//! have written (psql meta-commands such as `\!`, `COPY … PROGRAM`). The replay reads the same
//! object again (its age header pins it to the checked bytes), checks every line again on its way to
//! psql, and runs psql with `ON_ERROR_STOP`, so psql stops at the first error.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use tokio_util::io::SyncIoBridge;

use crate::db::{self, Database, ReplayRun};
use crate::error::{Error, Result};
use crate::format::{Manifest, Object, ObjectRef};
use crate::progress::Progress;
use crate::repo::{read_error, Reader};
use crate::restore::dumpcheck::{DumpChecker, DumpFacts, Line, Meta};

/// One table's rows: in the snapshot, and in the restored database.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RowCheck {
    pub table: String,
    pub expected: Option<u64>,
    pub actual: Option<u64>,
}

/// The target database must hold no tables, and the server must be able to take the dump. For a
/// local server this is also the check that it answers. Returns the server's version.
pub(crate) async fn check_target(db: &dyn Database, manifest: &Manifest) -> Result<String> {
    let name = &manifest.database.database;
    let survey = db::survey(db, name).await?;
    let tables = if survey.database_exists {
        db::existing_tables(db, name).await?
    } else {
        Vec::new()
    };
    if !tables.is_empty() {
        let shown: Vec<&str> = tables.iter().take(6).map(String::as_str).collect();
        return Err(Error::NotFresh {
            reason: format!("database {name} already holds {} tables ({}{})", tables.len(), shown.join(", "), if tables.len() > 6 { ", …" } else { "" }),
            remedy: "Restore only into a fresh install: stop Immich, recreate its database: Immich's default DB_DATA_LOCATION is a bind mount that `docker compose down -v` keeps, so run `docker compose down`, remove the DB_DATA_LOCATION folder (./postgres by default), `docker compose create` and start only the database; then run restore again".into(),
        });
    }
    let (version, num) = (survey.version, survey.version_num);
    let (want, have) = (manifest.database.server_version_num / 10000, num / 10000);
    if have < want {
        return Err(Error::Database(format!(
            "the target server is PostgreSQL {version} but the snapshot comes from {}; use a Postgres image of major version {want} or newer",
            manifest.database.server_version
        )));
    }
    let available: HashSet<String> = survey.available_extensions.into_iter().collect();
    if let Some(missing) = manifest
        .database
        .extensions
        .iter()
        .find(|e| !available.contains(&e.name))
    {
        let taken_with = manifest
            .database
            .image
            .as_deref()
            .map(|i| format!("the image the snapshot was taken with, {i}, or on "))
            .unwrap_or_default();
        return Err(Error::Database(format!(
            "the target server lacks extension {} (version {} in the snapshot), so the dump cannot be replayed; nothing was written. Run the target database on {taken_with}Immich's Postgres image, which has it (ghcr.io/immich-app/postgres:{want}-vectorchord0.4.3-pgvectors0.2.0, as Immich's docker-compose.yml names it)",
            missing.name,
            missing.version,
            want = want.max(14),
        )));
    }
    Ok(version)
}

/// Refuse while another client is connected to a database the dump drops and re-creates: the
/// Immich database, `postgres` and `template1`, and any other the dump names.
pub(crate) async fn check_no_sessions(
    db: &dyn Database,
    manifest: &Manifest,
    facts: &DumpFacts,
) -> Result<()> {
    let mut names: Vec<String> = vec![
        manifest.database.database.clone(),
        "postgres".into(),
        "template1".into(),
    ];
    for d in facts.dropped_databases.iter().chain(&facts.connects) {
        if !names.contains(d) {
            names.push(d.clone());
        }
    }
    // Sessions of a server container just stopped (`--stop-server`) may take a moment to end.
    let mut sessions = db::other_sessions(db, &names).await?;
    for _ in 0..10 {
        if sessions.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        sessions = db::other_sessions(db, &names).await?;
    }
    if sessions.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = sessions
        .iter()
        .take(5)
        .map(|s| {
            format!(
                "{} on {} from {} as {} (pid {})",
                if s.application.is_empty() {
                    "a client"
                } else {
                    &s.application
                },
                s.database,
                s.client,
                s.user,
                s.pid
            )
        })
        .collect();
    Err(Error::NotFresh {
        reason: format!(
            "{} other client session(s) are connected to databases the dump drops and re-creates: {}{}",
            sessions.len(),
            shown.join("; "),
            if sessions.len() > 5 { "; …" } else { "" }
        ),
        remedy: "Stop those clients (the Immich server, a database tool, a monitoring agent) and restore again; nothing was written".into(),
    })
}

/// Download and decrypt the dump once, check it against the manifest and with `DumpChecker`,
/// before the database is touched.
pub(crate) async fn verify_dump(reader: &Reader, manifest: &Manifest) -> Result<DumpFacts> {
    let dump = reader
        .fetch(&Object::Dump(manifest.id.clone()), &manifest.dump)
        .await?;
    let want = manifest.dump.clone();
    tokio::task::spawn_blocking(move || {
        let plain = dump.open()?;
        let mut hashed = HashingReader::new(plain);
        let facts = check_lines(GzDecoder::new(&mut hashed), &want.key, |_, _| Ok(()))?;
        hashed.drain_and_check(&want, "")?;
        Ok(facts)
    })
    .await
    .map_err(|e| Error::Other(format!("dump check: {e}")))?
}

/// Read the dump's SQL `sql` line by line through a `DumpChecker`, handing each line and what it
/// is to `each`; stops at the first line refused. `key` names the dump in errors.
fn check_lines(
    sql: impl Read,
    key: &str,
    mut each: impl FnMut(&[u8], &Line) -> Result<()>,
) -> Result<DumpFacts> {
    let mut sql = BufReader::with_capacity(256 * 1024, sql);
    let mut checker = DumpChecker::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if sql
            .read_until(b'\n', &mut line)
            .map_err(|e| dump_read_error(key, e))?
            == 0
        {
            break;
        }
        let kind = checker
            .line(&line)
            .map_err(|r| refused(key, &r.to_string()))?;
        each(&line, &kind)?;
    }
    checker.finish().map_err(|r| refused(key, &r.to_string()))
}

/// The dump holds something `pg_dumpall` never writes.
fn refused(key: &str, why: &str) -> Error {
    Error::Corrupt {
        object: key.to_string(),
        message: format!(
            "the dump holds what pg_dumpall never writes, so it was not replayed (nothing was written): {why}"
        ),
    }
}

/// A read error of the decompressed dump: a damaged gzip stream is a damaged object.
fn dump_read_error(key: &str, e: io::Error) -> Error {
    // flate2 says InvalidInput of a bad gzip stream; age's errors (InvalidData, UnexpectedEof)
    // pass through it unchanged.
    match e.kind() {
        io::ErrorKind::InvalidInput => Error::Corrupt {
            object: key.to_string(),
            message: format!("it decrypts, but not to a gzip stream ({e})"),
        },
        _ => read_error(key, e),
    }
}

/// The line Immich's docs rewrite, and what it becomes (fixes `type "earth" does not exist`).
pub const SEARCH_PATH_LINE: &str = "SELECT pg_catalog.set_config('search_path', '', false);";
pub const SEARCH_PATH_FIX: &str =
    "SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);";

/// Errors that replaying `pg_dumpall --clean --if-exists` output into a fresh install may print,
/// and that mean nothing (psql without `\restrict`; the restore drops the role statements that
/// would fail).
pub fn is_benign_psql_error(message: &str, username: &str) -> bool {
    message.contains("current user cannot be dropped")
        || message.contains(&format!("role \"{username}\" already exists"))
        || message.contains("invalid command \\restrict")
        || message.contains("invalid command \\unrestrict")
}

/// Split psql's stderr into benign and fatal error lines.
pub fn classify_psql_errors(stderr: &str, username: &str) -> (Vec<String>, Vec<String>) {
    let mut benign = Vec::new();
    let mut fatal = Vec::new();
    for line in stderr.lines() {
        if !(line.contains("ERROR:") || line.contains("FATAL:") || line.contains("invalid command"))
        {
            continue;
        }
        if is_benign_psql_error(line, username) {
            benign.push(line.to_string());
        } else {
            fatal.push(line.to_string());
        }
    }
    (benign, fatal)
}

/// What the replay changes on the way to psql.
struct Rewrite {
    /// psql knows `\restrict`; else those lines are left out.
    restrict: bool,
    /// The statements that drop and create the role psql is connected as, which always fail
    /// (and would stop psql, which runs with `ON_ERROR_STOP`).
    own_role: [String; 2],
    /// [`SEARCH_PATH_FIX`] with its newline, for the [`SEARCH_PATH_LINE`] of each database.
    search_path_fix: Vec<u8>,
}

impl Rewrite {
    fn new(restrict: bool, username: &str) -> Rewrite {
        let role = db::quote_ident(username);
        Rewrite {
            restrict,
            own_role: [
                format!("DROP ROLE IF EXISTS {role};"),
                format!("CREATE ROLE {role};"),
            ],
            search_path_fix: format!("{SEARCH_PATH_FIX}\n").into_bytes(),
        }
    }

    /// The bytes to send psql for `line`, which `DumpChecker` classified as `kind`.
    fn apply<'a>(&'a self, line: &'a [u8], kind: &Line) -> &'a [u8] {
        match kind {
            Line::Meta(Meta::Restrict(_) | Meta::Unrestrict(_)) if !self.restrict => b"",
            Line::Sql {
                starts_clean: true,
                ends_clean: true,
            } => {
                let text = line.trim_ascii_end();
                if self.own_role.iter().any(|r| text == r.as_bytes()) {
                    b""
                } else if text == SEARCH_PATH_LINE.as_bytes() {
                    &self.search_path_fix
                } else {
                    line
                }
            }
            _ => line,
        }
    }
}

/// Replay the dump through psql; returns psql's harmless messages.
pub async fn replay(
    db: &dyn Database,
    reader: &Reader,
    manifest: &Manifest,
    progress: &Progress,
) -> Result<Vec<String>> {
    let replayed = replay_outcome(db, reader, manifest, progress).await?;
    match replayed.stopped_at {
        Some(first) => Err(Error::Database(format!(
            "replaying the dump failed (psql stopped at the first error): {first}. The database is partly restored: recreate it before trying again (the files restored are kept)"
        ))),
        None => Ok(replayed.benign),
    }
}

/// How psql took the dump.
pub(crate) struct Replayed {
    /// psql's harmless messages.
    pub benign: Vec<String>,
    /// The error psql stopped at, when it did.
    pub stopped_at: Option<String>,
}

/// Replay the dump through psql (checking every line on its way); an error that stopped psql is
/// an outcome, not an error.
pub(crate) async fn replay_outcome(
    db: &dyn Database,
    reader: &Reader,
    manifest: &Manifest,
    progress: &Progress,
) -> Result<Replayed> {
    let version = db.client_version().await?;
    let rewrite = Rewrite::new(
        db::psql_knows_restrict(&version),
        &manifest.database.username,
    );
    tracing::info!(database = db.describe(), psql = %version, "replaying the dump");
    let dump = reader
        .fetch(&Object::Dump(manifest.id.clone()), &manifest.dump)
        .await?;
    let ReplayRun { stdin, done } = db.replay().await?;
    let key = manifest.dump.key.clone();
    let p = progress.clone();
    let feed = tokio::task::spawn_blocking(move || -> Result<()> {
        let plain = dump.open()?;
        let sql = GzDecoder::new(CountingReader {
            inner: plain,
            progress: p,
        });
        let mut out = io::BufWriter::with_capacity(256 * 1024, SyncIoBridge::new(stdin));
        check_lines(sql, &key, |line, kind| {
            out.write_all(rewrite.apply(line, kind))
                .map_err(|e| Error::Database(format!("psql stopped reading the dump: {e}")))
        })?;
        out.flush()
            .map_err(|e| Error::Database(format!("psql stopped reading the dump: {e}")))?;
        let mut bridge = out
            .into_inner()
            .map_err(|e| Error::Database(e.to_string()))?;
        bridge
            .shutdown()
            .map_err(|e| Error::Database(e.to_string()))?;
        Ok(())
    });
    let (fed, output) = tokio::join!(feed, done);
    let output = output?;
    let fed = fed.map_err(|e| Error::Other(format!("dump feeder: {e}")))?;
    let (benign, fatal) = classify_psql_errors(&output.stderr, &manifest.database.username);
    if !fatal.is_empty() || !output.success {
        let first = fatal
            .first()
            .cloned()
            .unwrap_or_else(|| output.stderr.trim().to_string());
        return Ok(Replayed {
            benign,
            stopped_at: Some(first),
        });
    }
    fed?;
    Ok(Replayed {
        benign,
        stopped_at: None,
    })
}

/// Compare the restored database's rows with the snapshot's counts.
pub(crate) async fn compare_rows(db: &dyn Database, manifest: &Manifest) -> Result<Vec<RowCheck>> {
    let actual = db::row_counts(db, &manifest.database.database).await?;
    let mut tables: BTreeMap<&String, RowCheck> = BTreeMap::new();
    for (t, n) in &manifest.database.row_counts {
        tables.insert(
            t,
            RowCheck {
                table: t.clone(),
                expected: Some(*n),
                actual: None,
            },
        );
    }
    for (t, n) in &actual {
        tables
            .entry(t)
            .or_insert_with(|| RowCheck {
                table: t.clone(),
                expected: None,
                actual: None,
            })
            .actual = Some(*n);
    }
    Ok(tables.into_values().collect())
}

/// Counts bytes for the progress bar.
struct CountingReader<R> {
    inner: R,
    progress: Progress,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }
}

/// SHA-256 and length of what passes through.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub len: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    pub fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }

    /// Read what is left (whatever follows a gzip stream counts too), then check the whole against
    /// the manifest's size and SHA-256 of `want`; `note` is added to the message of a mismatch.
    pub fn drain_and_check(mut self, want: &ObjectRef, note: &str) -> Result<()> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| read_error(&want.key, e))?;
        let (len, sha) = (self.len, self.finish());
        if len != want.size || sha != want.sha256 {
            return Err(Error::Corrupt {
                object: want.key.clone(),
                message: format!("does not match the manifest's size and SHA-256{note}"),
            });
        }
        Ok(())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_statements_of_the_connected_role_and_unknown_restrict_lines_are_left_out() {
        let r = Rewrite::new(false, "postgres");
        let clean = Line::Sql {
            starts_clean: true,
            ends_clean: true,
        };
        assert_eq!(r.apply(b"DROP ROLE IF EXISTS postgres;\n", &clean), b"");
        assert_eq!(r.apply(b"CREATE ROLE postgres;\n", &clean), b"");
        assert_eq!(
            r.apply(b"CREATE ROLE immich;\n", &clean),
            b"CREATE ROLE immich;\n"
        );
        let inside = Line::Sql {
            starts_clean: false,
            ends_clean: true,
        };
        assert_eq!(
            r.apply(b"CREATE ROLE postgres;\n", &inside),
            b"CREATE ROLE postgres;\n",
            "only whole statements are dropped"
        );
        let search_path = format!("{SEARCH_PATH_LINE}\n");
        assert_eq!(
            r.apply(search_path.as_bytes(), &clean),
            format!("{SEARCH_PATH_FIX}\n").as_bytes(),
            "Immich's search-path fix"
        );
        let restrict = Line::Meta(Meta::Restrict("abc".into()));
        assert_eq!(r.apply(b"\\restrict abc\n", &restrict), b"");
        let r = Rewrite::new(true, "Admin");
        assert_eq!(r.apply(b"\\restrict abc\n", &restrict), b"\\restrict abc\n");
        assert_eq!(r.apply(b"CREATE ROLE \"Admin\";\n", &clean), b"");
    }

    #[test]
    fn psql_versions_that_know_restrict() {
        for (v, knows) in [
            ("psql (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", true),
            ("psql (PostgreSQL) 15.13", false),
            ("psql (PostgreSQL) 14.19", true),
            ("psql (PostgreSQL) 16.9", false),
            ("psql (PostgreSQL) 17.6", true),
            ("psql (PostgreSQL) 18.1", true),
            ("psql (PostgreSQL) 12.22", false),
            ("garbage", false),
        ] {
            assert_eq!(db::psql_knows_restrict(v), knows, "{v}");
        }
    }
}
