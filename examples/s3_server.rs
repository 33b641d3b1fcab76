//! A standalone S3 server for the WAN benchmark (bench/wan.sh): the same s3s-fs server the tests and
//! bench/storage.sh use (SigV4 checked, plain http on 127.0.0.1:<free port>), with the given buckets,
//! its files in a fresh folder under `$TMPDIR`. It prints its endpoint on the first line of stdout
//! and serves until its stdin closes, so that every tool of the benchmark talks to one server.
//!
//! Usage: s3_server BUCKET… (access key and secret: those of tests/common/s3.rs, printed on line 2)

#[path = "../tests/common/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::io::{Read, Write};

fn main() {
    let buckets: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = buckets.iter().map(String::as_str).collect();
    let server = s3::S3Server::start(&names);
    let mut out = std::io::stdout();
    writeln!(out, "{}", server.endpoint()).unwrap();
    writeln!(out, "{} {}", s3::ACCESS_KEY, s3::SECRET_KEY).unwrap();
    writeln!(out, "{}", server.root.display()).unwrap();
    out.flush().unwrap();
    // Serve until the benchmark closes our stdin; drop the request log now and then (it only grows).
    let log = server.log.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(5));
        log.lock().unwrap().clear();
    });
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
