//! WebDAV stores end to end, against a real WebDAV server: `rclone serve webdav` (Debian's
//! `rclone`, installed by `.ci/run`) on 127.0.0.1, serving a temporary folder with a user and
//! password. The tests look at that folder directly to see what a server-side user would see.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use immich_backup::config::StorageConfig;
use immich_backup::repo::Repository;
use immich_backup::store::check::Status;
use immich_backup::store::{Store, PART_SIZE};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions};

const USER: &str = "backup-user";
const PASSWORD: &str = "Dav-Password-0123456789-secret";

/// `rclone serve webdav` on a free loopback port, killed by PID when dropped.
struct DavServer {
    port: u16,
    root: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl DavServer {
    fn start() -> DavServer {
        let dir = tempdir();
        let root = dir.path().join("served");
        std::fs::create_dir_all(root.join("backups")).unwrap();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("rclone")
                .args(["serve", "webdav"])
                .arg(&root)
                .args(["--addr", &format!("127.0.0.1:{port}")])
                .args(["--user", USER, "--pass", PASSWORD])
                .args(["--config", "/dev/null", "-q"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("rclone (apt-get install rclone, see .ci/run)");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return DavServer {
                        port,
                        root,
                        child,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("rclone serve webdav did not start");
    }

    /// `[storage]` for the folder `backups/immich` on this server (password given separately).
    fn storage(&self) -> StorageConfig {
        quick(StorageConfig {
            url: format!("webdav://{USER}@127.0.0.1:{}/backups/immich", self.port),
            allow_http: true,
            ..StorageConfig::default()
        })
    }

    fn storage_with_password(&self) -> StorageConfig {
        StorageConfig {
            password: PASSWORD.into(),
            ..self.storage()
        }
    }

    /// Every file under the served store folder, relative to it.
    fn files(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let base = self.root.join("backups/immich");
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }
}

impl Drop for DavServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backup with a multipart-sized file goes up, restores identically, and a second backup
/// stores nothing; no temporary names are left.
#[test]
fn webdav_backup_restore_round_trip_with_multipart_object() {
    let server = DavServer::start();
    let source = Source::with_big_file(300);
    let cfg = source.config_with(server.storage_with_password());
    let rt = rt();

    let report = backup(&rt, &cfg).expect("backup to WebDAV");
    assert_eq!(report.files as usize, source.lib.original_files);
    assert!(report.files_new > 0);
    assert!(report.requests.requests() > 0, "{:?}", report.requests);
    let files = server.files();
    assert!(files.iter().any(|f| f.starts_with("data/")), "{files:?}");
    assert!(files.iter().all(|f| !f.contains("partial")), "{files:?}");
    // The big file's object is there whole (one object larger than a part).
    let biggest = files
        .iter()
        .map(|f| {
            std::fs::metadata(server.root.join("backups/immich").join(f))
                .unwrap()
                .len()
        })
        .max()
        .unwrap();
    assert!(biggest > 2 * PART_SIZE as u64, "{biggest}");

    restore_and_verify(&rt, &source, &cfg);

    let again = backup(&rt, &cfg).expect("second backup");
    assert_eq!(again.files_new, 0);
    assert_eq!(again.bytes_stored, 0);
}

/// `init` on a WebDAV store passes every check and says what the server guarantees.
#[test]
fn webdav_init_reports_the_guarantees() {
    let server = DavServer::start();
    let rt = rt();
    let store = Store::open(&server.storage_with_password()).unwrap();
    let report = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(report.ok, "{report:#?}");
    for c in [
        "access",
        "write",
        "read",
        "list",
        "conditional-create",
        "delete",
    ] {
        let check = report.checks.iter().find(|x| x.check == c).unwrap();
        assert_eq!(check.status, Status::Ok, "{report:#?}");
    }
    let cc = report
        .checks
        .iter()
        .find(|x| x.check == "conditional-create")
        .unwrap();
    assert!(
        cc.detail.contains("Overwrite: F") && cc.detail.contains("never visible"),
        "{}",
        cc.detail
    );
    assert!(server.files().iter().all(|f| !f.contains("init-check")));
}

/// Create-only writes never overwrite (single request and multipart), and an upload abandoned
/// before `complete` (dropped, or aborted) never shows under its key.
#[test]
fn webdav_create_only_and_abandoned_uploads() {
    let server = DavServer::start();
    let rt = rt();
    let store = Store::open(&server.storage_with_password()).unwrap();
    rt.block_on(async {
        assert!(store
            .put_new("data/ab/abcd", Bytes::from_static(b"first"))
            .await
            .unwrap());
        assert!(!store
            .put_new("data/ab/abcd", Bytes::from_static(b"second"))
            .await
            .unwrap());
        assert_eq!(
            store.get_bytes("data/ab/abcd").await.unwrap(),
            Bytes::from_static(b"first")
        );
        let (raw, path) = store.raw("data/ab/abcd");
        let e = raw
            .put_opts(
                &path,
                Bytes::from_static(b"third").into(),
                PutOptions::from(PutMode::Create),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, object_store::Error::AlreadyExists { .. }),
            "{e}"
        );

        // Multipart onto an existing key: refused on complete, the object unchanged.
        let mut up = raw.put_multipart(&path).await.unwrap();
        up.put_part(Bytes::from(vec![7u8; 1024]).into())
            .await
            .unwrap();
        let e = up.complete().await.unwrap_err();
        assert!(
            matches!(e, object_store::Error::AlreadyExists { .. }),
            "{e}"
        );
        assert_eq!(
            store.get_bytes("data/ab/abcd").await.unwrap(),
            Bytes::from_static(b"first")
        );

        // A multipart upload of a new key, parts sent, then dropped (the process died) or
        // aborted: the key never appears, in listings or by name.
        for abort in [false, true] {
            let key = if abort {
                "data/cd/aborted"
            } else {
                "data/cd/dropped"
            };
            let (raw, path) = store.raw(key);
            let mut up = raw.put_multipart(&path).await.unwrap();
            for i in 0..3u8 {
                up.put_part(Bytes::from(vec![i; PART_SIZE]).into())
                    .await
                    .unwrap();
            }
            if abort {
                up.abort().await.unwrap();
            } else {
                drop(up);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(store.size(key).await.unwrap(), None, "{key}");
            let listed: Vec<_> = raw
                .list(Some(&ObjectPath::from("backups/immich")))
                .collect()
                .await;
            assert!(listed.iter().all(|m| m.is_ok()));
            let keys = store.list_keys("data").await.unwrap();
            assert!(
                keys.iter().all(|(k, _)| !k.contains("dropped")
                    && !k.contains("aborted")
                    && !k.contains("partial")),
                "{keys:?}"
            );
            assert!(
                !server.files().iter().any(|f| f == key),
                "{:?}",
                server.files()
            );
        }
        // A completed multipart upload appears whole.
        let (raw, path) = store.raw("data/ef/whole");
        let mut up = raw.put_multipart(&path).await.unwrap();
        let mut expected = Vec::new();
        let parts: Vec<_> = (0..3u8)
            .map(|i| {
                expected.extend(vec![i; PART_SIZE]);
                up.put_part(Bytes::from(vec![i; PART_SIZE]).into())
            })
            .collect();
        // Awaited in reverse: the body still carries them in order.
        for p in parts.into_iter().rev() {
            p.await.unwrap();
        }
        up.complete().await.unwrap();
        assert_eq!(
            store.get_bytes("data/ef/whole").await.unwrap(),
            Bytes::from(expected)
        );
    });
}

/// A wrong password: exit code 10, one error line naming what to check, never the password.
#[test]
fn webdav_wrong_password_is_one_line_without_secret() {
    let server = DavServer::start();
    let source = Source::new(2);
    let config = source.write_config_with(&server.storage(), "dav.toml");
    let wrong = "Wrong-Dav-Password-abcdef-987654";
    let env = [
        ("IMMICH_BACKUP__STORAGE__PASSWORD", wrong),
        ("IMMICH_BACKUP_LOG", "debug"),
    ];
    for args in [&["backup"][..], &["snapshots"], &["init"]] {
        let run = cli(Some(&config), args, &env);
        let (stdout, stderr) = (&run.stdout, &run.stderr);
        assert_eq!(run.code, 10, "{args:?}: {stdout}\n{stderr}");
        for secret in [wrong, PASSWORD] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{args:?} leaked a secret:\n{stdout}\n{stderr}"
            );
        }
        let errors = run.error_lines();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(
            errors[0].contains("denied")
                || args == ["init"] && errors[0].contains("failed check(s): access"),
            "{args:?}: {}",
            errors[0]
        );
        if args == ["init"] {
            assert!(stdout.contains("FAIL access"), "{stdout}");
            assert!(stdout.contains("[storage] password"), "{stdout}");
        }
    }
    // The right password through the same variable works.
    let run = cli(
        Some(&config),
        &["init"],
        &[("IMMICH_BACKUP__STORAGE__PASSWORD", PASSWORD)],
    );
    run.expect_code(0);
    assert!(!run.stdout.contains(PASSWORD));

    // Debug of the config never shows the password.
    let shown = format!("{:?}", server.storage_with_password());
    assert!(!shown.contains(PASSWORD), "{shown}");
}

/// URLs that would send the password in clear or keep it in the URL are refused as config errors.
#[test]
fn webdav_url_mistakes_are_config_errors() {
    let plain = StorageConfig {
        url: "webdav://u@nas.example/backup".into(),
        ..StorageConfig::default()
    };
    let e = Store::open(&plain).unwrap_err().to_string();
    assert!(e.contains("allow_http") && e.contains("webdavs://"), "{e}");
    let in_url = StorageConfig {
        url: "webdavs://u:hunter2pass@nas.example/backup".into(),
        ..StorageConfig::default()
    };
    let e = Store::open(&in_url).unwrap_err().to_string();
    assert!(
        e.contains("[storage] password") && !e.contains("hunter2pass"),
        "{e}"
    );
}

/// A backup killed (SIGKILL) while a large object is streaming up leaves only a hidden temporary:
/// the object's key never appears, no snapshot is listed, and the next backup completes and
/// restores.
#[test]
fn webdav_killed_upload_leaves_no_visible_object() {
    let server = DavServer::start();
    let source = Source::with_big_file(50);
    let cfg = source.config_with(server.storage_with_password());
    let config = source.write_config_with(&server.storage(), "dav.toml");
    let env = [
        ("IMMICH_BACKUP__STORAGE__PASSWORD", PASSWORD),
        // Slow enough that the big object is still uploading when it is killed.
        ("IMMICH_BACKUP__STORAGE__UPLOAD_LIMIT", "4MiB/s"),
    ];
    let mut child = command(Some(&config), &["backup"])
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let partial = loop {
        assert!(
            Instant::now() < deadline,
            "no large upload reached the server"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before the large upload"
        );
        let big = server.files().into_iter().find(|f| {
            f.contains(".immich-backup-partial-")
                && std::fs::metadata(server.root.join("backups/immich").join(f))
                    .map(|m| m.len() > PART_SIZE as u64)
                    .unwrap_or(false)
        });
        if let Some(f) = big {
            break f;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let key = partial.split(".immich-backup-partial-").next().unwrap();
    let rt = rt();
    let store = Store::open(&cfg.storage).unwrap();
    assert_eq!(rt.block_on(store.size(key)).unwrap(), None, "{key}");
    let listed = rt.block_on(store.list_keys("data")).unwrap();
    assert!(
        listed
            .iter()
            .all(|(k, _)| !k.contains("partial") && k != key),
        "{listed:?}"
    );
    let run = cli(Some(&config), &["snapshots"], &env);
    assert!(run.stdout.contains("0 snapshot(s)"), "{run:?}");

    backup(&rt, &cfg).expect("backup after the kill");
    restore_and_verify(&rt, &source, &cfg);

    // `prune` deletes the hidden temporary once it is older than `[lock] stale_secs`.
    let has_partial = || {
        server
            .files()
            .iter()
            .any(|f| f.contains(".immich-backup-partial-"))
    };
    assert!(has_partial(), "{:?}", server.files());
    std::thread::sleep(Duration::from_millis(2100));
    let stale = [env[0], ("IMMICH_BACKUP__LOCK__STALE_SECS", "2")];
    let run = cli(Some(&config), &["prune"], &stale);
    run.expect_code(0);
    assert!(
        run.stdout.contains("temporary file(s) of killed uploads"),
        "{}",
        run.stdout
    );
    assert!(!has_partial(), "{:?}", server.files());
    restore_and_verify(&rt, &source, &cfg);
}
