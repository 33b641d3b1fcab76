//! Issue 12: a property test that the age reader/writer (seal.rs/unseal.rs) and the age crate agree
//! on random inputs, lengths and truncations/bit flips.
//!
//! seal.rs writes and unseal.rs reads age files (<https://age-encryption.org/v1>) with their own
//! code on AWS-LC; the age crate is the reference implementation. Three properties, each over
//! random plaintexts whose lengths lean towards the STREAM chunk boundaries (64 KiB):
//!
//! 1. what ours writes, the age crate and ours both decrypt to the same plaintext;
//! 2. what the age crate writes, ours decrypts to the same plaintext;
//! 3. a file ours wrote, truncated, extended or with one bit flipped anywhere, ours never reads as
//!    plaintext (neither different nor short), and the age crate rejects exactly what ours rejects.
//!
//! The identities are generated once per test process (nextest runs each test in its own) and
//! loaded through an `age-keygen`-style identity file, as restore loads them. Plaintexts are made
//! from a seed, so a failing case is reported as (length, seed) and reproduces exactly.

use std::io::{Read, Write};
use std::sync::OnceLock;

use age::secrecy::ExposeSecret;
use immich_backup::crypto::{Identities, Recipients};
use immich_backup::error::Error;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::{RngCore, SeedableRng};

/// Plaintext bytes per STREAM chunk, and the Poly1305 tag after each.
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
/// The payload nonce between the header and the first chunk.
const NONCE: usize = 16;

/// 256 cases a property: the file runs in about a second in a debug build (5000 each took 12 s).
/// No failure files are written into the source tree: a failure prints its minimal input.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The fixed identities of a test run: `a` and `b`, and `outsider`, to which nothing is encrypted.
struct Keys {
    a: age::x25519::Identity,
    b: age::x25519::Identity,
    outsider: age::x25519::Identity,
    /// Ours, loaded from identity files holding `a`, `b`, both, and `outsider`.
    ours_a: Identities,
    ours_b: Identities,
    ours_ab: Identities,
    ours_outsider: Identities,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let a = age::x25519::Identity::generate();
        let b = age::x25519::Identity::generate();
        let outsider = age::x25519::Identity::generate();
        let dir = tempfile::tempdir().expect("a temp dir");
        let load = |name: &str, ids: &[&age::x25519::Identity]| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut text = String::from("# created: by tests/age_interop.rs\n");
            for id in ids {
                text.push_str(&format!("# public key: {}\n", id.to_public()));
                text.push_str(id.to_string().expose_secret());
                text.push('\n');
            }
            let path = dir.path().join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .expect("write the identity file");
            Identities::load(&path).expect("load the identity file")
        };
        Keys {
            ours_a: load("a.txt", &[&a]),
            ours_b: load("b.txt", &[&b]),
            ours_ab: load("ab.txt", &[&a, &b]),
            ours_outsider: load("outsider.txt", &[&outsider]),
            a,
            b,
            outsider,
        }
    })
}

/// Whom a file is encrypted to.
#[derive(Debug, Clone, Copy)]
enum To {
    A,
    B,
    Both,
}

impl To {
    fn identities(self) -> Vec<&'static age::x25519::Identity> {
        let k = keys();
        match self {
            To::A => vec![&k.a],
            To::B => vec![&k.b],
            To::Both => vec![&k.a, &k.b],
        }
    }

    /// Ours, for each identity file that holds a recipient's key.
    fn ours(self) -> Vec<(&'static str, &'static Identities)> {
        let k = keys();
        match self {
            To::A => vec![("a", &k.ours_a), ("a+b", &k.ours_ab)],
            To::B => vec![("b", &k.ours_b), ("a+b", &k.ours_ab)],
            To::Both => vec![("a", &k.ours_a), ("b", &k.ours_b), ("a+b", &k.ours_ab)],
        }
    }

    fn recipients(self) -> Vec<String> {
        self.identities()
            .iter()
            .map(|id| id.to_public().to_string())
            .collect()
    }
}

