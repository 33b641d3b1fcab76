//! SFTP stores end to end, against a real OpenSSH server: a throwaway `/usr/sbin/sshd` (Debian's
//! `openssh-server`, installed by `.ci/run`) on 127.0.0.1 with its own host key, an authorized
//! client key made by `ssh-keygen`, and no system configuration (`-f /dev/null`). The tests look at
//! the served folder directly to see what a server-side user would see.
//!
//! Without sshd the tests skip with a message, except in CI (`CI` set), where they fail.

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

const SSHD: &str = "/usr/sbin/sshd";

/// Whether sshd is here; without it, outside CI, the test is skipped (with a message).
fn have_sshd() -> bool {
    if Path::new(SSHD).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{SSHD} is missing (apt-get install openssh-server, see .ci/run)");
    }
    eprintln!("skipped: {SSHD} not found (apt-get install openssh-server)");
    false
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen (apt-get install openssh-client)")
        .success();
    assert!(ok, "ssh-keygen failed");
}

fn public_key(private: &Path) -> String {
    let text = std::fs::read_to_string(private.with_extension("pub")).unwrap();
    let mut parts = text.split_whitespace();
    format!("{} {}", parts.next().unwrap(), parts.next().unwrap())
}

/// The user the tests run as (sshd logs in as that user).
fn user() -> String {
    // SAFETY: getpwuid(geteuid()) returns a pointer to a static record, or null.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        assert!(!pw.is_null());
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

/// A throwaway sshd on a free loopback port, killed by PID when dropped.
struct SshServer {
    port: u16,
    root: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
}

impl SshServer {
    fn start() -> SshServer {
        let dir = tempdir();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let root = d.join("served");
        std::fs::create_dir_all(root.join("backups")).unwrap();
        let _ = std::fs::create_dir_all("/run/sshd");
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(SSHD)
                .args(["-D", "-e", "-f", "/dev/null", "-p", &port.to_string()])
                .arg("-h")
                .arg(d.join("host_key"))
                .arg("-o")
                .arg(format!(
                    "AuthorizedKeysFile={}",
                    d.join("authorized_keys").display()
                ))
                .args([
                    "-o",
                    "ListenAddress=127.0.0.1",
                    "-o",
                    "PidFile=none",
                    "-o",
                    "StrictModes=no",
                    "-o",
                    "PermitRootLogin=yes",
                    "-o",
                    "PasswordAuthentication=yes",
                    "-o",
                    "KbdInteractiveAuthentication=no",
                    "-o",
                    "UsePAM=no",
                    "-o",
                    "Subsystem=sftp internal-sftp",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sshd");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let server = SshServer {
                        port,
                        root,
                        dir,
                        child,
                    };
                    server.write_known_hosts("known_hosts", &server.host_key());
                    return server;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("sshd did not start");
    }

    fn host_key(&self) -> String {
        public_key(&self.dir.path().join("host_key"))
    }

    fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// Write a known_hosts file naming `key` for this server, hashed as `ssh-keygen -H` does.
    fn write_known_hosts(&self, name: &str, key: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("[127.0.0.1]:{} {key}\n", self.port)).unwrap();
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-H", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("|1|"), "{text}");
        path
    }

    /// `[storage]` for the folder `served/backups/immich`, logging in with the client key.
    fn storage(&self) -> StorageConfig {
        quick(StorageConfig {
            url: format!(
                "sftp://{}@127.0.0.1:{}{}/backups/immich",
                user(),
                self.port,
                self.root.display()
            ),
            ssh_key_file: self.client_key().display().to_string(),
            known_hosts_file: self.dir.path().join("known_hosts").display().to_string(),
            ..StorageConfig::default()
        })
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

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backup with a multipart-sized file goes up over SFTP (host key from a hashed known_hosts
/// entry), restores identically, and a second backup stores nothing; no temporary names are left.
/// `init` passes every check and says what the server guarantees.
#[test]
fn sftp_backup_restore_round_trip_and_init() {
    if !have_sshd() {
        return;
    }
    let server = SshServer::start();
    let rt = rt();
    let store = Store::open(&server.storage()).unwrap();
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
        cc.detail.contains("rename") && cc.detail.contains("never visible"),
        "{}",
        cc.detail
    );
    assert!(server.files().iter().all(|f| !f.contains("init-check")));

    let source = Source::with_big_file(300);
    let cfg = source.config_with(server.storage());
    let started = Instant::now();
    let report = backup(&rt, &cfg).expect("backup to SFTP");
    eprintln!(
        "backup over SFTP: {} files, {} bytes in {:.2?}",
        report.files,
        report.bytes_stored,
        started.elapsed()
    );
    assert_eq!(report.files as usize, source.lib.original_files);
    assert!(report.files_new > 0);
    assert!(report.requests.requests() > 0, "{:?}", report.requests);
    let files = server.files();
    assert!(files.iter().any(|f| f.starts_with("data/")), "{files:?}");
    assert!(files.iter().all(|f| !f.contains("partial")), "{files:?}");
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
    // The same backup into the folder store, for comparison (printed with --no-capture).
    let started = Instant::now();
    let local = source.backup_lib();
    eprintln!(
        "backup into a folder: {} files, {} bytes in {:.2?}",
        local.files,
        local.bytes_stored,
        started.elapsed()
    );

    let again = backup(&rt, &cfg).expect("second backup");
    assert_eq!(again.files_new, 0);
    assert_eq!(again.bytes_stored, 0);

    // A pinned host key works instead of known_hosts.
    let pinned = StorageConfig {
        known_hosts_file: "/nonexistent/known_hosts".into(),
        ssh_host_key: server.host_key(),
        ..server.storage()
    };
    let store = Store::open(&pinned).unwrap();
    assert!(!rt
        .block_on(store.list_keys("snapshots"))
        .unwrap()
        .is_empty());
}

/// Create-only writes never overwrite (single request and multipart), an upload abandoned before
/// `complete` never shows under its key, ranges read what they name, and parts awaited out of
/// order land in order.
#[test]
fn sftp_create_only_ranges_and_abandoned_uploads() {
    if !have_sshd() {
        return;
    }
    let server = SshServer::start();
    let rt = rt();
    let store = Store::open(&server.storage()).unwrap();
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
            assert_eq!(store.size(key).await.unwrap(), None, "{key}");
            let listed: Vec<_> = raw.list(Some(&ObjectPath::from("data"))).collect().await;
            assert!(listed.iter().all(|m| m.is_ok()));
            let keys = store.list_keys("data").await.unwrap();
            assert!(
                keys.iter().all(|(k, _)| !k.contains("dropped")
                    && !k.contains("aborted")
                    && !k.contains("partial")),
                "{keys:?}"
            );
            assert!(!server.files().iter().any(|f| f == key));
        }
        // The dropped upload's temporary is there on the server, hidden; the aborted one is gone.
        let files = server.files();
        assert!(
            files
                .iter()
                .any(|f| f.starts_with("data/cd/dropped.immich-backup-partial-")),
            "{files:?}"
        );
        assert!(!files.iter().any(|f| f.contains("aborted")), "{files:?}");

        // A completed multipart upload appears whole, parts awaited in reverse.
        let (raw, path) = store.raw("data/ef/whole");
        let mut up = raw.put_multipart(&path).await.unwrap();
        let mut expected = Vec::new();
        let parts: Vec<_> = (0..3u8)
            .map(|i| {
                let part: Vec<u8> = (0..PART_SIZE).map(|j| (j % 251) as u8 ^ i).collect();
                expected.extend(&part);
                up.put_part(Bytes::from(part).into())
            })
            .collect();
        for p in parts.into_iter().rev() {
            p.await.unwrap();
        }
        up.complete().await.unwrap();
        assert_eq!(
            store.get_bytes("data/ef/whole").await.unwrap(),
            Bytes::from(expected.clone())
        );
        let got = raw.get_range(&path, 1_000_000..9_000_123).await.unwrap();
        assert_eq!(&got[..], &expected[1_000_000..9_000_123]);
        // Objects at the top and deleting.
        assert!(store
            .put_new("top-object", Bytes::from_static(b"x"))
            .await
            .unwrap());
        store.delete("top-object").await.unwrap();
        store.delete("top-object").await.unwrap();
        assert_eq!(store.size("top-object").await.unwrap(), None);
        let e = store.get_bytes("data/no/such").await.unwrap_err();
        assert_eq!(e.exit_code(), 13, "{e}");
    });
}

