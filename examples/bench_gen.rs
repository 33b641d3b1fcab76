//! Data generators for the benchmarks in `bench/` (see bench/README section in the top README).
//!
//! ```sh
//! cargo run --release --example bench_gen -- library --scale 0.3 /tmp/ul     # sample UPLOAD_LOCATION
//! cargo run --release --example bench_gen -- small --files 100000 /tmp/small # only small files
//! cargo run --release --example bench_gen -- big --gib 4 /tmp/big            # one large file
//! cargo run --release --example bench_gen -- db --scale 0.3 --env /tmp/db.env # Immich-like database
//! ```
//!
//! Everything is deterministic (a seeded PRNG, fixed mtimes): the same arguments give the same bytes.
//! File contents are PRNG output, so they are incompressible like real photos and videos.
//!
//! `db` starts a throwaway PostgreSQL cluster ([`immich_backup::demo::sample::PgCluster`]), fills it, writes
//! `PGPORT=…` and `PG_BIN=…` to the `--env` file, and keeps the cluster running until its standard
//! input closes (or it gets SIGINT/SIGTERM); then it stops the cluster and removes it.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use immich_backup::demo::sample::{self, PgCluster};

#[derive(Parser)]
#[command(about = "Deterministic data for the immich-backup benchmarks")]
struct Args {
    /// PRNG seed.
    #[arg(long, global = true, default_value_t = 20261125)]
    seed: u64,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// A sample UPLOAD_LOCATION: photos (2–6 MB), videos (15–25 MB), thousands of small sidecars,
    /// avatars, and the generated folders a backup must skip. Scale 1 ≈ 1.5 GB of originals.
    Library {
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        dir: PathBuf,
    },
    /// An UPLOAD_LOCATION holding only small files (200 B – 4 KiB), 100 per folder.
    Small {
        #[arg(long, default_value_t = 100_000)]
        files: usize,
        dir: PathBuf,
    },
    /// An UPLOAD_LOCATION holding one large video.
    Big {
        #[arg(long, default_value_t = 4.0)]
        gib: f64,
        dir: PathBuf,
    },
    /// An Immich-like database on a throwaway cluster: [`sample::create_immich_like_db`] plus
    /// embedding-like rows. Scale 1 = 750,000 assets, i.e. 1.5 M asset rows (`asset` and
    /// `asset_exif`), 150,000 embedding rows and ≈ 700 MB of `pg_dumpall` output. Runs until stdin
    /// closes.
    Db {
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Assets (overrides --scale; each has an `asset` and an `asset_exif` row).
        #[arg(long)]
        assets: Option<usize>,
        /// Where the cluster's folder goes (default: the temp dir).
        #[arg(long)]
        base: Option<PathBuf>,
        /// File to write `PGPORT=` and `PG_BIN=` to once the database is ready.
        #[arg(long)]
        env: PathBuf,
    },
}

const USERS: [&str; 3] = [
    sample::ADMIN_ID,
    "5b6d2a3e-0c1f-4a8e-9d3b-7e2f1a0c9b02",
    "5b6d2a3e-0c1f-4a8e-9d3b-7e2f1a0c9b03",
];
/// 2021-01-01T00:00:00Z.
const MTIME_BASE: u64 = 1_609_459_200;
const MIB: u64 = 1024 * 1024;

/// splitmix64: fast, seedable, good enough to be incompressible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

struct Writer {
    root: PathBuf,
    seed: u64,
    n: u64,
    files: u64,
    bytes: u64,
    skipped_files: u64,
    skipped_bytes: u64,
}

impl Writer {
    fn new(root: &Path, seed: u64) -> Result<Writer> {
        if root.exists() && fs::read_dir(root)?.next().is_some() {
            anyhow::bail!("{} exists and is not empty", root.display());
        }
        fs::create_dir_all(root)?;
        Ok(Writer {
            root: root.to_path_buf(),
            seed,
            n: 0,
            files: 0,
            bytes: 0,
            skipped_files: 0,
            skipped_bytes: 0,
        })
    }