fn to() -> impl Strategy<Value = To> {
    prop_oneof![Just(To::A), Just(To::B), Just(To::Both)]
}

/// Plaintext lengths: the chunk boundaries and their neighbours often, any length up to 300 KiB.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            2 * CHUNK,
            2 * CHUNK + 1,
        ]),
        1 => (1usize..=4, -2isize..=2).prop_map(|(n, d)| (n * CHUNK).saturating_add_signed(d)),
        1 => 0usize..=64,
        3 => 0usize..=300 * 1024,
    ]
}

/// How many bytes each `write` or `read` call gets: all at once, tiny pieces, or anything.
fn piece() -> impl Strategy<Value = usize> {
    prop_oneof![Just(usize::MAX), 1usize..=64, 1usize..=3 * CHUNK,]
}

/// `len` random bytes from `seed`.
fn plaintext(len: usize, seed: u64) -> Vec<u8> {
    let mut plain = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut plain);
    plain
}

/// Write `plain` to `w` in pieces of `piece` bytes.
fn write_in_pieces(w: &mut impl Write, plain: &[u8], piece: usize) {
    for part in plain.chunks(piece.clamp(1, plain.len().max(1))) {
        w.write_all(part).expect("write to memory");
    }
}

/// What ours writes for `plain`, to `to`.
fn seal(plain: &[u8], to: To, piece: usize) -> Vec<u8> {
    let recipients = Recipients::load(&to.recipients(), None).expect("recipients");
    let mut w = recipients.encrypt(Vec::new()).expect("the header");
    write_in_pieces(&mut w, plain, piece);
    w.finish().expect("the last chunk")
}

/// What the age crate writes for `plain`, to `to`.
fn age_seal(plain: &[u8], to: To, piece: usize) -> Vec<u8> {
    let ids = to.identities();
    let publics: Vec<_> = ids.iter().map(|id| id.to_public()).collect();
    let e = age::Encryptor::with_recipients(publics.iter().map(|r| r as &dyn age::Recipient))
        .expect("an encryptor");
    let mut w = e.wrap_output(Vec::new()).expect("the header");
    write_in_pieces(&mut w, plain, piece);
    w.finish().expect("the last chunk")
}

/// Ours: the plaintext of `sealed`, read in pieces of `piece` bytes, or why not.
fn open(ours: &Identities, sealed: &[u8], piece: usize) -> Result<Vec<u8>, String> {
    let mut r = ours
        .decrypt(sealed, "object")
        .map_err(|e| format!("decrypt: {e}"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; piece.clamp(1, 4 * CHUNK)];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e} ({:?})", e.kind())),
        }
    }
}

/// The age crate: the plaintext of `sealed` for `identities`, or why not.
fn age_open(identities: &[&age::x25519::Identity], sealed: &[u8]) -> Result<Vec<u8>, String> {
    let d = age::Decryptor::new(sealed).map_err(|e| format!("header: {e}"))?;
    let mut r = d
        .decrypt(identities.iter().map(|id| *id as &dyn age::Identity))
        .map_err(|e| format!("decrypt: {e}"))?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .map_err(|e| format!("read: {e} ({:?})", e.kind()))?;
    Ok(out)
}

/// Fails unless `got` is `want`, without printing hundreds of KiB.
fn same(got: &[u8], want: &[u8], what: &str) -> Result<(), TestCaseError> {
    if got != want {
        let at = got.iter().zip(want).take_while(|(g, w)| g == w).count();
        return Err(TestCaseError::fail(format!(
            "{what}: {} bytes of plaintext, want {}, first difference at {at}",
            got.len(),
            want.len()
        )));
    }
    Ok(())
}

