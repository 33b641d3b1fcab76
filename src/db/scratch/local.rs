//! The drill's throwaway server in local mode: a cluster made with `initdb` from the PostgreSQL
//! server binaries of this machine, in a folder `immich-backup-drill-…` under the system's temp
//! folder (`TMPDIR`), listening on a Unix socket in that folder only (no TCP; through a short link
//! in `/tmp` when `TMPDIR` is too deep for a socket's path).
//!
//! The folder holds `drill.json` (its [`Owner`]) next to the cluster, so that the next drill can
//! tell a leftover of a killed drill from the cluster of one still running, stop its server and
//! remove it. As root, the server runs as the `postgres` OS user (see [`crate::db::cluster`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::{preload, shell_word, Guard, Owner, Scratch, Wanted, NAME_PREFIX};
use crate::config::{DatabaseConfig, DatabaseMode};
use crate::db::cluster::{self, ServerTools};
use crate::db::local::LocalDatabase;
use crate::error::{Error, IoContext, Result};

/// The marker naming the drill that made the folder.
const OWNER_FILE: &str = "drill.json";
/// The port that names the server's socket file (`.s.PGSQL.5432`); nothing listens on TCP.
const SOCKET_PORT: u16 = 5432;
/// How long `pg_ctl start` waits for the server.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a leftover postmaster gets to stop after SIGQUIT before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A folder without a marker this old is a leftover of a drill killed while it made it.
const UNMARKED_AGE: Duration = Duration::from_secs(60);
/// The tools the drill runs from the bin dir.
const TOOLS: [&str; 4] = ["initdb", "pg_ctl", "postgres", "psql"];

/// Removes a cluster: waits for its start to end, stops its server, then deletes its folder.
pub(super) struct Removal {
    tools: ServerTools,
    dir: PathBuf,
    /// Held while initdb and pg_ctl start run (they cannot be stopped half-way).
    starting: Arc<Mutex<()>>,
}

impl Removal {
    pub(super) async fn run(self) -> Result<()> {
        let _started = self.starting.lock().await;
        tokio::task::spawn_blocking(move || {
            let stopped = self.tools.stop(&data_dir(&self.dir));
            let removed = remove_cluster_dir(&self.dir);
            stopped.and(removed)
        })
        .await
        .map_err(|e| Error::Other(format!("removing the drill's cluster: {e}")))?
    }
}

fn data_dir(dir: &Path) -> PathBuf {
    dir.join("pg").join("data")
}

/// The most bytes a socket's path may have (a Unix socket address holds 108, with its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// The folder the server makes its socket in: the cluster's own `pg` folder when the socket's path
/// fits a Unix socket address, else a short link to it in `/tmp` (a deep `TMPDIR` would make the
/// server fail with "could not create any Unix-domain sockets"), named after the cluster folder.
fn socket_dir(dir: &Path) -> PathBuf {
    let pg = dir.join("pg");
    let file = format!("/.s.PGSQL.{SOCKET_PORT}.lock");
    if pg.as_os_str().len() + file.len() <= SOCKET_PATH_MAX {
        return pg;
    }
    let hash = blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex();
    Path::new("/tmp").join(format!("{NAME_PREFIX}sock-{}", &hash[..16]))
}

/// Make the short link [`socket_dir`] names, when it names one.
fn link_socket_dir(dir: &Path) -> Result<PathBuf> {
    let socket = socket_dir(dir);
    if socket != dir.join("pg") {
        let _ = fs::remove_file(&socket);
        std::os::unix::fs::symlink(dir.join("pg"), &socket).at(&socket)?;
    }
    Ok(socket)
}

