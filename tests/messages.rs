//! The messages of issue 16 ("Messages and behaviour"), through the real binary: each mistake a
//! user can make in the config or around the store gets one line with the cause and what to do, and
//! the documented exit code. These runs need no database: each stops at the mistake it is about
//! (or goes only as far as `init` and `check`, which need none).

mod common;

use std::fs;
use std::path::Path;

use common::*;
use immich_backup::error::exit;

/// Logging off, so stderr holds only what the CLI itself says.
const QUIET: (&str, &str) = ("IMMICH_BACKUP_LOG", "off");

/// Exactly one stderr line, `error: …`, containing every one of `needles`.
fn assert_one_line_error(run: &Run, code: i32, needles: &[&str]) {
    run.expect_code(code);
    let stderr = run.stderr.trim_end();
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected a one-line error, got:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error does not say {n:?}: {stderr}");
    }
}

/// Run the binary in `cwd` with `config`.
fn cli_in(cwd: &Path, config: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(config, args);
    cmd.current_dir(cwd).envs(env.iter().copied());
    run_to_end(cmd)
}

/// A config file `config.toml` in `dir` holding `text`.
fn config_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------------
// 1. Store URLs

#[test]
fn store_url_plain_absolute_path_is_a_folder_store() {
    let work = tempdir();
    let store = work.path().join("nas").join("backup");
    let config = config_file(
        work.path(),
        &format!("[storage]\nurl = {:?}\n", store.display().to_string()),
    );
    let run = cli_in(work.path(), Some(&config), &["--json", "init"], &[QUIET]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["ok"], true, "{r}");
    assert!(store.join("config").exists() || store.read_dir().unwrap().next().is_some());
    // And the store opens again for listing.
    let run = cli_in(
        work.path(),
        Some(&config),
        &["--json", "snapshots"],
        &[QUIET],
    );
    assert_eq!(run.expect_code(exit::OK).json(), serde_json::json!([]));
}

#[test]
fn store_url_ambiguous_spellings_are_refused_with_the_right_one() {
    let work = tempdir();
    let cases = [
        ("file:store", "ambiguous"),
        (
            "file://./store",
            "\".\" after file:// is read as a host name",
        ),
        (
            "file://tmp/x",
            "\"tmp\" after file:// is read as a host name",
        ),
        ("store", "a relative path"),
        ("./store", "a relative path"),
    ];
    for (url, why) in cases {
        let config = config_file(work.path(), &format!("[storage]\nurl = {url:?}\n"));
        let run = cli_in(work.path(), Some(&config), &["init"], &[QUIET]);
        assert_one_line_error(
            &run,
            exit::USAGE,
            &[
                &format!("[storage] url = {url:?}"),
                why,
                "file:///absolute/path",
                "absolute path",
            ],
        );
        assert!(!work.path().join("store").exists(), "{url}");
    }
    // file://tmp/x suggests /tmp/x.
    let config = config_file(work.path(), "[storage]\nurl = \"file://tmp/x\"\n");
    let run = cli_in(work.path(), Some(&config), &["snapshots"], &[QUIET]);
    assert_one_line_error(&run, exit::USAGE, &["e.g. \"/tmp/x\""]);
}

// ---------------------------------------------------------------------------------------------------
// 2. Relative paths in the config file are read from its folder

