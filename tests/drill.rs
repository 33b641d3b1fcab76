//! `immich-backup drill` in local mode, through the binary: the sample Immich is backed up into a
//! folder store, then drilled into a temporary `initdb` cluster. The cluster exists while the drill
//! runs and is gone (folder and server) afterwards; a drill killed with SIGKILL leaves its cluster
//! running, and the next drill stops and removes it; missing server binaries are named with what
//! to install; the drill takes the store's shared lock; a damaged file in the sample it reads back
//! fails the drill with its path. The real database and UPLOAD_LOCATION stay as they were.
//!
//! Each drill gets its own `TMPDIR` (where its cluster goes), so the tests cannot see each other's
//! clusters; `.config/nextest.toml` runs the drill tests one at a time anyway.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use immich_backup::error::exit;

/// The drill's `TMPDIR`: mode 0755, as the `postgres` user must traverse it when the test is root.
fn drill_tmp(src: &Source) -> PathBuf {
    let dir = src.work.path().join("drill-tmp");
    fs::create_dir(&dir).unwrap();
    for d in [src.work.path(), dir.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// A backed-up source, its drill config and the drill's `TMPDIR`.
fn backed_up() -> (Source, PathBuf, PathBuf) {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let config = src.write_config("drill.toml");
    let tmp = drill_tmp(&src);
    (src, config, tmp)
}

/// The drill's cluster folders in `tmp`.
fn clusters(tmp: &Path) -> Vec<PathBuf> {
    fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("immich-backup-drill-"))
        })
        .collect()
}

/// The postmaster of a cluster folder, once its server accepts connections.
fn serving_postmaster(cluster: &Path) -> Option<i32> {
    let pid_file = fs::read_to_string(cluster.join("pg/data/postmaster.pid")).ok()?;
    let lines: Vec<&str> = pid_file.lines().collect();
    let ready = lines.last().is_some_and(|l| l.trim() == "ready");
    ready.then(|| lines[0].trim().parse().ok()).flatten()
}

fn process_runs(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Start `drill --json` with `tmp` as its `TMPDIR`.
fn spawn_drill(config: &Path, tmp: &Path) -> Child {
    command(Some(config), &["--json", "drill"])
        .env("TMPDIR", tmp)
        .env("IMMICH_BACKUP_LOG", "immich_backup=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the drill")
}

/// Wait until `tmp` holds a cluster whose server runs; its folder and postmaster.
fn wait_for_cluster(child: &mut Child, tmp: &Path) -> (PathBuf, i32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some((dir, pid)) = clusters(tmp)
            .into_iter()
            .find_map(|d| serving_postmaster(&d).map(|p| (d, p)))
        {
            return (dir, pid);
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the drill ended before its cluster ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no drill cluster within 120 s");
}

fn finish(child: Child) -> Run {
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The real database and UPLOAD_LOCATION, for before/after comparisons.
fn real_state(src: &Source) -> (String, std::collections::BTreeMap<String, String>) {
    (src.dump(), tree_state(&src.upload))
}

#[test]
fn a_local_drill_replays_into_a_temporary_cluster_and_removes_it() {
    let (src, config, tmp) = backed_up();
    let before = real_state(&src);

    let mut child = spawn_drill(&config, &tmp);
    let (cluster, postmaster) = wait_for_cluster(&mut child, &tmp);
    let run = finish(child);
    run.expect_code(exit::OK);
    let report = run.json();
    assert_eq!(report["ok"], true, "{report}");
    let server = report["server"].as_str().unwrap();
    assert!(
        server.starts_with(&format!("temporary cluster in {}", cluster.display())),
        "{server}"
    );
    assert!(report["server_version"]
        .as_str()
        .unwrap()
        .starts_with("15."));
    let status = |name: &str| {
        let checks = report["checks"].as_array().unwrap();
        let check = checks.iter().find(|c| c["name"] == name).unwrap();
        (check["status"].clone(), check["count"].clone())
    };
    assert_eq!(status("row counts").0, "pass");
    assert_eq!(status("assets per user"), ("pass".into(), ASSETS.into()));
    assert_eq!(status("albums"), ("pass".into(), 4.into()));
    assert_eq!(status("earthdistance").0, "pass");
    assert_eq!(status("vector indexes").0, "skipped");
    // The default 2 % sample of the files: at least one, read back and verified.
    let (files, read) = status("files");
    assert_eq!(files, "pass", "{report}");
    assert!(read.as_u64().unwrap() >= 1, "{report}");
    assert!(report["files_estimated_secs"].as_f64().unwrap() > 0.0);
    let rows = report["row_checks"].as_array().unwrap();
    assert!(
        rows.iter().all(|r| r["expected"] == r["actual"]),
        "{report}"
    );
    let expected = report["expected_restore_secs"].as_f64().unwrap();
    eprintln!(
        "local drill: expected restore time {expected:.2}s, phases {}",
        report["phases"]
    );

    assert!(clusters(&tmp).is_empty(), "the cluster folder is removed");
    assert!(!process_runs(postmaster), "its server is stopped");
    assert!(
        before == real_state(&src),
        "the real database or UPLOAD_LOCATION changed"
    );
}

#[test]
fn a_killed_local_drill_leaves_a_cluster_that_the_next_drill_stops_and_removes() {
    let (src, config, tmp) = backed_up();
    let before = real_state(&src);

    let mut child = spawn_drill(&config, &tmp);
    let killed_pid = child.id();
    let (cluster, postmaster) = wait_for_cluster(&mut child, &tmp);
    child.kill().unwrap();
    finish(child);
    assert!(cluster.is_dir(), "a killed drill leaves its cluster");
    assert!(process_runs(postmaster), "… with its server running");

    let run = finish(spawn_drill(&config, &tmp));
    run.expect_code(exit::OK);
    let report = run.json();
    let removed = report["leftovers_removed"].to_string();
    assert!(
        removed.contains(&cluster.display().to_string()),
        "{removed}"
    );
    assert!(
        removed.contains(&format!("drill pid {killed_pid}")),
        "{removed}"
    );
    assert!(
        run.stderr
            .contains("removed the throwaway server of an interrupted drill: cluster"),
        "{}",
        run.stderr
    );
    assert!(!cluster.exists(), "the leftover folder is removed");
    assert!(!process_runs(postmaster), "the leftover server is stopped");
    assert!(
        clusters(&tmp).is_empty(),
        "and the second drill's own is gone"
    );
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        before == real_state(&src),
        "the real database or UPLOAD_LOCATION changed"
    );
}

#[test]
fn a_drill_without_server_binaries_says_what_to_install() {
    let (src, _, tmp) = backed_up();
    // Client tools only: what a machine with just postgresql-client has.
    let client_only = src.work.path().join("client-only");
    fs::create_dir(&client_only).unwrap();
    for tool in ["psql", "pg_dumpall"] {
        std::os::unix::fs::symlink(src.cluster.bin_dir.join(tool), client_only.join(tool)).unwrap();
    }
    let mut toml = src.toml();
    toml.bin_dir = client_only.clone();
    let config = toml.write(&src.work.path().join("client-only.toml"));
    let run = cli(
        Some(&config),
        &["drill"],
        &[
            ("TMPDIR", tmp.to_str().unwrap()),
            ("IMMICH_BACKUP_PG_BIN", client_only.to_str().unwrap()),
        ],
    );
    run.expect_code(exit::DATABASE);
    let error = run.error_lines().join("\n");
    assert!(error.contains("initdb, pg_ctl, postgres, psql"), "{error}");
    assert!(error.contains("[database] bin_dir"), "{error}");
    assert!(error.contains("apt-get install postgresql"), "{error}");
    assert!(clusters(&tmp).is_empty(), "nothing is left");
}

#[test]
fn a_drill_takes_the_shared_lock_unless_told_not_to() {
    let (src, _, tmp) = backed_up();
    let mut toml = src.toml();
    toml.extra = "[lock]\nwait_secs = 1\n".into();
    let config = toml.write(&src.work.path().join("locked.toml"));
    let env = [("TMPDIR", tmp.to_str().unwrap())];
    let (rt, lock) = hold_exclusive_lock(&src.config());
    cli(Some(&config), &["drill"], &env).expect_code(exit::LOCKED);
    assert!(
        clusters(&tmp).is_empty(),
        "a drill that waited made no cluster"
    );
    let run = cli(Some(&config), &["drill", "--no-lock"], &env);
    run.expect_code(exit::OK);
    assert!(run.stderr.contains("--no-lock"), "{}", run.stderr);
    rt.block_on(lock.release());
    cli(Some(&config), &["drill"], &env).expect_code(exit::OK);
    assert_eq!(fs::read_dir(src.store.join("locks")).unwrap().count(), 0);
}

/// Whether any process runs with `path` in its command line.
fn any_process_uses(path: &Path) -> bool {
    let needle = path.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc").unwrap().flatten().any(|p| {
        fs::read(p.path().join("cmdline"))
            .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
    })
}