/// Socket links in `/tmp` whose cluster is gone (removed by hand, or by another drill's cleanup).
fn remove_dangling_socket_links() {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
        let ours = entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{NAME_PREFIX}sock-"));
        if is_link && ours && !entry.path().exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Remove the cluster folder `dir` and the short link to it, if there is one.
fn remove_cluster_dir(dir: &Path) -> Result<()> {
    let socket = socket_dir(dir);
    if socket != dir.join("pg") {
        let _ = fs::remove_file(&socket);
    }
    fs::remove_dir_all(dir).at(dir)
}

/// initdb and start a cluster whose superuser is the snapshot's role, in a folder removed from the
/// moment it exists.
pub(super) async fn start(cfg: &DatabaseConfig, wanted: &Wanted, owner: &Owner) -> Result<Scratch> {
    let tools = server_tools(&cfg.bin_dir)?;
    let bin_dir = tools.bin_dir.display().to_string();
    let dir = tools.make_dir(None, &format!("{}-", owner.name()))?.keep();
    let starting = Arc::new(Mutex::new(()));
    let removal = Removal {
        tools: tools.clone(),
        dir: dir.clone(),
        starting: starting.clone(),
    };
    let guard = Guard::new(super::Removal::Local(removal), owner);
    let held = starting.lock_owned().await;
    let (made, owner, wanted_there) = (dir.clone(), owner.clone(), wanted.clone());
    let task = tokio::task::spawn_blocking(move || {
        let _held = held;
        init_and_start(&tools, &made, &owner, &wanted_there)
    });
    let started = task
        .await
        .map_err(|e| Error::Other(format!("making the drill's cluster: {e}")))
        .and_then(|r| r);
    if let Err(e) = started {
        let _ = guard.remove().await;
        return Err(e);
    }
    let socket_dir = socket_dir(&dir);
    let db = LocalDatabase::new(DatabaseConfig {
        mode: DatabaseMode::Local,
        username: wanted.username.clone(),
        database: wanted.database.clone(),
        host: socket_dir.display().to_string(),
        port: SOCKET_PORT,
        password: String::new(),
        bin_dir: bin_dir.clone(),
        ..DatabaseConfig::default()
    });
    let what = format!(
        "temporary cluster in {} (server binaries {bin_dir})",
        dir.display()
    );
    Ok(Scratch {
        db: Box::new(db),
        what,
        guard,
    })
}

/// The server binaries: `[database] bin_dir` when it has them, else the newest on this machine.
fn server_tools(configured: &str) -> Result<ServerTools> {
    let has_all = |dir: &PathBuf| TOOLS.iter().all(|t| dir.join(t).is_file());
    let configured_dir = (!configured.is_empty()).then(|| PathBuf::from(configured));
    let dir = [configured_dir, cluster::find_pg_bin_dir()]
        .into_iter()
        .flatten()
        .find(has_all)
        .ok_or_else(|| {
            Error::Database(format!(
                "the drill needs the PostgreSQL server binaries ({}) to make a throwaway cluster, and found none in [database] bin_dir ({}), ${} or /usr/lib/postgresql/*/bin: install the PostgreSQL server package of the snapshot's version (Debian: `apt-get install postgresql`) or set [database] bin_dir to its bin folder",
                TOOLS.join(", "),
                if configured.is_empty() { "not set" } else { configured },
                cluster::PG_BIN_ENV
            ))
        })?;
    ServerTools::new(dir, &TOOLS)
}

fn init_and_start(tools: &ServerTools, dir: &Path, owner: &Owner, wanted: &Wanted) -> Result<()> {
    let (superuser, extensions) = (&wanted.username, &wanted.extensions);
    let marker = dir.join(OWNER_FILE);
    let text = serde_json::to_vec_pretty(owner).expect("owner serialises");
    fs::write(&marker, text).at(&marker)?;
    let data = data_dir(dir);
    tools.initdb(&data, superuser)?;
    let socket_dir = link_socket_dir(dir)?;
    let log = dir.join("pg").join("postgres.log");
    let mut opts = format!(
        "-p {SOCKET_PORT} -k {} -c listen_addresses=''",
        cluster::shell_quote(&socket_dir)?
    );
    if let Some(libs) = preload(extensions, None) {
        let setting = format!("shared_preload_libraries={libs}");
        opts.push_str(&format!(" -c {}", shell_word(&setting)));
    }
    tools
        .start(&data, &log, &opts, START_TIMEOUT)
        .map_err(|e| started_error(e, &log))
}

/// A server that did not start: the end of its log says why.
fn started_error(e: Error, log: &Path) -> Error {
    let text = fs::read_to_string(log).unwrap_or_default();
    let said: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = said[said.len().saturating_sub(3)..].join(" | ");
    Error::Database(format!(
        "the drill's throwaway PostgreSQL did not start ({e}); its log says: {last}. Check that the server binaries can run here (try `initdb` by hand), then run the drill again"
    ))
}

/// Stop and remove the clusters of drills that are gone; what was removed.
pub(super) async fn remove_leftovers() -> Result<Vec<String>> {
    tokio::task::spawn_blocking(|| {
        let base = std::env::temp_dir();
        let Ok(entries) = fs::read_dir(&base) else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            // Folders only: a socket link (see socket_dir) is removed with its cluster.
            if !name.starts_with(NAME_PREFIX) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Some(why) = leftover(&dir) {
                stop_postmaster(&data_dir(&dir));
                remove_cluster_dir(&dir)?;
                removed.push(format!("cluster {} ({why})", dir.display()));
            }
        }
        remove_dangling_socket_links();
        Ok(removed)
    })
    .await
    .map_err(|e| Error::Other(format!("looking for leftover drill clusters: {e}")))?
}

