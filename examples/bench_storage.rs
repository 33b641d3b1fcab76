//! Storage benchmark (run it through `bench/storage.sh`): back up one sample Immich library
//! (a throwaway PostgreSQL cluster with an Immich-like database, plus the sample UPLOAD_LOCATION grown
//! with incompressible "photos" and "videos" to the requested size) with the `immich-backup` binary
//!
//! 1. to a local folder store (`file://`),
//! 2. to a local S3 server (s3s-fs, in this process, SigV4 checked, over plain http on 127.0.0.1),
//!
//! each as a first (full) and a second (nothing changed) run, next to a plain
//! `tar -cf - library upload profile | age -r RECIPIENT` of the same originals. Prints wall time,
//! throughput over the originals' bytes, and the peak RSS of each process.
//!
//! Usage: bench_storage BINARY [SIZE_MB] [CONCURRENCY]

#[path = "../tests/common/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use immich_backup::demo::sample::{self, PgCluster};

struct Run {
    name: String,
    secs: f64,
    max_rss_kib: u64,
    ok: bool,
    note: String,
}

/// Run `program args…` under GNU time, which reports the peak RSS of the process (for a shell
/// pipeline: of its largest process). Measuring with wait4 from here would not do: a child spawned
/// by this (large) process starts with this process's high-water mark.
fn measure(name: &str, program: &Path, args: &[&str], env: &[(&str, &str)], scratch: &Path) -> Run {
    let rss_file = scratch.join("rss.txt");
    let start = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .arg(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run /usr/bin/time (Debian package `time`)");
    let secs = start.elapsed().as_secs_f64();
    let max_rss_kib = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success();
    let mut note = String::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&stdout) {
        if let Some(n) = v.get("files_new") {
            note = format!(
                "files new {}, stored {} MiB",
                n,
                v["bytes_stored"].as_u64().unwrap_or(0) / (1 << 20)
            );
        }
    }
    if !ok {
        note = format!("FAILED: {}", stderr.lines().last().unwrap_or(""));
    }
    Run {
        name: name.into(),
        secs,
        max_rss_kib,
        ok,
        note,
    }
}

