//! Docker mode against a real Docker Engine: dump and replay run inside Postgres containers.
//!
//! No registry is reachable, so the containers run an empty imported image (`hostroot:latest`)
//! with the host's `/usr`, `/lib`, `/bin` and `/etc` bind-mounted read-only, as
//! `../shared/reference/test-infrastructure.md` describes. Each Postgres container runs as the
//! `postgres` uid on a data directory made on the host by [`PgCluster`] (started, filled, stopped).
//!
//! Without a daemon at `/var/run/docker.sock` these tests fail when `CI` is set (`.ci/run` starts
//! one) and are skipped otherwise.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use immich_backup::crypto::{self, Identities};
use immich_backup::demo::sample::{self, PgCluster};
use immich_backup::error::exit;
use immich_backup::format::Manifest;
use immich_backup::repo::snapshots;
use immich_backup::repo::Repository;
use immich_backup::{config::StorageConfig, demo, restore};

const IMAGE: &str = "hostroot:latest";
const SOCKET: &str = "/var/run/docker.sock";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const EXTENSION_DIR: &str = "/usr/share/postgresql/15/extension";
const ASSETS: usize = 300;
const BIN: &str = env!("CARGO_BIN_EXE_immich-backup");

// ---------------------------------------------------------------------------------------------
// Docker helpers (the `docker` CLI: the code under test talks to the Engine API itself).

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the docker CLI")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Is a daemon reachable? Without one: fail under CI, skip otherwise.
fn docker_or_skip() -> bool {
    let reachable = Path::new(SOCKET).exists()
        && Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if reachable {
        ensure_image();
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("no Docker daemon at {SOCKET}: .ci/run must install docker.io and start dockerd");
    }
    eprintln!("SKIPPED: no Docker daemon at {SOCKET} (start dockerd; under CI this fails)");
    false
}

/// Build `hostroot:latest` (an empty image) once, safely under parallel tests and processes.
fn ensure_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("immich-backup-hostroot.lock"))
            .expect("open the image lock file");
        // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
        let rc =
            unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock the image lock file");
        if docker(&["image", "inspect", IMAGE]).status.success() {
            return;
        }
        let empty = tempfile::tempdir().unwrap();
        let tar_file = empty.path().join("empty.tar");
        let made = Command::new("tar")
            .arg("-C")
            .arg(empty.path())
            .arg("-cf")
            .arg(&tar_file)
            .args(["--exclude", "empty.tar", "."])
            .status()
            .expect("run tar");
        assert!(made.success(), "tar of an empty folder");
        let out = Command::new("docker")
            .args(["import", tar_file.to_str().unwrap(), IMAGE])
            .output()
            .expect("docker import");
        assert!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(lock);
    });
}

/// A unique container name for this test process.
fn unique(role: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "ib-test-{}-{}-{role}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A container removed (`docker rm -f`) on drop.
struct Container {
    name: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

impl Container {
    /// `docker run -d` (or `docker create` when `start` is false) of the host-root image.
    fn hostroot(role: &str, extra: &[String], cmd: &[&str], start: bool) -> Container {
        let name = unique(role);
        let mut args: Vec<String> = vec![
            if start { "run" } else { "create" }.into(),
            "--name".into(),
            name.clone(),
            "--label".into(),
            "immich-backup-test=1".into(),
        ];
        if start {
            args.insert(1, "-d".into());
        }
        for m in ["/usr", "/lib", "/lib64", "/bin", "/etc"] {
            if Path::new(m).exists() {
                args.push("-v".into());
                args.push(format!("{m}:{m}:ro"));
            }
        }
        args.extend(extra.iter().cloned());
        args.push(IMAGE.into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs);
        Container { name }
    }

    /// A long-running stand-in for `immich_server`.
    fn fake_server() -> Container {
        Container::hostroot("server", &["--init".into()], &["/bin/sleep", "3600"], true)
    }

    fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "--format", format, &self.name])
    }

    fn running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    /// `psql` in the container; its stdout.
    fn psql(&self, db: &str, sql: &str) -> String {
        docker_ok(&[
            "exec",
            &self.name,
            &format!("{PG_BIN}/psql"),
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            db,
            "-c",
            sql,
        ])
    }

    /// A canonical `pg_dump` of `db`, taken inside the container.
    fn canonical_dump(&self, db: &str) -> String {
        let dump = docker_ok(&[
            "exec",
            &self.name,
            &format!("{PG_BIN}/pg_dump"),
            "--no-owner",
            "--no-privileges",
            "-U",
            "postgres",
            "-d",
            db,
        ]);
        sample::canonicalize_dump(&dump)
    }
}

