//! The database seam: how `pg_dumpall` and `psql` are run, whatever the transport.
//!
//! [`Database`] is one small trait with a local-binaries implementation ([`local`]) and, with the
//! Docker issue, one that execs inside the `immich_postgres` container. Everything else here is
//! transport-independent SQL: server version, extensions, row counts, and the fresh-install check.

pub mod cluster;
pub mod docker;
pub mod local;
pub mod scratch;

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{DatabaseConfig, DatabaseMode};
use crate::error::{Error, Result};
use crate::format::Extension;

/// A running `pg_dumpall`: its stdout, and a future that resolves once it exits (an error when it
/// exited non-zero, with its stderr).
pub struct DumpRun {
    pub stdout: Pin<Box<dyn AsyncRead + Send>>,
    pub done: BoxFuture<'static, Result<()>>,
}

/// A running `psql` replaying a dump: its stdin, and a future with its stderr once it exits.
pub struct ReplayRun {
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    pub done: BoxFuture<'static, Result<ReplayOutput>>,
}

/// What psql said while replaying.
#[derive(Debug, Clone)]
pub struct ReplayOutput {
    pub success: bool,
    pub stderr: String,
}

/// How to run the Postgres client tools against the Immich database.
#[async_trait::async_trait]
pub trait Database: Send + Sync {
    /// Where the database is, for messages ("local 127.0.0.1:5432", "container immich_postgres").
    fn describe(&self) -> String;
    /// Start `pg_dumpall --clean --if-exists --username=<username>`.
    async fn dump_all(&self) -> Result<DumpRun>;
    /// Run `sql` with `psql -X -A -t` against database `db`; returns stdout.
    async fn query(&self, db: &str, sql: &str) -> Result<String>;
    /// Start `psql --dbname=postgres -v ON_ERROR_STOP=1` reading a dump on stdin: it stops at the
    /// first error, so nothing after a failed statement (a failed `COPY`'s data among them) is run.
    /// It ends when this process does.
    async fn replay(&self) -> Result<ReplayRun>;
    /// `psql --version` of the psql that [`Database::replay`] runs.
    async fn client_version(&self) -> Result<String>;
    /// Wait until the server accepts connections (bounded).
    async fn wait_ready(&self) -> Result<()> {
        Ok(())
    }
    /// Whether [`Database::wait_ready`] may wait for a server that is starting; when it only checks
    /// once, a backup runs the check beside the dump and reports the check's error first.
    fn ready_waits(&self) -> bool {
        true
    }
    /// The Postgres server's container image (name and id), when the transport knows it.
    async fn image(&self) -> Option<String> {
        None
    }
    /// For transports that manage the Immich server container: its name while it runs, else
    /// `None` (also when it does not exist).
    async fn running_server(&self) -> Result<Option<String>> {
        Ok(None)
    }
    /// Stop (`false`) or start (`true`) the Immich server container.
    async fn set_server_running(&self, _running: bool) -> Result<()> {
        Ok(())
    }
}

/// Build the transport the config names.
pub fn connect(cfg: &DatabaseConfig) -> Result<Box<dyn Database>> {
    match cfg.mode {
        DatabaseMode::Local => Ok(Box::new(local::LocalDatabase::new(cfg.clone()))),
        DatabaseMode::Docker => Ok(Box::new(docker::DockerDatabase::new(cfg.clone()))),
    }
}

const VERSION_SQL: &str = "SHOW server_version; SHOW server_version_num;";
const EXTENSIONS_SQL: &str =
    "SELECT extname || '|' || extversion FROM pg_extension ORDER BY extname";

/// The first two non-empty lines of `lines`: the answers to [`VERSION_SQL`].
fn parse_version<'a>(lines: &mut impl Iterator<Item = &'a str>) -> Result<(String, i64)> {
    let mut lines = lines.map(str::trim).filter(|l| !l.is_empty());
    let version = lines.next().unwrap_or_default().to_string();
    let num = lines.next();
    let parsed = num.and_then(|n| n.parse().ok()).ok_or_else(|| {
        Error::Database(format!(
            "unexpected answer to SHOW server_version_num: {num:?}"
        ))
    })?;
    Ok((version, parsed))
}

fn parse_extensions<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<Extension> {
    lines
        .filter_map(|l| l.split_once('|'))
        .map(|(n, v)| Extension {
            name: n.to_string(),
            version: v.to_string(),
        })
        .collect()
}

/// Server version and the installed extensions of database `name`, in one query (one connection).
pub(crate) async fn server_facts(
    db: &dyn Database,
    name: &str,
) -> Result<((String, i64), Vec<Extension>)> {
    let out = db
        .query(name, &format!("{VERSION_SQL} {EXTENSIONS_SQL};"))
        .await?;
    let mut lines = out.lines();
    let version = parse_version(&mut lines)?;
    Ok((version, parse_extensions(lines)))
}