/// The length of an age header: up to and including the newline of its `--- ` MAC line.
fn header_len(sealed: &[u8]) -> usize {
    let mac = sealed
        .windows(5)
        .position(|w| w == b"\n--- ")
        .expect("a MAC line")
        + 1;
    mac + sealed[mac..]
        .iter()
        .position(|&b| b == b'\n')
        .expect("the MAC line ends")
        + 1
}

/// One kind of damage, in numbers that are fitted to the file when applied.
#[derive(Debug, Clone)]
enum Damage {
    /// Cut at a random offset.
    Cut(u64),
    /// Cut at a boundary (start, end of header, end of nonce, end of each chunk, end of file),
    /// moved by a few bytes.
    CutNear(usize, i8),
    /// Flip one bit of a part: header, nonce, payload, one of the tags, or anywhere.
    Flip(Part, u64, u8),
    /// Append bytes after the last chunk.
    Append(Vec<u8>),
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Header,
    Nonce,
    Payload,
    Tag,
    Anywhere,
}

fn damage() -> impl Strategy<Value = Damage> {
    let part = prop_oneof![
        Just(Part::Header),
        Just(Part::Nonce),
        Just(Part::Payload),
        Just(Part::Tag),
        Just(Part::Anywhere),
    ];
    prop_oneof![
        3 => any::<u64>().prop_map(Damage::Cut),
        3 => (any::<usize>(), -2i8..=2).prop_map(|(i, d)| Damage::CutNear(i, d)),
        6 => (part, any::<u64>(), 0u8..8).prop_map(|(p, at, bit)| Damage::Flip(p, at, bit)),
        1 => prop::collection::vec(any::<u8>(), 1..=40).prop_map(Damage::Append),
    ]
}