/// A Postgres container on a data directory made on the host; the cluster (stopped) keeps the
/// directory alive and removes it on drop, after the container is gone.
struct PgContainer {
    container: Container,
    _cluster: PgCluster,
}

impl std::ops::Deref for PgContainer {
    type Target = Container;
    fn deref(&self) -> &Container {
        &self.container
    }
}

impl PgContainer {
    /// initdb on the host (as the `postgres` user), optionally an Immich-like database, then
    /// Postgres in a container on that directory. `extra` adds `docker run` arguments.
    fn start(base: &Path, immich_assets: Option<usize>, extra: &[String]) -> PgContainer {
        let mut cluster = PgCluster::start(Some(base)).expect("start a host cluster");
        if let Some(n) = immich_assets {
            sample::create_immich_like_db(&cluster, "immich", n).expect("Immich-like database");
        }
        // The cluster runs with synchronous_commit=off and stops with `-m immediate`: flush first.
        cluster.psql("postgres", "CHECKPOINT").expect("checkpoint");
        cluster.stop().expect("stop the host cluster");
        let pgd = cluster.data_dir().parent().unwrap().to_path_buf();
        let (uid, gid) = postgres_ids();
        // --pid=host: the postmaster.pid Postgres writes into the host-side data directory then
        // holds a host PID, so a cleanup that reads it (like .ci/run's) cannot signal an unrelated
        // host process with the container's PID 1.
        let mut args = vec![
            "--pid=host".to_string(),
            "-u".into(),
            format!("{uid}:{gid}"),
            "-v".into(),
            format!("{}:/pgd", pgd.display()),
            "--tmpfs".into(),
            format!("/var/run/postgresql:uid={uid},gid={gid}"),
            "--tmpfs".into(),
            "/tmp".into(),
        ];
        args.extend(extra.iter().cloned());
        let container = Container::hostroot(
            "postgres",
            &args,
            &[
                &format!("{PG_BIN}/postgres"),
                "-D",
                "/pgd/data",
                "-k",
                "/var/run/postgresql",
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
            ],
            true,
        );
        container.wait_ready();
        PgContainer {
            container,
            _cluster: cluster,
        }
    }
}

