//! What the drill asks of the replayed database, as Immich would use it: assets per user, albums,
//! earthdistance (Immich's geo search), and the vector indexes of smart search and face search.
//!
//! Both schema generations are served (`asset`/`assets`, `user`/`users`, `album`/`albums`): which
//! tables and extensions exist is asked first. A query that fails is a failed check with psql's
//! message, not an error of the drill.

use serde::Serialize;

use crate::db::Database;
use crate::error::Result;

/// One check of the drill: its verdict, the number it found, and what it saw.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// The number the check counted (assets, albums, tables, indexes, metres).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    pub detail: String,
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Not applicable to this database (the extension or tables are not there).
    Skipped,
}

impl Check {
    pub fn pass(name: &str, count: Option<u64>, detail: String) -> Check {
        Check::new(name, Status::Pass, count, detail)
    }

    pub fn fail(name: &str, detail: String) -> Check {
        Check::new(name, Status::Fail, None, detail)
    }

    pub(super) fn new(name: &str, status: Status, count: Option<u64>, detail: String) -> Check {
        Check {
            name: name.to_string(),
            status,
            count,
            detail,
        }
    }
}

/// The tables and extensions of the database that the checks look for.
struct Present {
    tables: Vec<String>,
    extensions: Vec<String>,
}

impl Present {
    /// The first of `names` that is a table.
    fn table(&self, names: &[&str]) -> Option<String> {
        names
            .iter()
            .find(|n| self.tables.iter().any(|t| t == *n))
            .map(|n| n.to_string())
    }
}

const PRESENT_SQL: &str = "SELECT 't|' || c.relname FROM pg_class c \
    JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') \
    AND c.relname IN ('asset', 'assets', 'user', 'users', 'album', 'albums', 'smart_search', 'face_search') \
    UNION ALL SELECT 'e|' || extname FROM pg_extension";

/// Run every Immich check against database `name`; `assets` is the asset table's row count.
pub(super) async fn run(db: &dyn Database, name: &str, assets: Option<u64>) -> Vec<Check> {
    let present = match db.query(name, PRESENT_SQL).await {
        Ok(out) => parse_present(&out),
        Err(e) => return vec![Check::fail("Immich tables", e.to_string())],
    };
    vec![
        assets_per_user(db, name, &present, assets).await,
        albums(db, name, &present).await,
        earthdistance(db, name, &present).await,
        vector_indexes(db, name, &present).await,
    ]
}

fn parse_present(out: &str) -> Present {
    let mut p = Present {
        tables: Vec::new(),
        extensions: Vec::new(),
    };
    for line in out.lines().map(str::trim) {
        match line.split_once('|') {
            Some(("t", t)) => p.tables.push(t.to_string()),
            Some(("e", e)) => p.extensions.push(e.to_string()),
            _ => {}
        }
    }
    p
}

/// A table name double-quoted (`user` is also a keyword).
fn quoted(table: &str) -> String {
    format!("\"{table}\"")
}

/// Rows of `sql` as `a|b` pairs; a failed query is the check's failure.
async fn pairs(db: &dyn Database, name: &str, sql: &str) -> Result<Vec<(String, String)>> {
    let out = db.query(name, sql).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().rsplit_once('|'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect())
}

/// Assets per user: every asset has its owner among the users.
async fn assets_per_user(
    db: &dyn Database,
    name: &str,
    present: &Present,
    assets: Option<u64>,
) -> Check {
    const CHECK: &str = "assets per user";
    let (Some(users), Some(asset)) = (
        present.table(&["user", "users"]),
        present.table(&["asset", "assets"]),
    ) else {
        return Check::fail(
            CHECK,
            "no user or asset table: not an Immich database".into(),
        );
    };
    let sql = format!(
        "SELECT coalesce(u.email, u.id::text) || '|' || count(a.id) FROM {} u \
         LEFT JOIN {} a ON a.\"ownerId\" = u.id GROUP BY u.id, u.email ORDER BY count(a.id) DESC, 1",
        quoted(&users),
        quoted(&asset)
    );
    let rows = match pairs(db, name, &sql).await {
        Ok(r) => r,
        Err(e) => return Check::fail(CHECK, e.to_string()),
    };
    let counts: Vec<(String, u64)> = rows
        .into_iter()
        .map(|(u, n)| (u, n.parse().unwrap_or(0)))
        .collect();
    let owned: u64 = counts.iter().map(|(_, n)| n).sum();
    let shown: Vec<String> = counts
        .iter()
        .take(5)
        .map(|(u, n)| format!("{u} {n}"))
        .collect();
    let detail = format!(
        "{owned} assets of {} users ({}{})",
        counts.len(),
        shown.join(", "),
        if counts.len() > 5 { ", …" } else { "" }
    );
    match assets {
        Some(total) if total != owned => Check::fail(
            CHECK,
            format!("{detail}; but table {asset} holds {total}: some assets have no owner"),
        ),
        _ => Check::pass(CHECK, Some(owned), detail),
    }
}