/// Run the binary on `storage` (written to a config file) with only `env` added, no ssh-agent.
fn run(source: &Source, storage: &StorageConfig, args: &[&str], env: &[(&str, &str)]) -> Run {
    let config = source.write_config_with(storage, "sftp.toml");
    let mut cmd = command(Some(&config), args);
    cmd.env_remove("SSH_AUTH_SOCK");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_to_end(cmd)
}

/// A key the server does not know, or a wrong password: exit code 10, one error line saying what
/// to check, never the password.
#[test]
fn sftp_wrong_key_or_password_is_one_line_without_secret() {
    if !have_sshd() {
        return;
    }
    let server = SshServer::start();
    let source = Source::new(2);
    let other = server.dir.path().join("other_key");
    keygen(&other);
    let wrong_key = StorageConfig {
        ssh_key_file: other.display().to_string(),
        ..server.storage()
    };
    let no_key = StorageConfig {
        ssh_key_file: String::new(),
        ..server.storage()
    };
    let wrong = "Wrong-Ssh-Password-abcdef-987654";
    let cases: [(&StorageConfig, &[(&str, &str)]); 2] = [
        (&wrong_key, &[]),
        (&no_key, &[("IMMICH_BACKUP__STORAGE__PASSWORD", wrong)]),
    ];
    for (storage, env) in cases {
        for args in [&["snapshots"][..], &["init"]] {
            let run = run(&source, storage, args, env);
            let (stdout, stderr) = (&run.stdout, &run.stderr);
            assert_eq!(run.code, 10, "{args:?}: {stdout}\n{stderr}");
            assert!(
                !stdout.contains(wrong) && !stderr.contains(wrong),
                "{args:?} leaked the password:\n{stdout}\n{stderr}"
            );
            let errors = run.error_lines();
            assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
            if args == ["init"] {
                assert!(
                    errors[0].contains("failed check(s): access"),
                    "{}",
                    errors[0]
                );
                assert!(stdout.contains("FAIL access"), "{stdout}");
                assert!(stdout.contains("ssh_key_file"), "{stdout}");
            } else {
                assert!(
                    errors[0].contains("denied") && errors[0].contains("ssh_key_file"),
                    "{}",
                    errors[0]
                );
            }
        }
    }
    // A protected key without its passphrase says which setting is missing; with it, it works.
    let protected = server.dir.path().join("protected_key");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "Key-Passphrase-42", "-f"])
        .arg(&protected)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut keys = std::fs::read_to_string(server.dir.path().join("authorized_keys")).unwrap();
    keys.push_str(&std::fs::read_to_string(protected.with_extension("pub")).unwrap());
    std::fs::write(server.dir.path().join("authorized_keys"), keys).unwrap();
    let storage = StorageConfig {
        ssh_key_file: protected.display().to_string(),
        ..server.storage()
    };
    let run1 = run(&source, &storage, &["snapshots"], &[]);
    assert_eq!(run1.code, 10, "{run1:?}");
    assert!(
        run1.stderr.contains("ssh_key_passphrase"),
        "{}",
        run1.stderr
    );
    let run2 = run(
        &source,
        &storage,
        &["init"],
        &[(
            "IMMICH_BACKUP__STORAGE__SSH_KEY_PASSPHRASE",
            "Key-Passphrase-42",
        )],
    );
    run2.expect_code(0);
    assert!(!run2.stdout.contains("Key-Passphrase-42"));
}