/// `sealed` damaged so; also says where (for the failure message).
fn apply(sealed: &[u8], damage: &Damage) -> (Vec<u8>, String) {
    let len = sealed.len();
    let header = header_len(sealed);
    let payload = header + NONCE;
    let sealed_chunks = (len - payload).div_ceil(CHUNK + TAG);
    match damage {
        Damage::Cut(at) => {
            let at = (*at % (len as u64 + 1)) as usize;
            (sealed[..at].to_vec(), format!("cut at {at} of {len}"))
        }
        Damage::CutNear(i, d) => {
            let mut boundaries = vec![0, header, payload, len];
            boundaries.extend((1..=sealed_chunks).map(|n| payload + n * (CHUNK + TAG)));
            let at = boundaries[i % boundaries.len()]
                .saturating_add_signed(isize::from(*d))
                .min(len);
            (sealed[..at].to_vec(), format!("cut at {at} of {len}"))
        }
        Damage::Flip(part, at, bit) => {
            let pick = |from: usize, to: usize| from + (*at % (to - from) as u64) as usize;
            let at = match part {
                Part::Header => pick(0, header),
                Part::Nonce => pick(header, payload),
                Part::Payload => pick(payload, len),
                Part::Tag => {
                    let n = (*at as usize) % sealed_chunks;
                    let end = (payload + (n + 1) * (CHUNK + TAG)).min(len);
                    end - TAG + (*at as usize / sealed_chunks) % TAG
                }
                Part::Anywhere => pick(0, len),
            };
            let mut bad = sealed.to_vec();
            bad[at] ^= 1 << bit;
            (
                bad,
                format!(
                    "bit {bit} of byte {at} flipped ({part:?}; header {header} bytes, file {len})"
                ),
            )
        }
        Damage::Append(extra) => {
            let mut longer = sealed.to_vec();
            longer.extend_from_slice(extra);
            (longer, format!("{} bytes appended to {len}", extra.len()))
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Property 1: what ours (seal.rs) writes, to one recipient or two, the age crate decrypts to the
    /// same plaintext with each recipient's identity, and so does ours (unseal.rs) with every identity
    /// file that holds one; an identity it was not written to opens it with neither.
    #[test]
    fn ours_writes_what_the_age_crate_and_ours_read(
        len in length(),
        seed in any::<u64>(),
        to in to(),
        write in piece(),
        read in piece(),
    ) {
        let k = keys();
        let plain = plaintext(len, seed);
        let sealed = seal(&plain, to, write);
        for id in to.identities() {
            let got = age_open(&[id], &sealed)
                .map_err(|e| TestCaseError::fail(format!("the age crate rejects ours: {e}")))?;
            same(&got, &plain, "the age crate")?;
        }
        for (file, ours) in to.ours() {
            let got = open(ours, &sealed, read)
                .map_err(|e| TestCaseError::fail(format!("ours ({file}) rejects ours: {e}")))?;
            same(&got, &plain, &format!("ours ({file})"))?;
        }
        prop_assert!(age_open(&[&k.outsider], &sealed).is_err(), "the age crate opens it without the key");
        let wrong = k.ours_outsider.decrypt(&sealed[..], "object");
        prop_assert!(
            matches!(wrong, Err(Error::WrongKey { .. })),
            "ours without the key: {:?}",
            wrong.err()
        );
    }

    /// Property 2: what the age crate writes (with its grease stanza), to one recipient or two, ours
    /// (unseal.rs) decrypts to the same plaintext with every identity file that holds a recipient's key.
    #[test]
    fn the_age_crate_writes_what_ours_reads(
        len in length(),
        seed in any::<u64>(),
        to in to(),
        write in piece(),
        read in piece(),
    ) {
        let plain = plaintext(len, seed);
        let sealed = age_seal(&plain, to, write);
        for (file, ours) in to.ours() {
            let got = open(ours, &sealed, read)
                .map_err(|e| TestCaseError::fail(format!("ours ({file}) rejects the age crate's: {e}")))?;
            same(&got, &plain, &format!("ours ({file})"))?;
        }
        let wrong = keys().ours_outsider.decrypt(&sealed[..], "object");
        prop_assert!(
            matches!(wrong, Err(Error::WrongKey { .. })),
            "ours without the key: {:?}",
            wrong.err()
        );
    }

    /// Property 3: a file ours wrote, truncated (anywhere, or at and around the header's end, the
    /// nonce's and each chunk's), with one bit flipped (header, nonce, payload, tag, anywhere) or
    /// with bytes appended: ours (unseal.rs) fails, from `decrypt` or from a read, unless the bytes
    /// are unchanged, and then it reads exactly the plaintext: never different or short plaintext.
    /// The age crate accepts exactly what ours accepts.
    #[test]
    fn damaged_files_are_rejected_by_both(
        len in length(),
        seed in any::<u64>(),
        to in to(),
        read in piece(),
        damages in prop::collection::vec(damage(), 1..=6),
    ) {
        let k = keys();
        let plain = plaintext(len, seed);
        let sealed = seal(&plain, to, usize::MAX);
        for damage in &damages {
            let (bad, how) = apply(&sealed, damage);
            let unchanged = bad == sealed;
            let ours = open(&k.ours_ab, &bad, read);
            match &ours {
                Ok(got) if unchanged => same(got, &plain, &format!("ours, {how} (unchanged)"))?,
                Ok(got) => prop_assert!(
                    false,
                    "ours accepts a damaged file ({how}): {} bytes of plaintext, want {}, equal: {}",
                    got.len(),
                    plain.len(),
                    got == &plain
                ),
                Err(e) => prop_assert!(!unchanged, "ours rejects an undamaged file ({how}): {e}"),
            }
            // The age crate, with the same two identities.
            let age = age_open(&[&k.a, &k.b], &bad);
            prop_assert_eq!(
                ours.is_ok(),
                age.is_ok(),
                "verdicts differ ({}): ours {:?}, the age crate {:?}",
                how,
                ours.as_ref().map(Vec::len),
                age.as_ref().map(Vec::len)
            );
        }
    }
}