    /// Write `len` PRNG bytes (or `text` when given) to `rel`, with a fixed mtime.
    fn file(&mut self, rel: &str, len: u64, text: Option<&[u8]>) -> Result<()> {
        self.n += 1;
        let path = self.root.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let f = File::create(&path).with_context(|| path.display().to_string())?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        let len = match text {
            Some(t) => {
                out.write_all(t)?;
                t.len() as u64
            }
            None => {
                let mut rng = Rng::new(self.seed, self.n);
                let mut buf = vec![0u8; (1 << 20).min(len as usize)];
                let mut left = len;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    rng.fill(&mut buf[..n]);
                    out.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                len
            }
        };
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.set_modified(UNIX_EPOCH + Duration::from_secs(MTIME_BASE + self.n * 3607))?;
        let top = rel.split('/').next().unwrap_or_default();
        if sample::ORIGINAL_FOLDERS.contains(&top) {
            self.files += 1;
            self.bytes += len;
        } else {
            self.skipped_files += 1;
            self.skipped_bytes += len;
        }
        Ok(())
    }

    fn markers(&mut self) -> Result<()> {
        for f in sample::ORIGINAL_FOLDERS
            .iter()
            .chain(sample::GENERATED_FOLDERS.iter())
        {
            self.file(&format!("{f}/.immich"), 0, Some(b"1700000000000"))?;
        }
        Ok(())
    }

    fn report(&self, started: Instant) {
        println!(
            "{}: {} original files, {:.1} MiB to back up; {} files, {:.1} MiB in generated folders (skipped); {:.1}s",
            self.root.display(),
            self.files,
            self.bytes as f64 / MIB as f64,
            self.skipped_files,
            self.skipped_bytes as f64 / MIB as f64,
            started.elapsed().as_secs_f64()
        );
    }
}

fn xmp(rng: &mut Rng, name: &str) -> Vec<u8> {
    let pad = rng.range(200, 3000) as usize;
    let mut junk = vec![0u8; pad];
    rng.fill(&mut junk);
    let b64: String = junk
        .iter()
        .map(|b| {
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(*b % 64) as usize]
                as char
        })
        .collect();
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n<x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n \
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n  <rdf:Description rdf:about=\"{name}\" \
         xmp:Rating=\"{}\" exif:DateTimeOriginal=\"2023-0{}-1{}T10:00:00\">\n   <immich:blob>{b64}</immich:blob>\n  \
         </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"w\"?>\n",
        rng.range(0, 5),
        rng.range(1, 9),
        rng.range(0, 9)
    )
    .into_bytes()
}

fn library(seed: u64, scale: f64, root: &Path) -> Result<()> {
    let started = Instant::now();
    let mut w = Writer::new(root, seed)?;
    let mut rng = Rng::new(seed, u64::MAX);
    let n = |x: f64| ((x * scale).round() as u64).max(1);
    w.markers()?;
    // Photos 2–6 MB and videos 15–25 MB, in Immich's storage-template layout (admin, zoe) and in the
    // upload/ layout of a user without a storage label (kenji).
    let (photos, videos, sidecars) = (n(275.0), n(20.0), n(5000.0));
    let path_of = |i: u64, ext: &str, kind: &str| -> String {
        let year = 2024 - (i % 6);
        match i % 10 {
            5 => format!(
                "upload/{}/{:02x}/{:02x}/{i:08}.{ext}",
                USERS[2],
                i % 256,
                (i / 7) % 256
            ),
            0 => format!("library/zoe/{year}/{kind}_{i:05}.{ext}"),
            _ => format!("library/admin/{year}/{kind}_{i:05}.{ext}"),
        }
    };
    for i in 0..photos {
        let size = rng.range(2_000_000, 6_000_000);
        w.file(&path_of(i, "jpg", "IMG"), size, None)?;
    }
    for i in 0..videos {
        let size = rng.range(15_000_000, 25_000_000);
        w.file(&path_of(100_000 + i, "mp4", "VID"), size, None)?;
    }
    // Sidecars: an .xmp next to each photo, and the rest spread over the library's folders.
    for i in 0..sidecars {
        let base = if i < photos {
            path_of(i, "jpg", "IMG")
        } else {
            path_of(200_000 + i, "heic", "IMG")
        };
        let rel = format!("{base}.xmp");
        let text = xmp(&mut rng, &rel);
        w.file(&rel, 0, Some(&text))?;
    }
    for u in USERS {
        let size = rng.range(50_000, 300_000);
        w.file(&format!("profile/{u}/avatar.jpg"), size, None)?;
    }
    // Generated folders: thumbnails, transcoded videos, Immich's own database dumps.
    for i in 0..n(2000.0) {
        let size = rng.range(8_000, 60_000);
        w.file(
            &format!(
                "thumbs/{}/{:02x}/{:02x}/{i:08}-thumbnail.webp",
                USERS[(i % 3) as usize],
                i % 256,
                (i / 256) % 256
            ),
            size,
            None,
        )?;
    }
    for i in 0..n(10.0) {
        let size = rng.range(3_000_000, 8_000_000);
        w.file(
            &format!("encoded-video/{}/{i:08}.mp4", USERS[0]),
            size,
            None,
        )?;
    }
    w.file(
        "backups/immich-db-backup-1700000000000.sql.gz",
        (8.0 * MIB as f64 * scale) as u64,
        None,
    )?;
    w.report(started);
    Ok(())
}