/// An unknown host key, a changed one (known_hosts or pinned) and an unreachable port are refused
/// with one line: the server's fingerprint and what to do. Nothing is written.
#[test]
fn sftp_unknown_or_changed_host_key_is_refused() {
    if !have_sshd() {
        return;
    }
    let server = SshServer::start();
    let source = Source::new(2);
    let empty = server.dir.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let other = server.dir.path().join("other_host_key");
    keygen(&other);
    let changed = server.write_known_hosts("changed_known_hosts", &public_key(&other));
    let fingerprint = {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(server.dir.path().join("host_key.pub"))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().nth(1).unwrap().to_string()
    };
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
    let keyscan = format!("ssh-keyscan -p {} 127.0.0.1", server.port);
    let cases = [
        (
            StorageConfig {
                known_hosts_file: empty.display().to_string(),
                ..server.storage()
            },
            "unknown host key",
        ),
        (
            StorageConfig {
                known_hosts_file: changed.display().to_string(),
                ..server.storage()
            },
            "CHANGED",
        ),
        (
            StorageConfig {
                ssh_host_key: public_key(&other),
                ..server.storage()
            },
            "does not match [storage] ssh_host_key",
        ),
    ];
    for (storage, says) in &cases {
        for args in [&["backup"][..], &["init"]] {
            let run = run(&source, storage, args, &[]);
            assert_eq!(run.code, 10, "{args:?}: {run:?}");
            let errors = run.error_lines();
            assert_eq!(errors.len(), 1, "{}", run.stderr);
            let text = if args == ["init"] {
                &run.stdout
            } else {
                errors[0]
            };
            assert!(
                text.contains(says) && text.contains(&fingerprint) && text.contains(&keyscan),
                "{says}: {text}"
            );
        }
    }
    assert!(server.files().is_empty(), "{:?}", server.files());

    // Nothing listens: a one-line "cannot connect" naming the port, quickly.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let storage = StorageConfig {
        url: format!("sftp://{}@127.0.0.1:{closed}/tmp/x", user()),
        ..server.storage()
    };
    let started = Instant::now();
    let unreachable = run(&source, &storage, &["snapshots"], &[]);
    assert_eq!(unreachable.code, 10, "{unreachable:?}");
    let errors = unreachable.error_lines();
    assert_eq!(errors.len(), 1, "{}", unreachable.stderr);
    assert!(
        errors[0].contains("cannot connect") && errors[0].contains(&closed.to_string()),
        "{}",
        errors[0]
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    // The folder above the store's folder is missing: `init` says so, exit 10.
    let storage = StorageConfig {
        url: format!(
            "sftp://{}@127.0.0.1:{}{}/no/such/parent/immich",
            user(),
            server.port,
            server.root.display()
        ),
        ..server.storage()
    };
    let init = run(&source, &storage, &["init"], &[]);
    assert_eq!(init.code, 10, "{init:?}");
    assert!(
        init.stdout.contains("FAIL write")
            && init.stdout.contains("the folder above it does not exist"),
        "{}",
        init.stdout
    );
}