impl Container {
    /// Poll `pg_isready` in the container (crash recovery may take a moment).
    fn wait_ready(&self) {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let isready = format!("{PG_BIN}/pg_isready");
        loop {
            let out = docker(&["exec", &self.name, &isready, "-q", "-U", "postgres"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Postgres in {} did not start: {}",
                self.name,
                docker_ok(&["logs", &self.name])
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

fn postgres_ids() -> (u32, u32) {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let out = Command::new("id")
        .args(["-g", "postgres"])
        .output()
        .unwrap();
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (uid, gid)
}

// ---------------------------------------------------------------------------------------------
// The tool, through its binary.

/// A work folder with a store, an identity, a sample library and config files.
struct Setup {
    dir: tempfile::TempDir,
    recipient: String,
    signing_key: String,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("ib-docker-test-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("store")).unwrap();
        let key = crypto::generate_key();
        crypto::write_identity_file(&dir.path().join("identity.txt"), &key).unwrap();
        Setup {
            dir,
            recipient: key.recipient,
            signing_key: {
                use age::secrecy::ExposeSecret;
                key.signing.to_text().expose_secret().to_string()
            },
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn source(&self) -> PathBuf {
        self.path().join("source")
    }

    fn identity(&self) -> PathBuf {
        self.path().join("identity.txt")
    }

    /// A config file for `container`; `extra` goes into `[database]`. Unless `extra` names one,
    /// the server container is one that does not exist.
    fn config(&self, name: &str, upload: &Path, container: &str, extra: &str) -> PathBuf {
        let server = if extra.contains("server_container") {
            String::new()
        } else {
            format!("server_container = {:?}\n", unique("no-server"))
        };
        let text = format!(
            "[immich]\nupload_location = {:?}\n\n[database]\ncontainer = {container:?}\n{server}{extra}\n\n\
             [storage]\nurl = \"file://{}\"\n\n[encryption]\nrecipients = [{:?}]\nidentity_file = {:?}\nsigning_key = {:?}\n\n\
             [backup]\ncache_dir = {:?}\n",
            upload.display().to_string(),
            self.path().join("store").display(),
            self.recipient,
            self.identity().display().to_string(),
            self.signing_key,
            self.path().join("cache").display().to_string(),
        );
        let path = self.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// What a run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Run the binary with `args`. PATH is empty: in Docker mode no host tool may be needed.
/// `IB_TEST_LOG` (a tracing filter) and `IB_TEST_LINES` (stderr lines shown) help debugging.
fn run(args: &[&str]) -> Run {
    let t = Instant::now();
    let out = command(args).output().expect("run immich-backup");
    finished(args, t, out)
}

/// The binary with `args`, as [`run`] runs it.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--no-progress")
        .env("PATH", "/nonexistent")
        .env_remove("DOCKER_HOST")
        .env_remove("IMMICH_BACKUP_CONFIG")
        .env(
            "IMMICH_BACKUP_LOG",
            std::env::var("IB_TEST_LOG").unwrap_or_else(|_| "immich_backup=info".into()),
        )
        .stdin(Stdio::null());
    cmd
}

/// What a run of `args`, started at `t`, printed; shown on the test's stderr.
fn finished(args: &[&str], t: Instant, out: Output) -> Run {
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "immich-backup {args:?}: exit {} in {:?}\n{}",
        r.code,
        t.elapsed(),
        last_lines(
            &r.stderr,
            std::env::var("IB_TEST_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(6)
        )
    );
    r
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The error line the binary printed.
fn error_line(r: &Run) -> &str {
    r.stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in stderr:\n{}", r.stderr))
}

/// Sample library + source container + a Docker-mode backup; returns the source container.
fn backed_up_source(s: &Setup) -> PgContainer {
    sample::create_sample_library_for(&s.source(), ASSETS).unwrap();
    let source = PgContainer::start(s.path(), Some(ASSETS), &[]);
    let cfg = s.config("source", &s.source(), &source.name, "");
    let r = run(&["--config", cfg.to_str().unwrap(), "backup"]);
    assert_eq!(r.code, exit::OK, "backup failed:\n{}", r.stderr);
    source
}

fn manifest(s: &Setup) -> Manifest {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Repository::open(&StorageConfig {
            url: format!("file://{}", s.path().join("store").display()),
            concurrency: 4,
            ..StorageConfig::default()
        })
        .unwrap();
        let ids = std::sync::Arc::new(Identities::load(&s.identity()).unwrap());
        let id = snapshots::resolve(&store, "latest").await.unwrap();
        restore::read_manifest(&store.unlock(ids).await.unwrap(), &id)
            .await
            .unwrap()
    })
}

fn has_database(c: &Container, db: &str) -> bool {
    c.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
    ) == "1"
}

/// Nothing under the target but (at most) empty folders.
fn nothing_written(target: &Path) -> bool {
    !target.exists()
        || walkdir::WalkDir::new(target)
            .into_iter()
            .flatten()
            .all(|e| e.file_type().is_dir())
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn backup_and_restore_round_trip_inside_containers() {
    if !docker_or_skip() {
        return;
    }
    let t = Instant::now();
    let s = Setup::new();
    let source = backed_up_source(&s);

    let m = manifest(&s);
    assert_eq!(m.database.mode, "docker");
    let image = m.database.image.clone().expect("the image is recorded");
    assert!(
        image.starts_with("hostroot:latest (sha256:"),
        "image {image:?}"
    );
    let image_id = source.inspect("{{.Image}}");
    assert!(image.contains(&image_id), "{image} lacks {image_id}");
    assert!(m.database.server_version.starts_with("15."));
    let ext: Vec<(&str, &str)> = m
        .database
        .extensions
        .iter()
        .map(|e| (e.name.as_str(), e.version.as_str()))
        .collect();
    for name in ["cube", "earthdistance", "pg_trgm", "unaccent", "uuid-ossp"] {
        assert!(
            ext.iter().any(|(n, v)| *n == name && !v.is_empty()),
            "{name} missing from {ext:?}"
        );
    }
    assert_eq!(
        m.database.row_counts.get("public.asset"),
        Some(&(ASSETS as u64))
    );

    let target_db = PgContainer::start(s.path(), None, &[]);
    let target = s.path().join("restored");
    let cfg = s.config("target", &target, &target_db.name, "");
    let r = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "restore",
        "latest",
    ]);
    assert_eq!(r.code, exit::OK, "restore failed:\n{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["rows_match"], true, "{report}");
    assert!(report["server_version"]
        .as_str()
        .unwrap()
        .starts_with("15."));

    let a = source.canonical_dump("immich");
    let b = target_db.canonical_dump("immich");
    assert!(a.len() > 10_000 && a.contains("COPY public.asset "));
    assert!(a == b, "the restored database differs from the source");
    let diff = demo::compare_trees(
        &s.source(),
        &target,
        &["library".into(), "upload".into(), "profile".into()],
    )
    .unwrap();
    assert!(diff.compared > 10);
    assert!(diff.differences.is_empty(), "{:?}", diff.differences);
    for folder in immich_backup::immich::FOLDERS {
        assert!(target.join(folder).join(".immich").is_file(), "{folder}");
    }
    eprintln!("round trip took {:?}", t.elapsed());
}

#[test]
fn restore_refuses_while_the_server_runs_and_stop_server_restarts_it() {
    if !docker_or_skip() {
        return;
    }
    let s = Setup::new();
    let _source = backed_up_source(&s);
    let server = Container::fake_server();
    let target_db = PgContainer::start(s.path(), None, &[]);
    let target = s.path().join("restored");
    let extra = format!("server_container = {:?}", server.name);
    let cfg = s.config("target", &target, &target_db.name, &extra);
    let cfg = cfg.to_str().unwrap();

    let r = run(&["--config", cfg, "restore", "latest"]);
    assert_eq!(r.code, exit::NOT_FRESH, "{}", r.stderr);
    let msg = error_line(&r);
    assert!(
        msg.contains(&server.name) && msg.contains("is running"),
        "{msg}"
    );
    assert!(
        msg.contains("--stop-server") && msg.contains("docker stop"),
        "{msg}"
    );
    assert!(
        server.running(),
        "a refused restore must leave the server alone"
    );
    assert!(!has_database(&target_db, "immich"));
    assert!(nothing_written(&target));

    // A dry run with --stop-server checks everything and stops nothing.
    let r = run(&["--config", cfg, "restore", "--dry-run", "--stop-server"]);
    assert_eq!(r.code, exit::OK, "{}", r.stderr);
    assert!(server.running());
    let started_before = server.inspect("{{.State.StartedAt}}");

    let r = run(&["--config", cfg, "restore", "--stop-server", "latest"]);
    assert_eq!(r.code, exit::OK, "{}", r.stderr);
    assert!(
        r.stderr.contains("stopping the Immich server container"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("starting the Immich server container again"),
        "{}",
        r.stderr
    );
    assert!(
        server.running(),
        "the server must run again after the restore"
    );
    let started_after = server.inspect("{{.State.StartedAt}}");
    assert_ne!(
        started_before, started_after,
        "the server was not restarted"
    );
    let finished = server.inspect("{{.State.FinishedAt}}");
    assert!(
        !finished.starts_with("0001-"),
        "the server was never stopped"
    );
    assert!(has_database(&target_db, "immich"));
    assert_eq!(
        target_db.psql("immich", "SELECT count(*) FROM asset"),
        ASSETS.to_string()
    );

    // A restore that fails its checks (the database is no longer fresh) before writing anything
    // starts the server it stopped again.
    let r = run(&["--config", cfg, "restore", "--stop-server", "latest"]);
    assert_eq!(r.code, exit::NOT_FRESH, "{}", r.stderr);
    assert!(error_line(&r).contains("already holds"), "{}", r.stderr);
    assert!(
        server.running(),
        "the server must run again after a refused restore"
    );
    assert_ne!(server.inspect("{{.State.StartedAt}}"), started_after);
}

#[test]
fn restore_stops_before_writing_when_the_target_lacks_an_extension() {
    if !docker_or_skip() {
        return;
    }
    let s = Setup::new();
    let _source = backed_up_source(&s);
    // The target server's extension folder without earthdistance: the server really cannot
    // install it (pg_available_extensions does not list it).
    let ext = s.path().join("extension-without-earthdistance");
    std::fs::create_dir(&ext).unwrap();
    for e in std::fs::read_dir(EXTENSION_DIR).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("earthdistance") {
            std::fs::copy(e.path(), ext.join(&name)).unwrap();
        }
    }
    let mount = vec!["-v".into(), format!("{}:{EXTENSION_DIR}:ro", ext.display())];
    let target_db = PgContainer::start(s.path(), None, &mount);
    assert_eq!(
        target_db.psql(
            "postgres",
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'earthdistance'"
        ),
        "0"
    );
    let target = s.path().join("restored");
    let cfg = s.config("target", &target, &target_db.name, "");

    let r = run(&["--config", cfg.to_str().unwrap(), "restore", "latest"]);
    assert_eq!(r.code, exit::DATABASE, "{}", r.stderr);
    let msg = error_line(&r);
    assert!(msg.contains("lacks extension earthdistance"), "{msg}");
    assert!(msg.contains("ghcr.io/immich-app/postgres:15-"), "{msg}");
    assert!(msg.contains("hostroot:latest"), "{msg}");
    assert!(msg.contains("nothing was written"), "{msg}");
    assert!(
        !has_database(&target_db, "immich"),
        "the database was written"
    );
    assert!(nothing_written(&target), "files were written");
}

/// The documented message and exit code 16 for each Docker failure.
#[test]
fn docker_errors_have_their_message_and_exit_code() {
    if !docker_or_skip() {
        return;
    }
    let s = Setup::new();
    sample::create_sample_library(&s.source()).unwrap();
    let backup = |cfg: &Path| run(&["--config", cfg.to_str().unwrap(), "backup"]);
    let expect = |r: &Run, parts: &[&str]| {
        assert_eq!(r.code, exit::DOCKER, "{}", r.stderr);
        let msg = error_line(r);
        assert!(msg.starts_with("error: docker: "), "{msg}");
        for p in parts {
            assert!(msg.contains(p), "{msg:?} lacks {p:?}");
        }
    };

    // The socket is missing.
    let missing_socket = s.path().join("no-such-dir/docker.sock");
    let cfg = s.config(
        "socket",
        &s.source(),
        "immich_postgres",
        &format!("docker_host = \"unix://{}\"", missing_socket.display()),
    );
    expect(
        &backup(&cfg),
        &[
            &format!(
                "the Docker socket {} does not exist",
                missing_socket.display()
            ),
            "docker_host",
        ],
    );

    // The container does not exist.
    let name = unique("never-created");
    let cfg = s.config("missing", &s.source(), &name, "");
    expect(
        &backup(&cfg),
        &[
            &format!("container {name} does not exist"),
            "docker compose create",
        ],
    );

    // The container exists but is not running.
    let created = Container::hostroot("created", &[], &["/bin/true"], false);
    let cfg = s.config("stopped", &s.source(), &created.name, "");
    expect(
        &backup(&cfg),
        &[
            &format!("container {} is not running (created)", created.name),
            &format!("docker start {}", created.name),
        ],
    );

    // The container has psql and pg_isready but no pg_dumpall on its PATH.
    let tools = s.path().join("tools");
    std::fs::create_dir(&tools).unwrap();
    for t in ["psql", "pg_isready"] {
        std::os::unix::fs::symlink(format!("{PG_BIN}/{t}"), tools.join(t)).unwrap();
    }
    let no_dump = PgContainer::start(
        s.path(),
        Some(20),
        &[
            "-v".into(),
            format!("{}:/tools:ro", tools.display()),
            "-e".into(),
            "PATH=/tools".into(),
        ],
    );
    let cfg = s.config("nodump", &s.source(), &no_dump.name, "");
    expect(
        &backup(&cfg),
        &[
            &format!("pg_dumpall was not found in container {}", no_dump.name),
            "PATH",
        ],
    );
    // No snapshot was made by any of them.
    let snaps = run(&["--config", cfg.to_str().unwrap(), "--json", "snapshots"]);
    assert_eq!(snaps.code, exit::OK, "{}", snaps.stderr);
    assert_eq!(snaps.stdout.trim(), "[]");
}

/// Permission denied on the socket: the tool run as an unprivileged user.
#[test]
fn docker_socket_permission_denied_has_its_message() {
    if !docker_or_skip() {
        return;
    }
    // Only meaningful when we are root and can run the binary as `nobody`.
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to run the binary as nobody");
        return;
    }
    let s = Setup::new();
    std::fs::create_dir(s.source()).unwrap();
    std::fs::create_dir(s.source().join("library")).unwrap();
    let cfg = s.config("perm", &s.source(), "immich_postgres", "");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = s.path().join("store");
    let out = Command::new("chown")
        .args(["-R", "nobody"])
        .arg(&store)
        .arg(s.path().join("identity.txt"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let runuser = ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("runuser");
    let out = Command::new(runuser)
        .args(["-u", "nobody", "--", BIN, "--no-progress", "--config"])
        .arg(&cfg)
        .arg("backup")
        .env_remove("DOCKER_HOST")
        .env("HOME", s.path())
        .output()
        .unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(r.code, exit::DOCKER, "{}\n{}", r.stdout, r.stderr);
    let msg = error_line(&r);
    eprintln!("{msg}");
    assert!(
        msg.contains(&format!("permission denied on the Docker socket {SOCKET}")),
        "{msg}"
    );
    assert!(msg.contains("docker` group"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// The restore drill (serialised with each other by .config/nextest.toml: a drill removes the
// leftovers of any killed drill on the host).

const DRILL_LABEL: &str = "immich-backup.drill";

/// The drill containers (all, running or not) made by the drill process `pid`.
fn drill_containers(pid: u32) -> Vec<String> {
    let filter = format!("label={DRILL_LABEL}.pid={pid}");
    let names = docker_ok(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]);
    names.lines().map(str::to_string).collect()
}

/// Every file and folder under `root`, with size, mode and mtime: "nothing was written" checks.
fn listing(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .flatten()
        .map(|e| {
            let m = e.path().symlink_metadata().unwrap();
            format!(
                "{} {} {:o} {}.{}",
                e.path().display(),
                m.len(),
                m.mode(),
                m.mtime(),
                m.mtime_nsec()
            )
        })
        .collect()
}

/// A drill running in the background, and the drill container it made once it has one.
struct DrillRun {
    child: std::process::Child,
    args: Vec<String>,
    started: Instant,
}

impl DrillRun {
    fn spawn(args: &[&str]) -> DrillRun {
        let child = command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the drill");
        DrillRun {
            child,
            args: args.iter().map(|a| a.to_string()).collect(),
            started: Instant::now(),
        }
    }

    /// The drill container, once it exists (and `ready` says so of it), or `None` when the drill
    /// ended first.
    fn container(&mut self, ready: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Some(name) = drill_containers(self.child.id()).into_iter().next() {
                if ready(&name) {
                    return Some(name);
                }
            }
            if self.child.try_wait().unwrap().is_some() {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the drill made no container within 120 s");
    }

    fn wait(self) -> Run {
        let out = self.child.wait_with_output().unwrap();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        finished(&args, self.started, out)
    }
}

/// A backed-up Docker-mode source and the drill's config file; `None` without a daemon (skipped).
fn drill_source() -> Option<(Setup, PgContainer, String)> {
    if !docker_or_skip() {
        return None;
    }
    let s = Setup::new();
    let source = backed_up_source(&s);
    let cfg = s.config("drill", &s.source(), &source.name, "");
    let cfg = cfg.to_str().unwrap().to_string();
    Some((s, source, cfg))
}

/// Postgres in the drill container `name` accepts connections.
fn serving(name: &str) -> bool {
    docker(&["exec", name, "pg_isready", "-q"]).status.success()
}

/// What must not change while a drill runs: the real database, its container, UPLOAD_LOCATION.
fn real_state(s: &Setup, source: &PgContainer) -> (String, String, Vec<String>) {
    (
        source.canonical_dump("immich"),
        source.inspect("{{.State.StartedAt}} {{.State.Running}}"),
        listing(&s.source()),
    )
}

#[test]
fn drill_replays_into_a_throwaway_container_and_removes_it() {
    let Some((s, source, cfg)) = drill_source() else {
        return;
    };
    let before = real_state(&s, &source);

    let mut drill = DrillRun::spawn(&["--config", &cfg, "--json", "drill"]);
    let pid = drill.child.id();
    // Its data volume and network mode, read while it runs.
    let seen = std::cell::RefCell::new(None);
    let found = drill.container(|name| {
        let format = "{{.State.Running}} {{.HostConfig.NetworkMode}} {{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}}{{end}}{{end}}";
        let out = docker(&["inspect", "--format", format, name]);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let running = text.starts_with("true ");
        if running {
            *seen.borrow_mut() = Some(text);
        }
        running
    });
    let r = drill.wait();
    assert_eq!(r.code, exit::OK, "{}", r.stderr);
    let name = found.expect("a drill container ran while the drill ran");
    assert!(name.starts_with("immich-backup-drill-"), "{name}");
    let seen = seen.into_inner().unwrap();
    let mut seen = seen.split(' ').skip(1);
    let (network, volume) = (
        seen.next().unwrap().to_string(),
        seen.next().unwrap_or_default().to_string(),
    );

    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let server = report["server"].as_str().unwrap();
    assert!(server.contains(&name), "{server}");
    assert!(
        server.contains("the snapshot's image hostroot:latest (sha256:"),
        "{server}"
    );
    assert_eq!(network, "none", "the drill container has no network");
    let checks: Vec<(&str, &str)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    for (check, status) in [
        ("dump", "pass"),
        ("replay", "pass"),
        ("row counts", "pass"),
        ("assets per user", "pass"),
        ("albums", "pass"),
        ("earthdistance", "pass"),
        ("vector indexes", "skipped"),
    ] {
        assert!(
            checks.contains(&(check, status)),
            "{check} {status}: {checks:?}"
        );
    }
    let assets = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "assets per user");
    assert_eq!(assets.unwrap()["count"], ASSETS);
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["dump", "server", "replay", "checks"]);
    let expected = report["expected_restore_secs"].as_f64().unwrap();
    assert!(expected > 0.0);
    eprintln!(
        "docker drill: expected restore time {expected:.2}s, phases {}",
        report["phases"]
    );

    assert!(
        drill_containers(pid).is_empty(),
        "the drill container is removed"
    );
    assert!(!volume.is_empty(), "the drill's data volume");
    assert!(
        !docker(&["volume", "inspect", &volume]).status.success(),
        "its data volume {volume} is removed with it"
    );
    assert!(
        before == real_state(&s, &source),
        "the real database or UPLOAD_LOCATION changed"
    );
}

#[test]
fn a_killed_drill_leaves_a_container_that_the_next_drill_removes() {
    let Some((_s, _source, cfg)) = drill_source() else {
        return;
    };
    let cfg = cfg.as_str();

    // Killed (SIGKILL: nothing can clean up) once its Postgres runs.
    let mut drill = DrillRun::spawn(&["--config", cfg, "drill"]);
    let killed_pid = drill.child.id();
    let name = drill.container(serving).expect("the drill's Postgres runs");
    drill.child.kill().unwrap();
    drill.wait();
    assert_eq!(
        docker_ok(&["inspect", "--format", "{{.State.Running}}", &name]),
        "true",
        "a killed drill leaves its container running"
    );

    let r = run(&["--config", cfg, "--json", "drill"]);
    assert_eq!(r.code, exit::OK, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let removed = report["leftovers_removed"].to_string();
    assert!(removed.contains(&name), "{removed}");
    assert!(
        removed.contains(&format!("drill pid {killed_pid}")),
        "{removed}"
    );
    assert!(
        r.stderr
            .contains("removed the throwaway server of an interrupted drill: container"),
        "{}",
        r.stderr
    );
    assert!(
        drill_containers(killed_pid).is_empty(),
        "the leftover is gone"
    );
    assert!(!docker(&["inspect", &name]).status.success());
    assert_eq!(report["ok"], true, "{report}");
}

#[test]
fn a_drill_of_a_damaged_dump_fails_with_exit_4_and_starts_nothing() {
    let Some((s, _source, cfg)) = drill_source() else {
        return;
    };
    let m = manifest(&s);
    let dump = s.path().join("store").join(&m.dump.key);
    let mut bytes = std::fs::read(&dump).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&dump, bytes).unwrap();

    let mut drill = DrillRun::spawn(&["--config", &cfg, "--json", "drill"]);
    let pid = drill.child.id();
    assert_eq!(drill.container(|_| true), None, "no container was made");
    let r = drill.wait();
    assert_eq!(r.code, exit::DAMAGED, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["server"], "", "{report}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1, "{report}");
    assert_eq!(checks[0]["name"], "dump");
    assert_eq!(checks[0]["status"], "fail");
    let detail = checks[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&m.dump.key) && detail.contains("corrupted"),
        "{detail}"
    );
    assert!(drill_containers(pid).is_empty());
}

#[test]
fn an_interrupted_drill_removes_its_container_before_it_exits() {
    let Some((_s, _source, cfg)) = drill_source() else {
        return;
    };
    let mut drill = DrillRun::spawn(&["--config", &cfg, "drill"]);
    let pid = drill.child.id();
    let name = drill.container(serving).expect("the drill's Postgres runs");
    // SAFETY: kill(2) with plain integers, to our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let r = drill.wait();
    assert_eq!(r.code, exit::INTERRUPTED, "{}", r.stderr);
    assert!(r.stderr.contains("stopped half-way"), "{}", r.stderr);
    assert!(drill_containers(pid).is_empty(), "its container is removed");
    assert!(!docker(&["inspect", &name]).status.success());
}
