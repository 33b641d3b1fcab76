//! The PostgreSQL server binaries on this machine (`initdb`, `pg_ctl`, `postgres`): where they
//! are, and how to run them on a cluster directory of our own.
//!
//! Two kinds of throwaway cluster are made with them: the restore drill's in local mode
//! ([`super::scratch`]), and the sample clusters of the demo and the tests
//! (`demo::sample::PgCluster`). `initdb` refuses to run as root, so when this process is root the
//! server tools run as the `postgres` OS user (through `runuser`), on a directory that user owns.

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};

/// Environment variable that names the directory of the PostgreSQL server binaries to use.
pub const PG_BIN_ENV: &str = "IMMICH_BACKUP_PG_BIN";
/// The OS user the server tools run as when this process is root.
const SERVER_OS_USER: &str = "postgres";

/// Locate PostgreSQL server binaries: `$IMMICH_BACKUP_PG_BIN` if set, else the newest
/// `/usr/lib/postgresql/*/bin` that has initdb, else the directory of `initdb` on `PATH`.
pub fn find_pg_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    newest_debian_pg_bin(Path::new("/usr/lib/postgresql")).or_else(initdb_dir_on_path)
}

/// The `bin` of the highest version under a Debian-style `/usr/lib/postgresql`.
fn newest_debian_pg_bin(root: &Path) -> Option<PathBuf> {
    let entries = fs::read_dir(root).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = parse_version(&e.file_name().to_string_lossy())?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// "15" -> [15], "9.6" -> [9, 6]; None for anything else.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

fn initdb_dir_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file())
}

/// An OS account looked up by name.
#[derive(Clone, Debug)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The server tools of one bin dir, run as the user they need (this one, or `postgres` when this
/// process is root).
#[derive(Clone, Debug)]
pub struct ServerTools {
    pub bin_dir: PathBuf,
    user: Option<OsUser>,
}

impl ServerTools {
    /// The tools in `bin_dir`, which must hold each of `needed`.
    pub fn new(bin_dir: PathBuf, needed: &[&str]) -> Result<ServerTools> {
        if let Some(tool) = needed.iter().find(|t| !bin_dir.join(t).is_file()) {
            return Err(Error::Database(format!(
                "{tool} not found (PostgreSQL binaries dir {})",
                bin_dir.display()
            )));
        }
        Ok(ServerTools {
            bin_dir,
            user: server_user()?,
        })
    }

    /// The OS user the server runs as, when it is not this process's.
    pub fn user(&self) -> Option<&OsUser> {
        self.user.as_ref()
    }