#[test]
fn relative_paths_in_the_config_file_are_read_from_its_folder() {
    let work = tempdir();
    let etc = work.path().join("etc");
    let elsewhere = work.path().join("elsewhere");
    fs::create_dir_all(&etc).unwrap();
    fs::create_dir_all(&elsewhere).unwrap();
    let key = immich_backup::crypto::generate_key();
    immich_backup::crypto::write_identity_file(&etc.join("identity.txt"), &key).unwrap();
    fs::write(etc.join("signing.key"), signing_text(&key)).unwrap();
    let store = work.path().join("store");
    let config = config_file(
        &etc,
        &format!(
            "[storage]\nurl = {:?}\n\n[encryption]\nrecipients = [{:?}]\n\
             identity_file = \"identity.txt\"\nsigning_key_file = \"./signing.key\"\n",
            store.display().to_string(),
            key.recipient
        ),
    );
    // Run from another folder: the signing key and the identity are found beside the config file.
    let run = cli_in(&elsewhere, Some(&config), &["--json", "init"], &[QUIET]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["verify_keys"].as_array().unwrap().len(), 1, "{r}");
    let run = cli_in(&elsewhere, Some(&config), &["--json", "check"], &[QUIET]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["with_identity"], true, "{r}");

    // A relative path from the environment stays relative to the current folder.
    let env = [
        QUIET,
        ("IMMICH_BACKUP__ENCRYPTION__IDENTITY_FILE", "identity.txt"),
    ];
    let run = cli_in(&elsewhere, Some(&config), &["check"], &env);
    assert_one_line_error(
        &run,
        exit::USAGE,
        &["[encryption] identity_file = \"identity.txt\": no such file"],
    );
    fs::copy(etc.join("identity.txt"), elsewhere.join("identity.txt")).unwrap();
    let run = cli_in(&elsewhere, Some(&config), &["--json", "check"], &env);
    assert_eq!(run.expect_code(exit::OK).json()["with_identity"], true);
}

#[test]
fn a_missing_recipients_file_names_the_key_and_where_it_was_looked_for() {
    let work = tempdir();
    let etc = work.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    let config = config_file(
        &etc,
        &format!(
            "[storage]\nurl = {:?}\n\n[encryption]\nrecipients_file = \"recipients.txt\"\n",
            work.path().join("store").display().to_string()
        ),
    );
    let run = cli_in(work.path(), Some(&config), &["backup"], &[QUIET]);
    let looked = etc.join("recipients.txt").display().to_string();
    assert_one_line_error(
        &run,
        exit::USAGE,
        &[
            "[encryption] recipients_file = \"recipients.txt\"",
            &looked,
            "read from the config file's folder",
            "no such file",
        ],
    );
}

// ---------------------------------------------------------------------------------------------------
// 3. No config at all

#[test]
fn no_config_says_so_and_where_the_example_is() {
    let work = tempdir();
    for args in [
        &["backup"][..],
        &["snapshots"],
        &["init"],
        &["check"],
        &["unlock"],
    ] {
        let run = cli_in(work.path(), None, args, &[QUIET]);
        assert_one_line_error(
            &run,
            exit::USAGE,
            &[
                "no config file",
                "--config FILE",
                "IMMICH_BACKUP_CONFIG",
                "config.example.toml",
            ],
        );
    }
    // The commands that need no config still run without one.
    let key = work.path().join("key.txt");
    let run = cli_in(
        work.path(),
        None,
        &["keygen", "-o", path_arg(&key)],
        &[QUIET],
    );
    run.expect_code(exit::OK);
    let signing = work.path().join("new.key");
    let run = cli_in(
        work.path(),
        None,
        &["signing-key", "--new", "-o", path_arg(&signing)],
        &[QUIET],
    );
    run.expect_code(exit::OK);
    // A config from the environment alone, naming the store, is a config.
    let store = work.path().join("store").display().to_string();
    let env = [QUIET, ("IMMICH_BACKUP__STORAGE__URL", store.as_str())];
    cli_in(work.path(), None, &["--json", "init"], &env).expect_code(exit::OK);
}

// ---------------------------------------------------------------------------------------------------
// 4. A passphrase-protected identity (`age -p`) without a terminal