#[test]
fn a_local_drill_interrupted_while_it_makes_its_cluster_removes_it() {
    let (_src, config, tmp) = backed_up();
    let child = spawn_drill(&config, &tmp);
    let deadline = Instant::now() + Duration::from_secs(60);
    let cluster = loop {
        if let Some(dir) = clusters(&tmp).into_iter().next() {
            break dir;
        }
        assert!(Instant::now() < deadline, "no cluster folder within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: kill(2) with plain integers, to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let run = finish(child);
    run.expect_code(exit::INTERRUPTED);
    assert!(run.stderr.contains("stopped half-way"), "{}", run.stderr);
    assert!(!cluster.exists(), "the cluster folder is removed");
    assert!(!any_process_uses(&cluster), "no server of it runs");
}

/// Reading every file back (`--read-data-subset 100%`) finds a flipped byte: the drill fails with
/// exit 4 and names the file; `--no-read-data` drills the database alone and passes.
#[test]
fn a_drill_reading_the_files_back_names_a_damaged_one() {
    let (src, config, tmp) = backed_up();
    let entries = file_list(&src.store, &src.identity, &latest_snapshot(&src));
    let victim = entries
        .iter()
        .find(|e| e.size > 4096 && e.content.is_some())
        .expect("a file");
    flip_middle_byte(&src.store.join(victim.content.unwrap().key()));
    let env = [("TMPDIR", path_arg(&tmp))];
    let run = cli(
        Some(&config),
        &["--json", "drill", "--read-data-subset", "100%"],
        &env,
    );
    run.expect_code(exit::DAMAGED);
    let report = run.json();
    let checks = report["checks"].as_array().unwrap();
    let files = checks.iter().find(|c| c["name"] == "files").unwrap();
    assert_eq!(files["status"], "fail");
    assert!(
        files["detail"].as_str().unwrap().contains(&victim.path),
        "{files}"
    );
    assert!(clusters(&tmp).is_empty(), "the cluster folder is removed");
    let run = cli(Some(&config), &["--json", "drill", "--no-read-data"], &env);
    run.expect_code(exit::OK);
    assert!(run.json()["files_read"].is_null());
}

/// The newest complete snapshot of the source's store.
fn latest_snapshot(src: &Source) -> String {
    let mut ids: Vec<String> = fs::read_dir(src.store.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("manifest.json.age").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids.pop().unwrap()
}