/// The albums can be counted.
async fn albums(db: &dyn Database, name: &str, present: &Present) -> Check {
    const CHECK: &str = "albums";
    let Some(album) = present.table(&["album", "albums"]) else {
        return Check::fail(CHECK, "no album table: not an Immich database".into());
    };
    let sql = format!("SELECT count(*) FROM {}", quoted(&album));
    match count(db, name, &sql).await {
        Ok(n) => Check::pass(CHECK, Some(n), format!("{n} albums")),
        Err(e) => Check::fail(CHECK, e),
    }
}

/// One number from `sql`; a failure's message.
async fn count(db: &dyn Database, name: &str, sql: &str) -> std::result::Result<u64, String> {
    let out = db.query(name, sql).await.map_err(|e| e.to_string())?;
    out.trim()
        .parse()
        .map_err(|_| format!("unexpected answer {:?} to {sql}", out.trim()))
}

/// earthdistance answers: the distance between (0, 0) and (1, 1) is about 157 km.
async fn earthdistance(db: &dyn Database, name: &str, present: &Present) -> Check {
    const CHECK: &str = "earthdistance";
    if !present.extensions.iter().any(|e| e == "earthdistance") {
        return Check::new(
            CHECK,
            Status::Skipped,
            None,
            "the database has no earthdistance extension".into(),
        );
    }
    let sql = "SELECT round(earth_distance(ll_to_earth(0, 0), ll_to_earth(1, 1)))::bigint";
    match count(db, name, sql).await {
        Ok(m) if (150_000..=165_000).contains(&m) => Check::pass(
            CHECK,
            Some(m),
            format!("earth_distance((0,0), (1,1)) = {m} m"),
        ),
        Ok(m) => Check::fail(
            CHECK,
            format!("earth_distance((0,0), (1,1)) = {m} m, expected about 157 km"),
        ),
        Err(e) => Check::fail(CHECK, e),
    }
}

const INDEXES_SQL: &str = "SELECT t.relname || '.' || ic.relname || ' (' || am.amname || ')|' || \
    (i.indisvalid AND i.indisready) FROM pg_index i \
    JOIN pg_class t ON t.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid \
    JOIN pg_am am ON am.oid = ic.relam JOIN pg_namespace n ON n.oid = t.relnamespace \
    WHERE n.nspname = 'public' AND t.relname IN ('smart_search', 'face_search') \
    AND am.amname <> 'btree' ORDER BY 1";

/// The vector indexes of smart search and face search are valid and ready.
async fn vector_indexes(db: &dyn Database, name: &str, present: &Present) -> Check {
    const CHECK: &str = "vector indexes";
    let rows = match pairs(db, name, INDEXES_SQL).await {
        Ok(r) => r,
        Err(e) => return Check::fail(CHECK, e.to_string()),
    };
    let tables = present.table(&["smart_search"]).into_iter();
    let tables: Vec<String> = tables.chain(present.table(&["face_search"])).collect();
    if tables.is_empty() {
        return Check::new(
            CHECK,
            Status::Skipped,
            None,
            "no smart_search or face_search table".into(),
        );
    }
    let invalid: Vec<&str> = rows
        .iter()
        .filter(|(_, ok)| ok != "t")
        .map(|(i, _)| i.as_str())
        .collect();
    let all: Vec<&str> = rows.iter().map(|(i, _)| i.as_str()).collect();
    if rows.is_empty() {
        return Check::fail(
            CHECK,
            format!("{} have no vector index", tables.join(" and ")),
        );
    }
    if !invalid.is_empty() {
        return Check::fail(CHECK, format!("not valid: {}", invalid.join(", ")));
    }
    Check::pass(
        CHECK,
        Some(rows.len() as u64),
        format!("valid: {}", all.join(", ")),
    )
}