#[test]
fn a_passphrase_identity_without_terminal_or_variable_says_how_to_give_the_passphrase() {
    use std::io::Write;
    let work = tempdir();
    let id = age::x25519::Identity::generate();
    let encryptor = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from(
        "correct horse battery staple",
    ));
    let mut sealed = Vec::new();
    let mut w = encryptor.wrap_output(&mut sealed).unwrap();
    use age::secrecy::ExposeSecret;
    writeln!(w, "{}", id.to_string().expose_secret()).unwrap();
    w.finish().unwrap();
    let protected = work.path().join("protected.age");
    fs::write(&protected, &sealed).unwrap();
    let store = work.path().join("store");
    let config = config_file(
        work.path(),
        &format!("[storage]\nurl = {:?}\n", store.display().to_string()),
    );
    cli_in(work.path(), Some(&config), &["init"], &[QUIET]).expect_code(exit::OK);
    // stdin is not a terminal (the test's null device), and IMMICH_BACKUP_PASSPHRASE is unset;
    // an empty one counts as unset.
    for env in [&[QUIET][..], &[QUIET, ("IMMICH_BACKUP_PASSPHRASE", "")]] {
        for args in [
            &["check", "--identity", path_arg(&protected)][..],
            &["restore", "--dry-run", "--identity", path_arg(&protected)],
        ] {
            let run = cli_in(work.path(), Some(&config), args, env);
            assert_one_line_error(
                &run,
                exit::USAGE,
                &[
                    "this identity needs a passphrase: set IMMICH_BACKUP_PASSPHRASE or run on a terminal",
                    "protected.age",
                ],
            );
            assert!(!run.stderr.contains("wrong identity"), "{}", run.stderr);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 5. A live lock: who holds it, and when --remove-all is right

#[test]
fn a_live_lock_says_who_holds_it_and_when_remove_all_is_right() {
    let work = tempdir();
    let store = work.path().join("store");
    let config = config_file(
        work.path(),
        &format!(
            "[storage]\nurl = {:?}\n\n[lock]\nwait_secs = 0\n",
            store.display().to_string()
        ),
    );
    cli_in(work.path(), Some(&config), &["init"], &[QUIET]).expect_code(exit::OK);
    let cfg = immich_backup::config::Config::load(Some(&config)).unwrap();
    let (rt, lock) = hold_exclusive_lock(&cfg);
    let host = immich_backup::host::hostname();
    let pid = format!("pid {}", std::process::id());

    let run = cli_in(work.path(), Some(&config), &["prune"], &[QUIET]);
    assert_one_line_error(
        &run,
        exit::LOCKED,
        &[
            "exclusive lock of `prune`",
            &pid,
            &format!("on {host} (this machine)"),
            "s ago, refreshed ",
            "That run is alive",
            "`immich-backup unlock` removes it",
            "`immich-backup unlock --remove-all` only if you are sure the holder is gone",
        ],
    );
    // unlock keeps it, and says why and when --remove-all is right.
    let run = cli_in(work.path(), Some(&config), &["unlock"], &[QUIET]);
    run.expect_code(exit::OK);
    assert!(run.stdout.contains("kept live lock"), "{}", run.stdout);
    assert!(run.stdout.contains(&pid), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("Use --remove-all only if you are sure that run is gone"),
        "{}",
        run.stdout
    );
    drop(lock);
    drop(rt);
}

// ---------------------------------------------------------------------------------------------------
// 6. Settings that name the key to fix

/// A config in `dir` that a backup gets through up to the database: an UPLOAD_LOCATION with
/// Immich's folders, an initialised store, a key; `database` is the `[database]` table's body.
fn backup_ready(dir: &Path, database: &str) -> std::path::PathBuf {
    for f in ["library", "upload", "profile"] {
        fs::create_dir_all(dir.join("upload").join(f)).unwrap();
    }
    // One backup machine per folder: a second config for the same store keeps its keys (a
    // new signing key would not be the one the store's repository key was made for).
    let recipient = match fs::read_to_string(dir.join("recipient.txt")) {
        Ok(r) => r,
        Err(_) => {
            let key = immich_backup::crypto::generate_key();
            fs::write(dir.join("signing.key"), signing_text(&key)).unwrap();
            fs::write(dir.join("recipient.txt"), &key.recipient).unwrap();
            key.recipient
        }
    };
    let config = config_file(
        dir,
        &format!(
            "[immich]\nupload_location = \"upload\"\n\n[database]\n{database}\n\n\
             [storage]\nurl = {:?}\n\n[encryption]\nrecipients = [{:?}]\nsigning_key_file = \"signing.key\"\n\n\
             [backup]\ncache_dir = \"cache\"\n",
            dir.join("store").display().to_string(),
            recipient
        ),
    );
    cli_in(dir, Some(&config), &["init"], &[QUIET]).expect_code(exit::OK);
    config
}

#[test]
fn database_mode_is_read_in_any_case_and_a_wrong_one_names_the_valid_values() {
    let work = tempdir();
    let store = work.path().join("store").display().to_string();
    for mode in ["Local", "DOCKER", "local"] {
        let config = config_file(
            work.path(),
            &format!("[storage]\nurl = {store:?}\n[database]\nmode = {mode:?}\n[backup]\non_unreadable = \"Fail\"\n"),
        );
        cli_in(work.path(), Some(&config), &["init"], &[QUIET]).expect_code(exit::OK);
    }
    let config = config_file(
        work.path(),
        &format!("[storage]\nurl = {store:?}\n[database]\nmode = \"lokal\"\n"),
    );
    let run = cli_in(work.path(), Some(&config), &["snapshots"], &[QUIET]);
    assert_one_line_error(
        &run,
        exit::USAGE,
        &["[database] mode = \"lokal\": use \"docker\" or \"local\""],
    );
    assert!(!run.stderr.contains("variant"), "{}", run.stderr);
    let config = config_file(
        work.path(),
        &format!("[storage]\nurl = {store:?}\n[backup]\non_unreadable = \"skip\"\n"),
    );
    let run = cli_in(work.path(), Some(&config), &["snapshots"], &[QUIET]);
    assert_one_line_error(
        &run,
        exit::USAGE,
        &["[backup] on_unreadable = \"skip\": use \"warn\" or \"fail\""],
    );
}

#[test]
fn a_store_folder_without_write_permission_names_the_folder() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let work = tempdir();
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let store = work.path().join("store");
    let config = config_file(
        work.path(),
        &format!(
            "[storage]\nurl = {:?}\n[lock]\nwait_secs = 0\n",
            store.display().to_string()
        ),
    );
    cli_in(work.path(), Some(&config), &["init"], &[QUIET]).expect_code(exit::OK);
    // A real folder this run may not write to: as root (where permissions do not bite) the run is
    // another user (nobody) and the folder stays root's; otherwise the folder is made read-only.
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        fs::set_permissions(&store, fs::Permissions::from_mode(0o555)).unwrap();
    }
    let mut cmd = command(Some(&config), &["prune"]);
    cmd.current_dir(work.path()).env("IMMICH_BACKUP_LOG", "off");
    if root {
        cmd.uid(65534).gid(65534);
    }
    let run = run_to_end(cmd);
    fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).unwrap();
    assert_one_line_error(
        &run,
        exit::STORAGE,
        &[
            "permission denied writing locks/",
            &format!("in the folder {}", store.display()),
            "write access",
        ],
    );
    assert!(!run.stderr.contains("Generic"), "{}", run.stderr);
}

