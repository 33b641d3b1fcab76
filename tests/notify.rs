//! Notifications and hooks end to end, with the real binary and real servers on 127.0.0.1:
//!
//! - an HTTP receiver (hyper, in this process) standing in for ntfy and a webhook: it records each
//!   request's method, path, headers and body;
//! - a real SMTP server, Debian's `python3-aiosmtpd` (`python3 -m aiosmtpd -n`), which prints every
//!   mail it accepts (no AUTH: aiosmtpd offers it only over TLS, so the mail goes without);
//! - a real PostgreSQL cluster with an Immich-like database and a sample library for backups that
//!   succeed or are partial; a dead database port for backups that fail.
//!
//! Covered: the request shapes (ntfy's POST with Title/Priority/Tags/Bearer, the webhook's JSON and
//! Discord bodies, the mail's subject and body) on success, partial and failure; the hooks'
//! environment; a failing or timed-out `before_backup` (exit 17, nothing written, its process
//! group killed); dead and silent receivers (a warning, the backup's exit code unchanged, bounded
//! time); `notify test`; the agent's scheduled backup notifying; config mistakes naming the key.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli, Source, BIN};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use immich_backup::demo::sample;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Seen {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// An HTTP server on 127.0.0.1 that answers 200 to everything and records what it got.
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        runtime.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                                })
                                .collect();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            log.lock().unwrap().push(Seen {
                                method,
                                path,
                                headers,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("{}"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), svc)
                        .await;
                });
            }
        });
        Receiver {
            port,
            seen,
            _runtime: runtime,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The requests to `path`, oldest first.
    fn at(&self, path: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

/// aiosmtpd on 127.0.0.1, printing each mail to a file; stopped on drop.
struct Smtp {
    port: u16,
    out: PathBuf,
    child: Child,
}

impl Smtp {
    fn start(dir: &Path) -> Smtp {
        let port = free_port();
        let out = dir.join(format!("smtp-{port}.out"));
        let child = Command::new("/usr/bin/python3")
            .args(["-u", "-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd (apt-get install python3-aiosmtpd)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Smtp { port, out, child }
    }

    /// The mails received so far, each as aiosmtpd printed it (headers, blank line, body).
    fn mails(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.split("---------- MESSAGE FOLLOWS ----------")
            .filter(|m| m.contains("END MESSAGE"))
            .map(str::to_string)
            .collect()
    }

    fn wait_for_mails(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mails = self.mails();
            if mails.len() >= n || Instant::now() > deadline {
                return mails;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn toml(&self) -> String {
        format!(
            "[notify.email]\nsmtp_url = \"smtp://127.0.0.1:{}\"\nfrom = \"Immich backup <backup@example.org>\"\nto = [\"me@example.org\", \"you@example.org\"]\n",
            self.port
        )
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `KEY=value` lines a hook wrote with `env`.
fn env_file(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the hook wrote no {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A hook that records its IMMICH_BACKUP_* environment in `file`.
fn record_env(file: &Path) -> String {
    format!("env | grep ^IMMICH_BACKUP_ > {}", file.display())
}

/// The snapshot folders of a folder store.
fn snapshot_count(store: &Path) -> usize {
    std::fs::read_dir(store.join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0)
}

const TOKEN: &str = "tk_notify_test_secret_123";
const HOOK_SECRET: &str = "/api/webhooks/42/Very-Secret-Webhook-Token";

/// Success, partial and a failing `before_backup` with a real database: every channel's request,
/// the hooks' environment, nothing written when the hook fails, and secrets never in the output.
#[test]
fn backups_notify_every_channel_and_hooks_see_the_outcome() {
    let source = Source::new(40);
    let http = Receiver::start();
    let smtp = Smtp::start(source.work.path());
    let after_env = source.work.path().join("after.env");
    let paused = source.work.path().join("paused");
    let config = |hooks: &str, extra: &str| {
        let mut toml = source.toml();
        toml.extra = format!(
            "[notify]\non = [\"failure\", \"partial\", \"success\"]\ntimeout_secs = 5\n\n\
             [notify.ntfy]\nurl = {:?}\ntoken = {TOKEN:?}\ntags = [\"immich\", \"floppy_disk\"]\n\n\
             [notify.webhook]\nurl = {:?}\n\n{}\n[hooks]\n{hooks}\n{extra}",
            http.url("/mytopic"),
            http.url(HOOK_SECRET),
            smtp.toml(),
        );
        toml.write(&source.work.path().join("config.toml"))
    };

    // A failing before_backup: exit 17, its message, nothing written; on_failure and the
    // notifications still run.
    let failed_env = source.work.path().join("failed.env");
    let cfg = config(
        &format!(
            "before_backup = \"echo pausing; echo 'cannot reach the Immich API' >&2; exit 7\"\non_failure = {:?}\n",
            record_env(&failed_env)
        ),
        "",
    );
    let run = cli(Some(&cfg), &["backup"], &[]);
    run.expect_code(17);
    let error = run.error_lines().join("\n");
    assert!(
        error
            .contains("[hooks] before_backup failed (exit status: 7): cannot reach the Immich API"),
        "{error}"
    );
    assert_eq!(snapshot_count(&source.store), 0, "nothing may be written");
    assert!(
        !source.store.join("data").exists()
            || std::fs::read_dir(source.store.join("data"))
                .unwrap()
                .count()
                == 0
    );
    let env = env_file(&failed_env);
    assert_eq!(env["IMMICH_BACKUP_STATUS"], "failure");
    assert_eq!(env["IMMICH_BACKUP_EXIT_CODE"], "17");
    assert_eq!(env["IMMICH_BACKUP_HOOK"], "on_failure");
    assert!(env["IMMICH_BACKUP_ERROR"].contains("before_backup"));
    assert!(!env.contains_key("IMMICH_BACKUP_SNAPSHOT"));
    let hook = &http.at(HOOK_SECRET)[0].json();
    assert_eq!(hook["status"], "failure");
    assert_eq!(hook["exit_code"], 17);
    assert!(hook["reason"]
        .as_str()
        .unwrap()
        .contains("cannot reach the Immich API"));
    assert!(
        run.stderr.contains("pausing"),
        "hook output is logged: {}",
        run.stderr
    );
    http.clear();
    let mails_before = smtp.wait_for_mails(1).len();
    assert_eq!(mails_before, 1);

    // Success: before_backup ran first, after_backup sees the snapshot.
    let cfg = config(
        &format!(
            "before_backup = \"touch {}\"\nafter_backup = {:?}\n",
            paused.display(),
            record_env(&after_env)
        ),
        "",
    );
    // A setting from the environment (a secret, here the database password) reaches the backup,
    // never the hook.
    let run = cli(
        Some(&cfg),
        &["--json", "backup"],
        &[("IMMICH_BACKUP__DATABASE__PASSWORD", "not-for-hooks")],
    );
    run.expect_code(0);
    let snapshot = run.json()["snapshot"].as_str().unwrap().to_string();
    assert!(paused.exists());
    let env = env_file(&after_env);
    assert!(
        !env.keys().any(|k| k.starts_with("IMMICH_BACKUP__")),
        "{env:?}"
    );
    assert_eq!(env["IMMICH_BACKUP_SNAPSHOT"], snapshot);
    assert_eq!(env["IMMICH_BACKUP_STATUS"], "success");
    assert_eq!(env["IMMICH_BACKUP_EXIT_CODE"], "0");
    assert!(!env.contains_key("IMMICH_BACKUP_ERROR"));

    let ntfy = http.at("/mytopic");
    assert_eq!(ntfy.len(), 1, "{ntfy:?}");
    let n = &ntfy[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.header("authorization"), format!("Bearer {TOKEN}"));
    assert!(n.header("title").ends_with(": backup succeeded"), "{n:?}");
    assert_eq!(n.header("priority"), "2");
    assert_eq!(n.header("tags"), "white_check_mark,immich,floppy_disk");
    assert!(
        n.body.contains(&format!("Snapshot: {snapshot}")),
        "{}",
        n.body
    );
    let hook = http.at(HOOK_SECRET)[0].json();
    assert_eq!(
        http.at(HOOK_SECRET)[0].header("content-type"),
        "application/json"
    );
    assert_eq!(hook["event"], "backup.success");
    assert_eq!(hook["status"], "success");
    assert_eq!(hook["snapshot"], snapshot.as_str());
    assert_eq!(hook["exit_code"], 0);
    assert_eq!(hook["files"], run.json()["files"]);
    assert!(hook["reason"].is_null());
    assert!(hook["host"].as_str().is_some_and(|h| !h.is_empty()));
    let mails = smtp.wait_for_mails(2);
    let mail = &mails[1];
    assert!(mail.contains("Subject: immich-backup on "), "{mail}");
    assert!(mail.contains(": backup succeeded"), "{mail}");
    assert!(
        mail.contains("To: me@example.org, you@example.org"),
        "{mail}"
    );
    assert!(mail.contains(&format!("Snapshot: {snapshot}")), "{mail}");
    http.clear();

    // Partial: an original the database names is gone (exit 3); the reason says so.
    let gone = sample::asset_original_path(20);
    std::fs::remove_file(source.upload.join(&gone)).unwrap();
    let run = cli(Some(&cfg), &["backup"], &[]);
    run.expect_code(3);
    let env = env_file(&after_env);
    assert_eq!(env["IMMICH_BACKUP_STATUS"], "partial");
    assert_eq!(env["IMMICH_BACKUP_EXIT_CODE"], "3");
    let hook = http.at(HOOK_SECRET)[0].json();
    assert_eq!(hook["status"], "partial");
    assert_eq!(hook["exit_code"], 3);
    assert!(
        hook["reason"]
            .as_str()
            .unwrap()
            .contains("the database names are not in the snapshot"),
        "{hook}"
    );
    let n = &http.at("/mytopic")[0];
    assert_eq!(n.header("priority"), "3");
    assert!(n.header("tags").starts_with("warning,"));
    let mails = smtp.wait_for_mails(3);
    assert!(mails[2].contains(": backup partial"), "{}", mails[2]);
    assert!(mails[2].contains("Reason: "), "{}", mails[2]);

    // Secrets never reached the output.
    for secret in [TOKEN, "Very-Secret-Webhook-Token"] {
        assert!(!run.stderr.contains(secret) && !run.stdout.contains(secret));
    }
}

/// A backup that fails (the database is not there): ntfy at high priority, a Discord-style
/// webhook, a mail with the reason, and on_failure's environment; the same from the agent's
/// scheduled backup. `notify test` reports each channel.
#[test]
fn failed_backups_notify_with_the_reason_from_the_cli_and_the_agent() {
    let work = common::tempdir();
    let lib = work.path().join("lib");
    sample::create_sample_library(&lib).unwrap();
    std::fs::create_dir_all(work.path().join("store")).unwrap();
    let http = Receiver::start();
    let smtp = Smtp::start(work.path());
    let failed_env = work.path().join("failed.env");
    let key = immich_backup::crypto::generate_key();
    let health = free_port();
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[immich]\nupload_location = {:?}\n\n[database]\nmode = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nbin_dir = {:?}\n\n\
             [storage]\nurl = \"file://{}\"\n\n[encryption]\nrecipients = [{:?}]\nsigning_key = {:?}\n\n[backup]\ncache_dir = {:?}\n\n\
             [schedule]\ncron = \"@yearly\"\nbackup_on_start = true\n\n[check]\ncron = \"*/2 * * * * *\"\nidentity_file = \"/nonexistent/identity.txt\"\n\n[agent]\nlisten = \"127.0.0.1:{health}\"\n\n\
             [notify.ntfy]\nurl = {:?}\npriority = \"max\"\n\n[notify.webhook]\nurl = {:?}\nformat = \"discord\"\n\n{}\n\
             [hooks]\non_failure = {:?}\n",
            lib.display().to_string(),
            free_port(),
            sample::find_pg_bin_dir().unwrap().display().to_string(),
            work.path().join("store").display(),
            key.recipient,
            common::signing_text(&key),
            work.path().join("cache").display().to_string(),
            http.url("/alerts"),
            http.url(HOOK_SECRET),
            smtp.toml(),
            record_env(&failed_env),
        ),
    )
    .unwrap();

    let run = cli(Some(&config), &["backup"], &[]);
    run.expect_code(14);
    let reason = run.error_lines()[0]
        .trim_start_matches("error: ")
        .to_string();
    let n = &http.at("/alerts")[0];
    assert_eq!(n.header("priority"), "5", "the configured priority wins");
    assert!(n.header("title").ends_with(": backup failed"), "{n:?}");
    assert!(n.header("tags").starts_with("rotating_light"));
    assert!(n.header("authorization").is_empty());
    assert!(
        n.body.contains(&format!("Reason: {reason}")),
        "{}\n{reason}",
        n.body
    );
    assert!(n.body.contains("exit code 14"), "{}", n.body);
    let discord = http.at(HOOK_SECRET)[0].json();
    let content = discord["content"].as_str().unwrap();
    assert_eq!(discord.as_object().unwrap().len(), 1, "{discord}");
    assert!(content.starts_with("**immich-backup on "), "{content}");
    assert!(content.contains(&reason), "{content}");
    let mails = smtp.wait_for_mails(1);
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].contains(": backup failed"), "{}", mails[0]);
    assert!(mails[0].contains("database"), "{}", mails[0]);
    let env = env_file(&failed_env);
    assert_eq!(env["IMMICH_BACKUP_STATUS"], "failure");
    assert_eq!(env["IMMICH_BACKUP_EXIT_CODE"], "14");
    assert_eq!(env["IMMICH_BACKUP_ERROR"], reason);
    assert!(!env.contains_key("IMMICH_BACKUP_SNAPSHOT"));

    // `notify test`: every channel answers; the ntfy token may come from the environment.
    http.clear();
    let env = [("IMMICH_BACKUP__NOTIFY__NTFY__TOKEN", TOKEN)];
    let run = cli(Some(&config), &["--json", "notify", "test"], &env);
    run.expect_code(0);
    let channels = run.json()["channels"].clone();
    assert_eq!(channels.as_array().unwrap().len(), 3, "{channels}");
    assert!(channels.as_array().unwrap().iter().all(|c| c["ok"] == true));
    let n = &http.at("/alerts")[0];
    assert!(n.header("title").ends_with("test notification"), "{n:?}");
    assert_eq!(n.header("authorization"), format!("Bearer {TOKEN}"));
    assert!(smtp.wait_for_mails(2)[1].contains("This is a test"));

    // The agent's scheduled backup (backup_on_start) notifies the same way.
    http.clear();
    let mut agent = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.at(HOOK_SECRET).is_empty() || http.at("/alerts").is_empty() {
        assert!(Instant::now() < deadline, "the agent sent no notification");
        std::thread::sleep(Duration::from_millis(200));
    }
    let content = http.at(HOOK_SECRET)[0].json()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        content.contains("backup failed") && content.contains("database"),
        "{content}"
    );
    // Its scheduled check too (here one that cannot run: its identity file is not there).
    let checked = || {
        http.at(HOOK_SECRET).iter().any(|s| {
            let c = s.json()["content"].as_str().unwrap_or("").to_string();
            c.contains(": check failed")
                && c.contains("the check could not run")
                && c.contains("identity_file")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !checked() {
        assert!(
            Instant::now() < deadline,
            "no check notification: {:?}",
            http.at(HOOK_SECRET)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
}

/// Dead and silent receivers: the backup still succeeds (exit 0) within bounded time, with a
/// warning naming the channel and the cause; `notify test` exits 1. A before_backup hook that
/// runs too long is killed with what it started, and the backup does not run.
#[test]
fn undeliverable_notifications_warn_and_a_hanging_hook_is_killed() {
    let source = Source::new(20);
    // Listening, never answering: connects, then silence.
    let silent = StdListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let dead_port = free_port();
    let mut toml = source.toml();
    toml.extra = format!(
        "[notify]\non = [\"success\"]\ntimeout_secs = 2\n\n\
         [notify.ntfy]\nurl = \"http://127.0.0.1:{silent_port}/topic\"\ntoken = {TOKEN:?}\n\n\
         [notify.webhook]\nurl = \"http://127.0.0.1:{dead_port}{HOOK_SECRET}\"\n"
    );
    let cfg = toml.write(&source.work.path().join("config.toml"));
    let started = Instant::now();
    let run = cli(Some(&cfg), &["backup"], &[]);
    run.expect_code(0);
    assert!(started.elapsed() < Duration::from_secs(60));
    let warned = |channel: &str, cause: &str| {
        run.stderr.lines().any(|l| {
            l.contains("WARN")
                && l.contains("notification not delivered")
                && l.contains(channel)
                && l.contains(cause)
        })
    };
    assert!(warned("ntfy", "timed out"), "{}", run.stderr);
    assert!(warned("webhook", "Connection refused"), "{}", run.stderr);
    assert!(
        !run.stderr.contains(TOKEN) && !run.stderr.contains("Very-Secret"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot_count(&source.store), 1);

    let run = cli(Some(&cfg), &["notify", "test"], &[]);
    run.expect_code(1);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("ntfy: FAILED: 127.0.0.1:") && l.contains("timed out")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("webhook: FAILED: 127.0.0.1:"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("Very-Secret"), "{}", run.stdout);

    // A hook past its timeout: killed with the sleep it left in the background.
    let pid_file = source.work.path().join("bg.pid");
    let mut toml = source.toml();
    toml.extra = format!(
        "[hooks]\ntimeout_secs = 1\nbefore_backup = \"sleep 300 & echo $! > {}; sleep 300\"\n",
        pid_file.display()
    );
    let cfg = toml.write(&source.work.path().join("hang.toml"));
    let started = Instant::now();
    let run = cli(Some(&cfg), &["backup"], &[]);
    run.expect_code(17);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let error = run.error_lines().join("\n");
    assert!(
        error.contains("[hooks] before_backup timed out after 1s and was killed"),
        "{error}"
    );
    assert_eq!(snapshot_count(&source.store), 1, "no new snapshot");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Gone, or a zombie its new parent has not reaped yet.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| t.rsplit(") ").next().and_then(|r| r.chars().next()));
    assert!(
        matches!(state, None | Some('Z')),
        "the hook's background sleep {pid} survived ({state:?})"
    );
}

/// Mistakes in [notify] and [hooks] are one line naming the key (exit 2).
#[test]
fn notify_and_hooks_config_mistakes_name_the_key() {
    let work = common::tempdir();
    let cases = [
        ("[notify]\non = [\"sometimes\"]\n", "[notify] on = \"sometimes\""),
        ("[notify.ntfy]\nurl = \"ntfy.sh/topic\"\n", "[notify.ntfy] url must be"),
        ("[notify.ntfy]\nurl = \"https://ntfy.sh/t\"\npriority = \"loud\"\n", "[notify.ntfy] priority \"loud\""),
        ("[notify.webhook]\nurl = \"https://x.example\"\nformat = \"teams\"\n", "[notify.webhook] format = \"teams\""),
        ("[notify.email]\nsmtp_url = \"http://mail.example\"\nfrom = \"a@b.example\"\nto = [\"c@d.example\"]\n", "[notify.email] smtp_url must be"),
        ("[notify.email]\nsmtp_url = \"smtp://user:hunter22@mail.example\"\nfrom = \"not a mail\"\nto = [\"c@d.example\"]\n", "[notify.email] from \"not a mail\""),
        ("[notify.email]\nsmtp_url = \"smtps://mail.example\"\nfrom = \"a@b.example\"\n", "[notify.email] to is empty"),
        ("[hooks]\ntimeout_secs = 0\n", "[hooks] timeout_secs must be at least 1"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = work.path().join(format!("c{i}.toml"));
        std::fs::write(
            &file,
            format!("[storage]\nurl = \"file:///nonexistent\"\n{text}"),
        )
        .unwrap();
        let run = cli(Some(&file), &["notify", "test"], &[]);
        run.expect_code(2);
        let lines = run.error_lines();
        assert_eq!(lines.len(), 1, "{}", run.stderr);
        assert!(lines[0].contains(expected), "{expected}: {}", lines[0]);
        assert!(!run.stderr.contains("hunter22"));
    }
    // No channel: `notify test` says what to set.
    let file = work.path().join("none.toml");
    std::fs::write(&file, "[storage]\nurl = \"file:///nonexistent\"\n").unwrap();
    let run = cli(Some(&file), &["notify", "test"], &[]);
    run.expect_code(2);
    assert!(run.stderr.contains("[notify.ntfy] url"), "{}", run.stderr);
}