/// What restore checks of a target server before it writes anything.
#[derive(Debug, Clone)]
pub(crate) struct Survey {
    pub version: String,
    pub version_num: i64,
    /// Whether database `name` exists.
    pub database_exists: bool,
    /// Extensions the server can install (`pg_available_extensions`).
    pub available_extensions: Vec<String>,
}

/// Version, whether database `name` exists, and the installable extensions, in one query (one
/// connection, to `postgres`).
pub(crate) async fn survey(db: &dyn Database, name: &str) -> Result<Survey> {
    let sql = format!(
        "{VERSION_SQL} SELECT count(*) FROM pg_database WHERE datname = {}; \
         SELECT name FROM pg_available_extensions ORDER BY name;",
        quote_literal(name)
    );
    let out = db.query("postgres", &sql).await?;
    let mut lines = out.lines();
    let (version, version_num) = parse_version(&mut lines)?;
    let mut rest = lines.map(str::trim).filter(|l| !l.is_empty());
    let database_exists = rest.next() == Some("1");
    Ok(Survey {
        version,
        version_num,
        database_exists,
        available_extensions: rest.map(str::to_string).collect(),
    })
}

/// Exact rows per user table of database `name` (`schema.table` → count).
pub async fn row_counts(db: &dyn Database, name: &str) -> Result<BTreeMap<String, u64>> {
    let sql = "SELECT n.nspname || '.' || c.relname || '|' || \
        (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text \
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
        AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1";
    let out = db.query(name, sql).await?;
    let mut counts = BTreeMap::new();
    for line in out.lines() {
        if let Some((table, n)) = line.rsplit_once('|') {
            let n = n
                .trim()
                .parse()
                .map_err(|_| Error::Database(format!("bad row count line {line:?}")))?;
            counts.insert(table.to_string(), n);
        }
    }
    Ok(counts)
}

/// A client connected to a database, as `pg_stat_activity` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    pub database: String,
    pub application: String,
    pub client: String,
    pub user: String,
    pub pid: String,
}

/// Other clients' sessions on any of `databases` (not this query's own, not background workers).
pub(crate) async fn other_sessions(
    db: &dyn Database,
    databases: &[String],
) -> Result<Vec<Session>> {
    if databases.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = databases.iter().map(|d| quote_literal(d)).collect();
    let sql = format!(
        "SELECT datname || '|' || coalesce(application_name, '') || '|' || \
         coalesce(host(client_addr), 'local socket') || '|' || coalesce(usename, '') || '|' || pid \
         FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND pid <> pg_backend_pid() AND datname IN ({}) ORDER BY datname, pid",
        names.join(", ")
    );
    let out = db.query("postgres", &sql).await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(5, '|');
            Some(Session {
                database: f.next()?.to_string(),
                application: f.next()?.to_string(),
                client: f.next()?.to_string(),
                user: f.next()?.to_string(),
                pid: f.next()?.to_string(),
            })
        })
        .collect())
}

/// Tables whose presence shows that Immich has used a database.
pub use crate::immich::TABLES as IMMICH_TABLES;

/// Tables in (existing) database `name` outside the system schemas, Immich's first.
pub(crate) async fn existing_tables(db: &dyn Database, name: &str) -> Result<Vec<String>> {
    let sql = "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
        AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1";
    let out = db.query(name, sql).await?;
    let mut tables: Vec<String> = out
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    tables.sort_by_key(|t| (!IMMICH_TABLES.contains(&t.as_str()), t.clone()));
    Ok(tables)
}

/// Whether the psql of `psql --version` output `version` knows `\restrict` (added in 17.6, 16.10,
/// 15.14, 14.19 and 13.22; every 18 has it). Unknown versions are taken not to.
pub(crate) fn psql_knows_restrict(version: &str) -> bool {
    let Some(number) = version
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
    else {
        return false;
    };
    let mut parts = number
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), minor) = (parts.next(), parts.next().flatten()) else {
        return false;
    };
    let minor = minor.unwrap_or(0);
    match major {
        18.. => true,
        17 => minor >= 6,
        16 => minor >= 10,
        15 => minor >= 14,
        14 => minor >= 19,
        13 => minor >= 22,
        _ => false,
    }
}

/// An identifier as pg_dump writes it: bare when it is lower-case letters, digits and `_` (not
/// starting with a digit), else double-quoted.
pub(crate) fn quote_ident(s: &str) -> String {
    let bare = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// A SQL string literal.
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