#[test]
fn an_unreachable_docker_host_names_the_key() {
    let work = tempdir();
    let config = backup_ready(work.path(), "docker_host = \"tcp://127.0.0.1:1\"");
    let run = cli_in(work.path(), Some(&config), &["backup"], &[QUIET]);
    assert_one_line_error(
        &run,
        exit::DOCKER,
        &[
            "the Docker Engine at tcp://127.0.0.1:1 ([database] docker_host, or DOCKER_HOST) is unreachable",
            "Connection refused",
            "mode = \"local\"",
        ],
    );
    assert!(!run.stderr.contains("hyper"), "{}", run.stderr);
}

#[test]
fn an_unknown_database_role_or_database_names_the_key() {
    let work = tempdir();
    let cluster = immich_backup::demo::sample::PgCluster::start(None).unwrap();
    let local = |user: &str, db: &str| {
        format!(
            "mode = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nbin_dir = {:?}\nusername = {user:?}\ndatabase = {db:?}",
            cluster.port,
            cluster.bin_dir.display().to_string()
        )
    };
    let config = backup_ready(work.path(), &local("nobody_here", "postgres"));
    let run = cli_in(work.path(), Some(&config), &["backup"], &[QUIET]);
    assert_one_line_error(
        &run,
        exit::DATABASE,
        &[
            "role \"nobody_here\" does not exist",
            "set [database] username",
        ],
    );
    let config = backup_ready(work.path(), &local("postgres", "no_such_db"));
    let run = cli_in(work.path(), Some(&config), &["backup"], &[QUIET]);
    assert_one_line_error(
        &run,
        exit::DATABASE,
        &[
            "database \"no_such_db\" does not exist",
            "set [database] database",
        ],
    );
}