/// A backup killed (SIGKILL) while a large object is uploading leaves only a hidden temporary:
/// the object's key never appears, no snapshot is listed, the next backup completes and restores,
/// and `prune` deletes the temporary once it is older than `[lock] stale_secs`.
#[test]
fn sftp_killed_upload_leaves_no_visible_object() {
    if !have_sshd() {
        return;
    }
    let server = SshServer::start();
    let source = Source::with_big_file(50);
    let cfg = source.config_with(server.storage());
    let config = source.write_config_with(&server.storage(), "sftp.toml");
    let env = [("IMMICH_BACKUP__STORAGE__UPLOAD_LIMIT", "4MiB/s")];
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
    assert!(server.files().contains(&partial), "{:?}", server.files());

    // `prune` deletes the temporary once it is older than the lock's stale timeout.
    let recent = cli(Some(&config), &["prune"], &env);
    recent.expect_code(0);
    assert!(server.files().contains(&partial), "{:?}", server.files());
    std::thread::sleep(Duration::from_millis(2100));
    let stale = [("IMMICH_BACKUP__LOCK__STALE_SECS", "2")];
    let dry = cli(Some(&config), &["prune", "--dry-run"], &stale);
    dry.expect_code(0);
    assert!(
        dry.stdout.contains("would remove")
            && dry.stdout.contains("temporary file(s) of killed uploads"),
        "{}",
        dry.stdout
    );
    assert!(server.files().contains(&partial), "{:?}", server.files());
    let run = cli(Some(&config), &["prune"], &stale);
    run.expect_code(0);
    assert!(
        run.stdout.contains("  removed")
            && run.stdout.contains("temporary file(s) of killed uploads"),
        "{}",
        run.stdout
    );
    let files = server.files();
    assert!(files.iter().all(|f| !f.contains("partial")), "{files:?}");
    restore_and_verify(&rt, &source, &cfg);
}

/// Without `ssh_key_file`, the keys of a running ssh-agent (`SSH_AUTH_SOCK`) log in.
#[test]
fn sftp_ssh_agent_keys_log_in() {
    if !have_sshd() {
        return;
    }
    let server = SshServer::start();
    let source = Source::new(2);
    let sock = server.dir.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh-agent (apt-get install openssh-client)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(server.client_key())
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    let storage = StorageConfig {
        ssh_key_file: String::new(),
        ..server.storage()
    };
    let config = source.write_config_with(&storage, "agent.toml");
    let mut cmd = command(Some(&config), &["init"]);
    cmd.env("SSH_AUTH_SOCK", &sock);
    let run = run_to_end(cmd);
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(added, "ssh-add failed");
    run.expect_code(0);
    assert!(
        run.stdout.contains("ok   conditional-create"),
        "{}",
        run.stdout
    );
}