/// Why the cluster folder `dir` is a leftover, or `None` when its drill still runs.
fn leftover(dir: &Path) -> Option<String> {
    let marker = fs::read(dir.join(OWNER_FILE)).ok();
    match marker.and_then(|m| serde_json::from_slice::<Owner>(&m).ok()) {
        Some(owner) => match owner.fate() {
            super::Fate::Gone => Some(owner.describe()),
            super::Fate::Live | super::Fate::Elsewhere => None,
        },
        None => {
            let age = fs::metadata(dir).and_then(|m| m.modified()).ok()?;
            let old = age.elapsed().is_ok_and(|a| a > UNMARKED_AGE);
            old.then(|| "no marker: its drill was killed while making it".to_string())
        }
    }
}

/// SIGQUIT (immediate shutdown) the postmaster of `data` when it still runs there, and SIGKILL it
/// when it has not stopped after [`STOP_GRACE`].
fn stop_postmaster(data: &Path) {
    let Some(pid) = cluster::postmaster_pid(data).filter(|p| serves(*p, data)) else {
        return;
    };
    // SAFETY: kill(2) with plain integers; pid > 0 names the one postmaster checked above.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let deadline = Instant::now() + STOP_GRACE;
    while running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if running(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Whether process `pid` is a postmaster of `data` (and not a process that took its pid since).
fn serves(pid: i32, data: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let data = data.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == data)
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster folder deep enough that its socket's path would not fit a Unix socket address
    /// gets a short link in /tmp (the same for the same folder, so removal finds it); a shallow
    /// one keeps its socket in its own folder.
    #[test]
    fn socket_paths_always_fit_a_unix_socket_address() {
        let shallow = Path::new("/tmp/immich-backup-drill-1234abcd-XyZ123");
        assert_eq!(socket_dir(shallow), shallow.join("pg"));
        let deep = Path::new(
            "/tmp/immich-backup-ci.Lasya7/tmp/immich-backup-test-CQfaOb/drill-tmp/immich-backup-drill-59707b1a-O2Qqvj",
        );
        let socket = socket_dir(deep);
        assert!(socket.starts_with("/tmp") && socket != deep.join("pg"));
        assert_eq!(socket, socket_dir(deep));
        let file = socket.join(format!(".s.PGSQL.{SOCKET_PORT}.lock"));
        assert!(
            file.as_os_str().len() <= SOCKET_PATH_MAX,
            "{}",
            file.display()
        );
    }
}