// ---------------------------------------------------------------------------------------------------
// 7. Nothing said about nothing

#[test]
fn a_failed_run_leaves_no_reused_uploads_line_in_the_next() {
    let work = tempdir();
    let config = backup_ready(work.path(), "docker_host = \"tcp://127.0.0.1:1\"");
    let info = [("IMMICH_BACKUP_LOG", "immich_backup=info")];
    for _ in 0..2 {
        let run = cli_in(work.path(), Some(&config), &["backup"], &info);
        run.expect_code(exit::DOCKER);
        assert!(run.stderr.contains("backup started"), "{}", run.stderr);
        assert!(!run.stderr.contains("reused the uploads"), "{}", run.stderr);
    }
}

// ---------------------------------------------------------------------------------------------------
// 8. Log format: colours only on a terminal, never with NO_COLOR; JSON on request

/// Run the binary with stderr on a new pseudo-terminal; what it wrote there.
fn stderr_on_a_terminal(mut cmd: std::process::Command) -> String {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes the two descriptors it opens into the given integers; the other
    // arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = cmd.stderr(slave).spawn().unwrap();
    drop(cmd);
    child.wait().unwrap();
    let mut out = Vec::new();
    let mut master = std::fs::File::from(master);
    let mut buf = [0u8; 4096];
    // Reading the master ends with EIO once every slave descriptor is closed.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn logs_are_coloured_only_on_a_terminal_without_no_color_and_json_on_request() {
    let work = tempdir();
    let config = backup_ready(work.path(), "docker_host = \"tcp://127.0.0.1:1\"");
    let info = ("IMMICH_BACKUP_LOG", "immich_backup=info");
    const ESC: &str = "\x1b[";

    // Not a terminal (a pipe: docker logs, journald): no colours.
    let run = cli_in(work.path(), Some(&config), &["backup"], &[info]);
    run.expect_code(exit::DOCKER);
    assert!(run.stderr.contains("backup started"), "{}", run.stderr);
    assert!(!run.stderr.contains(ESC), "{:?}", run.stderr);

    // A terminal: colours, unless NO_COLOR is set.
    let on_terminal = |no_color: Option<&str>| {
        let mut cmd = command(Some(&config), &["backup"]);
        cmd.current_dir(work.path()).env(info.0, info.1);
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        stderr_on_a_terminal(cmd)
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains("backup started"), "{coloured:?}");
    assert!(coloured.contains(ESC), "{coloured:?}");
    let plain = on_terminal(Some("1"));
    assert!(plain.contains("backup started"), "{plain:?}");
    assert!(!plain.contains(ESC), "{plain:?}");

    // --log-format json: one JSON object a line; the error stays one `error: …` line.
    for how in [&["--log-format", "json"][..], &[]] {
        let mut args = how.to_vec();
        args.push("backup");
        let env: &[(&str, &str)] = if how.is_empty() {
            &[info, ("IMMICH_BACKUP_LOG_FORMAT", "json")]
        } else {
            &[info]
        };
        let run = cli_in(work.path(), Some(&config), &args, env);
        run.expect_code(exit::DOCKER);
        let mut events = 0;
        for line in run.stderr.lines() {
            if line.starts_with("error: ") {
                assert!(line.contains("docker_host"), "{line}");
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(v["level"].is_string(), "{v}");
            events += 1;
            if v["fields"]["message"] == "backup started" {
                assert!(v["fields"]["snapshot"].is_string(), "{v}");
            }
        }
        assert!(events >= 1, "{}", run.stderr);
        assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);
    }
    // A wrong format is a usage error naming the valid ones.
    let run = cli_in(
        work.path(),
        Some(&config),
        &["--log-format", "xml", "snapshots"],
        &[],
    );
    run.expect_code(exit::USAGE);
    assert!(
        run.stderr.contains("text") && run.stderr.contains("json"),
        "{}",
        run.stderr
    );
}
