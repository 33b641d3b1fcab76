//! Azurite (Microsoft's Azure Storage emulator, npm `azurite@3.35.0`) as a child process on
//! 127.0.0.1:<free port>, in memory, killed by PID when dropped.
//!
//! The binary is `$AZURITE_BLOB`, else `.ci/node_modules/.bin/azurite-blob` in this repository (what
//! `.ci/run` installs with `npm install --prefix .ci azurite@3.35.0`), else `azurite-blob` on PATH.
//!
//! Part of the shared test helpers (`tests/common/`), used by tests/cloud.rs as `common::azurite`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The emulator's well-known account and key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("AZURITE_BLOB") {
        return PathBuf::from(p);
    }
    let local =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/node_modules/.bin/azurite-blob");
    if local.exists() {
        return local;
    }
    PathBuf::from("azurite-blob")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Azurite {
    pub fn start() -> Azurite {
        let dir = tempfile::Builder::new()
            .prefix("azurite-")
            .tempdir()
            .unwrap();
        let bin = binary();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .args([
                    "--inMemoryPersistence",
                    "--disableTelemetry",
                    "--silent",
                    "--skipApiVersionCheck",
                ])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {} ({e}); install it with `npm install --no-save --prefix .ci azurite@3.35.0` (see .ci/run) or set AZURITE_BLOB",
                        bin.display()
                    )
                });
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut up = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited (port taken?): try another port
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if up {
                return Azurite {
                    port,
                    child,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = child.wait();
            eprintln!("azurite on port {port} did not come up: {err}");
        }
        panic!("azurite-blob ({}) did not start", bin.display());
    }

    /// The blob endpoint for object_store (`[storage] endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Create a container with a SharedKey-signed `PUT ?restype=container` (object_store cannot).
    pub fn create_container(&self, name: &str) {
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let version = "2023-11-03";
        let path = format!("/{ACCOUNT}/{name}");
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}{path}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(KEY)
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(string_to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let req = format!(
            "PUT {path}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let status = resp.lines().next().unwrap_or_default().to_string();
        assert!(
            status.contains(" 201 "),
            "creating container {name}: {status}\n{resp}"
        );
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
