//! The read-ahead (src/backup/early.rs): files stored while the dump was still getting its snapshot never put
//! stale content into a snapshot, with a real PostgreSQL cluster whose dump is held back by a lock.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use common::*;
use immich_backup::demo::sample::{self, PgCluster};
use immich_backup::error::exit;

/// A database that `pg_dumpall` dumps before `immich`, with a table locked by an open transaction:
/// the dump waits there until [`Blocker::release`], so the files are read ahead all that time.
struct Blocker {
    session: Child,
    stdin: ChildStdin,
}

impl Blocker {
    fn hold(cluster: &PgCluster) -> Blocker {
        cluster
            .psql("postgres", "CREATE DATABASE aaa_blocker")
            .unwrap();
        cluster
            .psql(
                "aaa_blocker",
                "CREATE TABLE t (x int); INSERT INTO t VALUES (1);",
            )
            .unwrap();
        let mut session = cluster
            .client_command("psql")
            .args(["-X", "-q", "-At", "-d", "aaa_blocker"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = session.stdin.take().unwrap();
        stdin
            .write_all(b"BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SELECT 'locked';\n")
            .unwrap();
        let mut line = String::new();
        BufReader::new(session.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        Blocker { session, stdin }
    }

    fn release(mut self) {
        self.stdin.write_all(b"COMMIT;\n").unwrap();
        drop(self.stdin);
        self.session.wait().unwrap();
    }
}

#[test]
fn files_changed_after_they_were_read_ahead_are_read_again() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    let changed_path = "library/admin/2024/IMG_0002.jpg";
    let removed_path = "library/admin/2024/IMG_0003.jpg";
    let changed = src.upload.join(changed_path);
    let before = fs::read(&changed).unwrap();
    let original = original_files_of(&src);
    wait_until_settled();

    let blocker = Blocker::hold(&src.cluster);
    let backup = command(Some(&config), &["--json", "backup"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Everything is read ahead while the dump waits for the lock.
    let distinct: std::collections::BTreeSet<String> =
        original.values().map(|b| object_key(&src, b)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while staged_objects(&src.store).len() < distinct.len() {
        assert!(Instant::now() < deadline, "the files were not read ahead");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Then, before the dump's snapshot: one file is rewritten with the same size and mtime (only its
    // ctime tells), one is removed, one is added.
    let mtime = fs::metadata(&changed).unwrap().modified().unwrap();
    let after: Vec<u8> = before.iter().map(|b| b.wrapping_add(1)).collect();
    fs::write(&changed, &after).unwrap();
    let f = fs::File::options().write(true).open(&changed).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(mtime))
        .unwrap();
    drop(f);
    fs::remove_file(src.upload.join(removed_path)).unwrap();
    sample::add_photo(&src.upload, "upload/new/IMG_NEW.jpg", 200_000, 77).unwrap();
    blocker.release();

    // The removed file is asset 3's original, which the database still names: the snapshot is
    // partial (exit 3) and says so.
    let out = backup.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(exit::PARTIAL), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["consistency"]["missing_examples"],
        serde_json::json!([removed_path]),
        "{report}"
    );
    let files = report["files"].as_u64().unwrap();
    assert_eq!(files, original.len() as u64, "one removed, one added");
    // Everything unchanged came from the read-ahead; the changed and the new file were read now.
    assert_eq!(report["files_read_ahead"], files - 2, "{report}");

    // The snapshot holds the files as they were at the dump's snapshot.
    let id = report["snapshot"].as_str().unwrap();
    let list = file_list(&src.store, &src.identity, id);
    let content = |path: &str| {
        list.iter()
            .find(|e| e.path == path)
            .and_then(|e| e.content)
            .map(|c| c.key())
    };
    assert_eq!(
        content(changed_path),
        Some(object_key(&src, &after)),
        "the changed file's new content"
    );
    assert!(content(removed_path).is_none(), "the removed file is gone");
    assert!(content("upload/new/IMG_NEW.jpg").is_some());

    // And it restores to exactly the source as it is now.
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("restored");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let identity = src.identity.to_str().unwrap();
    cli(
        Some(&rconfig),
        &["--json", "restore", "latest", "--identity", identity],
        &[],
    )
    .expect_code(exit::OK);
    assert_eq!(fs::read(target.join(changed_path)).unwrap(), after);
    assert!(!target.join(removed_path).exists());
    assert_same_originals(&src.upload, &target);
}

/// Regular files under the original folders: relative path → bytes.
fn original_files_of(src: &Source) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for f in sample::ORIGINAL_FOLDERS {
        for e in walkdir::WalkDir::new(src.upload.join(f)) {
            let e = e.unwrap();
            if e.file_type().is_file() {
                let rel = e.path().strip_prefix(&src.upload).unwrap();
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                );
            }
        }
    }
    out
}