fn small(seed: u64, files: usize, root: &Path) -> Result<()> {
    let started = Instant::now();
    let mut w = Writer::new(root, seed)?;
    let mut rng = Rng::new(seed, u64::MAX - 1);
    w.markers()?;
    for i in 0..files as u64 {
        let size = rng.range(200, 4096);
        let dir = i / 100;
        let rel = format!(
            "library/admin/{:03}/{:03}/IMG_{i:07}.jpg.xmp",
            dir / 1000,
            dir % 1000
        );
        w.file(&rel, size, None)?;
    }
    w.report(started);
    Ok(())
}

fn big(seed: u64, gib: f64, root: &Path) -> Result<()> {
    let started = Instant::now();
    let mut w = Writer::new(root, seed)?;
    w.markers()?;
    let size = (gib * 1024.0 * MIB as f64) as u64;
    w.file("library/admin/2024/VID_big.mp4", size, None)?;
    w.report(started);
    Ok(())
}

/// Embedding-like rows: Immich keeps a 512-dimension CLIP embedding per asset (`smart_search`) and
/// one per face (`face_search`) in pgvector/vectorchord columns. The sample clusters have no vector
/// extension, so the same text volume goes in `real[]` columns. Each row is ≈ 1.8 KB of dump text at
/// 160 dimensions; one asset in 5 has one.
const EMBEDDINGS_SQL: &str = r#"
CREATE TABLE "smart_search" (
  "assetId" uuid NOT NULL PRIMARY KEY REFERENCES "asset" ("id") ON DELETE CASCADE,
  "embedding" real[] NOT NULL
);
INSERT INTO "smart_search" ("assetId", "embedding")
SELECT a.id,
  (SELECT array_agg(round((sin(a.n * 0.7 + d * 1.3) * 0.1)::numeric, 7)::real ORDER BY d)
     FROM generate_series(1, 160) AS d)
FROM (SELECT id, substr("deviceAssetId", 14)::bigint AS n FROM "asset") AS a
WHERE a.n % 5 = 0;
ANALYZE;
"#;

fn db(scale: f64, assets: Option<usize>, base: Option<&Path>, env: &Path) -> Result<()> {
    let started = Instant::now();
    let assets = assets.unwrap_or(((750_000.0 * scale).round() as usize).max(10));
    let cluster = PgCluster::start(base).context("starting a PostgreSQL cluster")?;
    eprintln!(
        "cluster on 127.0.0.1:{}; creating {assets} assets…",
        cluster.port
    );
    sample::create_immich_like_db(&cluster, "immich", assets)?;
    cluster
        .psql("immich", EMBEDDINGS_SQL)
        .context("adding embedding rows")?;
    let size = cluster.psql(
        "postgres",
        "SELECT pg_size_pretty(sum(pg_database_size(datname))::bigint) FROM pg_database",
    )?;
    let tmp = env.with_extension("tmp");
    fs::write(
        &tmp,
        format!(
            "PGPORT={}\nPG_BIN={}\nASSETS={assets}\n",
            cluster.port,
            cluster.bin_dir.display()
        ),
    )?;
    fs::rename(&tmp, env)?;
    eprintln!(
        "database ready in {:.1}s ({} on disk); stops when stdin closes",
        started.elapsed().as_secs_f64(),
        size.trim()
    );
    // Wait for stdin to close (the bench script holds it open), or for a signal.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: plain sigaction without SA_RESTART, so the blocked read below returns EINTR; the
        // handler only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    while !SIGNALLED.load(std::sync::atomic::Ordering::Relaxed) {
        match stdin.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(cluster);
    let _ = fs::remove_file(env);
    Ok(())
}

static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.what {
        What::Library { scale, dir } => library(args.seed, scale, &dir),
        What::Small { files, dir } => small(args.seed, files, &dir),
        What::Big { gib, dir } => big(args.seed, gib, &dir),
        What::Db {
            scale,
            assets,
            base,
            env,
        } => db(scale, assets, base.as_deref(), &env),
    }
}