fn dir_bytes(root: &Path, folders: &[&str]) -> u64 {
    folders
        .iter()
        .flat_map(|f| walkdir::WalkDir::new(root.join(f)).into_iter().flatten())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn config(
    path: &Path,
    cluster: &PgCluster,
    upload: &Path,
    key: &immich_backup::crypto::NewKey,
    cache: &Path,
    storage: &str,
) {
    use age::secrecy::ExposeSecret;
    // The sample database's assets have no files here (the library is generated to a size): the
    // consistency check would call every backup partial, so its verdict is only logged.
    std::fs::write(
        path,
        format!(
            "[immich]\nupload_location = {:?}\n[database]\nmode = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nbin_dir = {:?}\n[storage]\n{storage}\n[encryption]\nrecipients = [{:?}]\nsigning_key = {:?}\n[backup]\ncache_dir = {:?}\non_missing_original = \"ignore\"\n",
            upload.display().to_string(),
            cluster.port,
            cluster.bin_dir.display().to_string(),
            key.recipient,
            key.signing.to_text().expose_secret(),
            cache.display().to_string()
        ),
    )
    .unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = PathBuf::from(
        args.get(1)
            .expect("usage: bench_storage BINARY [SIZE_MB] [CONCURRENCY]"),
    );
    let size_mb: u64 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(512);
    let concurrency: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(8);
    let work = tempfile::Builder::new()
        .prefix("immich-backup-bench-")
        .tempdir()
        .unwrap();
    let w = work.path();
    eprintln!(
        "bench: setting up in {} ({size_mb} MiB of originals)",
        w.display()
    );

    let cluster = PgCluster::start(None).expect("PostgreSQL cluster");
    sample::create_immich_like_db(&cluster, "immich", 5000).unwrap();
    let upload = w.join("upload-location");
    sample::create_sample_library(&upload).unwrap();
    // Grow it with photos (2–6 MiB) and a few videos (40–90 MiB), incompressible like real media.
    let mut n = 0u64;
    while dir_bytes(&upload, &["library", "upload", "profile"]) < size_mb << 20 {
        let (rel, size) = if n % 25 == 24 {
            (
                format!("library/admin/2025/VID_{n:05}.mp4"),
                (40 + (n * 7) % 50) << 20,
            )
        } else {
            (
                format!("library/admin/2025/{:02}/IMG_{n:05}.jpg", n % 12 + 1),
                (2 << 20) + (n * 611_953) % (4 << 20),
            )
        };
        sample::add_photo(&upload, &rel, size as usize, 10_000 + n).unwrap();
        n += 1;
    }
    let originals = dir_bytes(&upload, &["library", "upload", "profile"]);
    let files = ["library", "upload", "profile"]
        .iter()
        .flat_map(|f| walkdir::WalkDir::new(upload.join(f)).into_iter().flatten())
        .filter(|e| e.file_type().is_file())
        .count();
    let key = immich_backup::crypto::generate_key();

    let server = s3::S3Server::start(&["bench"]);
    let file_store = w.join("file-store");
    std::fs::create_dir_all(&file_store).unwrap();
    let file_cfg = w.join("file.toml");
    config(
        &file_cfg,
        &cluster,
        &upload,
        &key,
        &w.join("cache-file"),
        &format!(
            "url = \"file://{}\"\nconcurrency = {concurrency}",
            file_store.display()
        ),
    );
    let s3_cfg = w.join("s3.toml");
    config(
        &s3_cfg,
        &cluster,
        &upload,
        &key,
        &w.join("cache-s3"),
        &format!(
            "url = \"s3://bench/immich\"\nendpoint = \"{}\"\nallow_http = true\nregion = \"us-east-1\"\naccess_key_id = \"{}\"\nconcurrency = {concurrency}",
            server.endpoint(),
            s3::ACCESS_KEY
        ),
    );

    let mut runs = Vec::new();
    let tar_out = w.join("tar.age");
    let pipeline = format!(
        "tar -C '{}' -cf - library upload profile | age -r '{}' -o '{}'",
        upload.display(),
        key.recipient,
        tar_out.display()
    );
    runs.push(measure(
        "tar | age (originals only)",
        Path::new("/bin/sh"),
        &["-c", &pipeline],
        &[],
        w,
    ));
    let env = [
        ("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", s3::SECRET_KEY),
        ("IMMICH_BACKUP_LOG", "warn"),
    ];
    for (name, cfg) in [
        ("immich-backup → file:// (first run)", &file_cfg),
        ("immich-backup → file:// (unchanged)", &file_cfg),
        ("immich-backup → local S3 (first run)", &s3_cfg),
        ("immich-backup → local S3 (unchanged)", &s3_cfg),
    ] {
        let cfg = cfg.display().to_string();
        runs.push(measure(
            name,
            &bin,
            &["--config", &cfg, "--no-progress", "--json", "backup"],
            &env,
            w,
        ));
    }

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "\nsample library: {files} originals, {:.0} MiB (+ a pg_dumpall of a 5000-asset database); concurrency {concurrency}; {cpus} CPU(s)\n",
        originals as f64 / 1048576.0
    );
    println!(
        "{:<40} {:>8} {:>10} {:>10}  notes",
        "what", "seconds", "MiB/s", "peak RSS"
    );
    for r in &runs {
        println!(
            "{:<40} {:>8.1} {:>10.1} {:>7} MiB  {}{}",
            r.name,
            r.secs,
            originals as f64 / 1048576.0 / r.secs,
            r.max_rss_kib / 1024,
            if r.ok { "" } else { "FAILED " },
            r.note
        );
    }
    println!("\n(MiB/s = the originals' size / wall time; the S3 server runs in the benchmark process, on the same CPUs.)");
    if runs.iter().any(|r| !r.ok) {
        std::process::exit(1);
    }
}