    /// A fresh temp dir (mode 0755) named `<prefix>…` under `base` (the system's temp dir when
    /// `None`), with a `pg` subdir owned by the server user.
    pub fn make_dir(&self, base: Option<&Path>, prefix: &str) -> Result<TempDir> {
        let base = base
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&base).at(&base)?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&base)
            .at(&base)?;
        set_mode(dir.path(), 0o755)?;
        let pg = dir.path().join("pg");
        fs::create_dir(&pg).at(&pg)?;
        set_mode(&pg, 0o755)?;
        if let Some(user) = &self.user {
            std::os::unix::fs::chown(&pg, Some(user.uid), Some(user.gid)).map_err(|e| {
                Error::Other(format!("chown {} to {}: {e}", pg.display(), user.name))
            })?;
        }
        Ok(dir)
    }

    /// `initdb` of `data` with superuser `superuser` (trust auth, UTF8, locale C, no sync).
    pub fn initdb(&self, data: &Path, superuser: &str) -> Result<()> {
        let args = [OsStr::new("-D"), data.as_os_str()];
        let opts = [
            "-U",
            superuser,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ];
        self.run("initdb", &args, &opts, cwd_of(data)).map_err(|e| {
            let hint = self.traversal_hint(data);
            context(e, format!("initdb of {}{hint}", data.display()))
        })
    }

    /// `pg_ctl start` of `data` with the server options `server_opts` (already quoted for the
    /// shell pg_ctl runs the server through), logging to `log`; waits up to `timeout` for the
    /// server to accept connections.
    pub fn start(
        &self,
        data: &Path,
        log: &Path,
        server_opts: &str,
        timeout: Duration,
    ) -> Result<()> {
        let args = [
            OsStr::new("-D"),
            data.as_os_str(),
            OsStr::new("-l"),
            log.as_os_str(),
            OsStr::new("-o"),
            OsStr::new(server_opts),
        ];
        let secs = timeout.as_secs().to_string();
        self.run(
            "pg_ctl",
            &args,
            &["-w", "-t", &secs, "-s", "start"],
            cwd_of(data),
        )
    }

    /// Stop the server of `data` at once (`pg_ctl stop -m immediate`); SIGKILL its postmaster when
    /// that fails. Does nothing when no server runs there.
    pub fn stop(&self, data: &Path) -> Result<()> {
        if !data.join("postmaster.pid").exists() {
            return Ok(());
        }
        let args = [OsStr::new("-D"), data.as_os_str()];
        let stopped = self.run(
            "pg_ctl",
            &args,
            &["-m", "immediate", "-w", "-s", "stop"],
            cwd_of(data),
        );
        if stopped.is_err() {
            kill_postmaster(data);
        }
        stopped.map_err(|e| context(e, "stopping the PostgreSQL cluster"))
    }

    /// Run a server tool as the server user, with a clean environment, in `cwd`.
    fn run(&self, tool: &str, paths: &[&OsStr], opts: &[&str], cwd: &Path) -> Result<()> {
        let program = self.bin_dir.join(tool);
        let mut cmd = match &self.user {
            Some(user) => {
                let mut c = Command::new(runuser_path());
                c.args(["-u", &user.name, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(paths).args(opts);
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C")
            .current_dir(cwd)
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| Error::Database(format!("running {}: {e}", program.display())))?;
        check_output(&out, tool)
    }

    /// When the server user cannot reach `path`, say which folder stops it.
    fn traversal_hint(&self, path: &Path) -> String {
        let Some(user) = &self.user else {
            return String::new();
        };
        let blocked = path.ancestors().skip(2).find(|dir| {
            let Ok(meta) = fs::metadata(dir) else {
                return false;
            };
            let needed = match (meta.uid() == user.uid, meta.gid() == user.gid) {
                (true, _) => 0o100,
                (false, true) => 0o010,
                _ => 0o001,
            };
            meta.mode() & needed == 0
        });
        match blocked {
            Some(dir) => format!(
                " (hint: OS user {} may not traverse {}: make it mode 0755 or pick another base)",
                user.name,
                dir.display()
            ),
            None => String::new(),
        }
    }
}

/// The folder the tools run in: the data directory's parent (the server user may enter it).
fn cwd_of(data: &Path) -> &Path {
    data.parent().unwrap_or(data)
}

/// The OS user the server must run as: None when we are not root, else `postgres`.
fn server_user() -> Result<Option<OsUser>> {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let user = lookup_user(SERVER_OS_USER).map_err(|e| {
        context(
            e,
            "running as root, so initdb must run as the `postgres` OS user, which was not found",
        )
    })?;
    Ok(Some(user))
}

fn lookup_user(name: &str) -> Result<OsUser> {
    let c_name = CString::new(name)
        .map_err(|e| Error::Other(format!("user name {name:?} contains NUL: {e}")))?;
    // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids); getpwnam_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf.len()` is the buffer's real length.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        let e = std::io::Error::from_raw_os_error(rc);
        return Err(Error::Other(format!("getpwnam_r({name:?}) failed: {e}")));
    }
    if found.is_null() {
        return Err(Error::Other(format!("no OS user named {name:?}")));
    }
    Ok(OsUser {
        name: name.to_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

fn runuser_path() -> PathBuf {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("runuser"))
}

/// The postmaster's pid from `data/postmaster.pid`, when the file names one.
pub fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid = text.lines().next()?.trim().parse::<i32>().ok()?;
    (pid > 0).then_some(pid)
}

/// Last resort when `pg_ctl stop` failed: SIGKILL the postmaster named in postmaster.pid.
pub fn kill_postmaster(data: &Path) {
    if let Some(pid) = postmaster_pid(data) {
        // SAFETY: kill(2) takes plain integers; pid > 0 targets exactly one process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Single-quote a path for the shell that pg_ctl runs the server through.
pub fn shell_quote(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .ok_or_else(|| Error::Other(format!("path is not UTF-8: {}", path.display())))?;
    if text.contains('\'') {
        return Err(Error::Other(format!(
            "path contains a single quote: {text}"
        )));
    }
    Ok(format!("'{text}'"))
}

/// A failed tool's output as an error: its stderr (or stdout), the end of it.
pub fn check_output(out: &Output, what: &str) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    Err(Error::Database(format!(
        "{what} failed ({}): {}",
        out.status,
        tail(text.trim(), 4000)
    )))
}

/// `e` with `what` (what was being done) in front of its message; a database or other error keeps
/// its kind, anything else becomes [`Error::Other`].
pub fn context(e: Error, what: impl std::fmt::Display) -> Error {
    match e {
        Error::Database(message) => Error::Database(format!("{what}: {message}")),
        Error::Other(message) => Error::Other(format!("{what}: {message}")),
        e => Error::Other(format!("{what}: {e}")),
    }
}

/// The last `max` bytes of `text` (on a char boundary).
pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// chmod, with the path in the error.
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Other(format!("chmod {mode:o} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_debian_version_wins() {
        let root = tempfile::tempdir().unwrap();
        for (version, has_initdb) in [("9.6", true), ("15", true), ("16", false), ("13", true)] {
            let bin = root.path().join(version).join("bin");
            fs::create_dir_all(&bin).unwrap();
            if has_initdb {
                fs::write(bin.join("initdb"), "").unwrap();
            }
        }
        fs::create_dir_all(root.path().join("not-a-version/bin")).unwrap();
        let found = newest_debian_pg_bin(root.path()).unwrap();
        assert_eq!(found, root.path().join("15/bin"));
        assert_eq!(newest_debian_pg_bin(&root.path().join("missing")), None);
    }

    #[test]
    fn tail_keeps_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
