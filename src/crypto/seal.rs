//! Encrypting to age recipients: the age v1 file format (<https://age-encryption.org/v1>), written
//! here with AWS-LC's ChaCha20-Poly1305 and X25519.
//!
//! Every stored object is a plain age file, so the `age` command or any other age implementation
//! decrypts it (docs/FORMAT.md). The age crate's own writer is correct but its ChaCha20-Poly1305
//! (RustCrypto, portable SIMD) runs at about a third of the speed of AWS-LC's assembly, which already
//! comes with object_store; on a first backup that difference was the largest part of our CPU time.
//! So this module writes the same bytes the age crate would, with faster primitives:
//!
//! - a random 16-byte file key per object, wrapped for each recipient in a stanza: `X25519`
//!   recipients here (ephemeral X25519, HKDF-SHA256, ChaCha20-Poly1305, exactly as the spec says),
//!   any other kind (SSH keys) by the age crate's own `Recipient::wrap_file_key`;
//! - the header `age-encryption.org/v1`, the stanzas, and `--- ` with the HMAC-SHA256 of the header
//!   under HKDF(file key, "header");
//! - a random 16-byte nonce, then the payload in the STREAM construction: 64 KiB chunks sealed with
//!   ChaCha20-Poly1305 under HKDF(file key, nonce, "payload"), nonces counting up with the last
//!   chunk flagged.
//!
//! Decryption stays with the age crate, which checks all of this on every restore; the tests also
//! decrypt what this writes with the `age` command where it is installed.

use std::io::{self, Write};

use age::Recipient;
use age_core::format::{FileKey, Stanza};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use aws_lc_rs::{agreement, hkdf, hmac};
use base64::prelude::{Engine, BASE64_STANDARD_NO_PAD};

/// Plaintext bytes per STREAM chunk.
pub const CHUNK: usize = 64 * 1024;
/// Poly1305 tag bytes after each chunk.
pub const TAG: usize = 16;
pub(crate) const FILE_KEY_BYTES: usize = 16;
pub(crate) const NONCE_BYTES: usize = 16;
pub(crate) const X25519_TAG: &str = "X25519";
const X25519_LABEL: &[u8] = b"age-encryption.org/v1/X25519";

/// One recipient, as the header wraps the file key for it.
pub enum Wrapper {
    /// An `age1…` public key (its 32 bytes).
    X25519([u8; 32]),
    /// Any other kind the age crate knows (SSH keys).
    Age(Box<dyn Recipient + Send + Sync>),
}

impl Wrapper {
    /// An X25519 recipient from its `age1…` text.
    pub fn x25519(text: &str) -> Result<Wrapper, String> {
        decode_bech32(text, "age")
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(Wrapper::X25519)
            .ok_or_else(|| "not an age X25519 recipient".into())
    }

    fn wrap(&self, file_key: &[u8; FILE_KEY_BYTES]) -> io::Result<Vec<Stanza>> {
        match self {
            Wrapper::X25519(public) => x25519_stanza(public, file_key).map(|s| vec![s]),
            Wrapper::Age(r) => {
                let key = FileKey::new(Box::new(*file_key));
                r.wrap_file_key(&key)
                    .map(|(stanzas, _)| stanzas)
                    .map_err(io::Error::other)
            }
        }
    }
}

/// The stanza that gives `file_key` to the holder of X25519 key `public`.
fn x25519_stanza(public: &[u8; 32], file_key: &[u8; FILE_KEY_BYTES]) -> io::Result<Stanza> {
    // The ephemeral secret comes from the operating system (AWS-LC's own generator would first
    // spend milliseconds seeding itself, in every process).
    let ephemeral: [u8; 32] = random()?;
    let secret = agreement::PrivateKey::from_private_key(&agreement::X25519, &ephemeral)
        .map_err(|_| crypto_failed("X25519 key"))?;
    let share = secret
        .compute_public_key()
        .map_err(|_| crypto_failed("X25519 public key"))?;
    let share: [u8; 32] = share
        .as_ref()
        .try_into()
        .map_err(|_| crypto_failed("X25519 public key"))?;
    let wrap_key = x25519_wrap_key(&secret, public, &share, public)
        .ok_or_else(|| crypto_failed("X25519 agreement (is the recipient a valid key?)"))?;
    let mut body = file_key.to_vec();
    seal_in_place(&wrap_key, [0; 12], &mut body)?;
    Ok(Stanza {
        tag: X25519_TAG.into(),
        args: vec![BASE64_STANDARD_NO_PAD.encode(share)],
        body,
    })
}

/// The key that wraps the file key in an X25519 stanza: HKDF-SHA256 of the shared secret of `secret`
/// and `peer`, salted with the ephemeral share and the recipient's public key. `None` for a
/// low-order peer (an all-zero shared secret, which AWS-LC refuses, as the age spec requires).
/// `share` is the ephemeral public key, `recipient` the recipient's; `peer` is the other side's of
/// the two (the recipient's when sealing, the share when opening).
pub(crate) fn x25519_wrap_key(
    secret: &agreement::PrivateKey,
    peer: &[u8; 32],
    share: &[u8; 32],
    recipient: &[u8; 32],
) -> Option<[u8; 32]> {
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
    agreement::agree(secret, peer, (), |shared| {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(share);
        salt[32..].copy_from_slice(recipient);
        Ok(hkdf_sha256(&salt, X25519_LABEL, shared))
    })
    .ok()
}

/// HKDF-SHA256 (extract with `salt`, expand with `info`) to 32 bytes.
pub(crate) fn hkdf_sha256(salt: &[u8], info: &[u8], ikm: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(&[info], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// ChaCha20-Poly1305 under `key` and `nonce`; the tag is appended to `data`.
fn seal_in_place(key: &[u8; 32], nonce: [u8; 12], data: &mut Vec<u8>) -> io::Result<()> {
    let key = aead_key(key)?;
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), data)
        .map_err(|_| crypto_failed("ChaCha20-Poly1305"))?;
    data.extend_from_slice(tag.as_ref());
    Ok(())
}

/// A ChaCha20-Poly1305 key.
pub(crate) fn aead_key(key: &[u8; 32]) -> io::Result<LessSafeKey> {
    UnboundKey::new(&CHACHA20_POLY1305, key)
        .map(LessSafeKey::new)
        .map_err(|_| crypto_failed("ChaCha20-Poly1305 key"))
}

/// The key of the header's MAC: HKDF(file key, "header").
pub(crate) fn header_mac_key(file_key: &[u8; FILE_KEY_BYTES]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, &hkdf_sha256(&[], b"header", file_key))
}

/// The payload's key: HKDF(file key, payload nonce, "payload").
pub(crate) fn payload_key(
    file_key: &[u8; FILE_KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
) -> io::Result<LessSafeKey> {
    aead_key(&hkdf_sha256(nonce, b"payload", file_key))
}

/// The bytes of a Bech32 string with human-readable part `hrp` (age's key encoding).
pub(crate) fn decode_bech32(text: &str, hrp: &str) -> Option<Vec<u8>> {
    use bech32::FromBase32;
    let (found, data, variant) = bech32::decode(text).ok()?;
    if found != hrp || variant != bech32::Variant::Bech32 {
        return None;
    }
    Vec::<u8>::from_base32(&data).ok()
}

fn crypto_failed(what: &str) -> io::Error {
    io::Error::other(format!("encryption failed: {what}"))
}

/// `N` bytes from the operating system's random generator.
fn random<const N: usize>() -> io::Result<[u8; N]> {
    use rand::RngCore;
    let mut out = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut out)
        .map_err(|e| io::Error::other(format!("the system random generator failed: {e}")))?;
    Ok(out)
}

/// The header for `file_key` and `recipients`, with its MAC; and the MAC.
fn header(
    file_key: &[u8; FILE_KEY_BYTES],
    recipients: &[Wrapper],
) -> io::Result<(Vec<u8>, [u8; 32])> {
    let mut out = b"age-encryption.org/v1\n".to_vec();
    for r in recipients {
        for stanza in r.wrap(file_key)? {
            write_stanza(&mut out, &stanza);
        }
    }
    out.extend_from_slice(b"---");
    let mac = hmac::sign(&header_mac_key(file_key), &out);
    out.push(b' ');
    out.extend_from_slice(BASE64_STANDARD_NO_PAD.encode(mac.as_ref()).as_bytes());
    out.push(b'\n');
    let mac: [u8; 32] = mac.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes");
    Ok((out, mac))
}

/// `-> tag args…`, then the body in base64 wrapped at 64 columns, its last line always shorter.
fn write_stanza(out: &mut Vec<u8>, stanza: &Stanza) {
    out.extend_from_slice(b"-> ");
    out.extend_from_slice(stanza.tag.as_bytes());
    for arg in &stanza.args {
        out.push(b' ');
        out.extend_from_slice(arg.as_bytes());
    }
    out.push(b'\n');
    let body = BASE64_STANDARD_NO_PAD.encode(&stanza.body);
    let mut lines = body.as_bytes().chunks(64).peekable();
    let mut last_full = true; // an empty body is one empty line
    while let Some(line) = lines.next() {
        out.extend_from_slice(line);
        out.push(b'\n');
        last_full = line.len() == 64 && lines.peek().is_none();
    }
    if last_full {
        out.push(b'\n');
    }
}

/// The STREAM nonce of chunk `counter`: the counter as 11 big-endian bytes, then 1 for the last
/// chunk, 0 for the others.
pub(crate) fn stream_nonce(counter: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[3..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    Nonce::assume_unique_for_key(nonce)
}

/// Encrypts what is written to it into `out` as an age file; [`Sealer::finish`] seals the last
/// chunk. Dropped unfinished, `out` holds a truncated file that no age implementation accepts.
pub struct Sealer<W: Write> {
    out: W,
    key: LessSafeKey,
    /// Chunks sealed so far (the nonce's counter).
    counter: u64,
    /// The chunk being filled, with room for its tag.
    chunk: Vec<u8>,
    /// The header's MAC, which pins the file key (a manifest records it).
    header_mac: [u8; 32],
}

impl<W: Write> Sealer<W> {
    /// Write the header and the payload nonce to `out`, ready for the plaintext.
    pub fn new(mut out: W, recipients: &[Wrapper]) -> io::Result<Sealer<W>> {
        let file_key: [u8; FILE_KEY_BYTES] = random()?;
        let (header, header_mac) = header(&file_key, recipients)?;
        out.write_all(&header)?;
        let nonce: [u8; NONCE_BYTES] = random()?;
        out.write_all(&nonce)?;
        let key = payload_key(&file_key, &nonce)?;
        Ok(Sealer {
            out,
            key,
            counter: 0,
            chunk: Vec::with_capacity(CHUNK + TAG),
            header_mac,
        })
    }

    /// The MAC of the header written: it names this object's file key (see
    /// `Identities::decrypt_pinned`).
    pub fn header_mac(&self) -> [u8; 32] {
        self.header_mac
    }

    /// Seal the chunk in hand and write it out.
    fn seal_chunk(&mut self, last: bool) -> io::Result<()> {
        let tag = self
            .key
            .seal_in_place_separate_tag(
                stream_nonce(self.counter, last),
                Aad::empty(),
                &mut self.chunk,
            )
            .map_err(|_| crypto_failed("ChaCha20-Poly1305"))?;
        self.out.write_all(&self.chunk)?;
        self.out.write_all(tag.as_ref())?;
        self.chunk.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| crypto_failed("too many chunks"))?;
        Ok(())
    }

    /// Seal the last chunk; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_chunk(true)?;
        Ok(self.out)
    }

    /// The writer the sealed bytes go to.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Abandon the file: the inner writer, holding a truncated age file no reader accepts.
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full chunk is sealed only once more data comes: the last chunk must carry the flag,
        // and must not be empty unless the whole file is.
        if self.chunk.len() == CHUNK {
            self.seal_chunk(false)?;
        }
        let n = data.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Bytes of an age file's payload for `len` bytes of plaintext: nonce, then 64 KiB chunks with a
/// tag each (one, possibly empty, at least).
pub fn age_payload_len(len: u64) -> u64 {
    let chunks = len.div_ceil(CHUNK as u64).max(1);
    NONCE_BYTES as u64 + len + chunks * TAG as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::str::FromStr;

    fn decrypt(identity: &age::x25519::Identity, sealed: &[u8]) -> Vec<u8> {
        let d = age::Decryptor::new(sealed).expect("a valid age header");
        let mut r = d
            .decrypt(std::iter::once(identity as &dyn age::Identity))
            .expect("the identity opens it");
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("every chunk authenticates");
        out
    }

    #[test]
    fn the_age_crate_decrypts_every_length_around_chunk_boundaries() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let recipients = [
            Wrapper::x25519(&id.to_public().to_string()).unwrap(),
            Wrapper::x25519(&other.to_public().to_string()).unwrap(),
        ];
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut s = Sealer::new(Vec::new(), &recipients).unwrap();
            // Odd-sized writes cross chunk boundaries.
            for piece in plain.chunks(10_007) {
                s.write_all(piece).unwrap();
            }
            let sealed = s.finish().unwrap();
            assert_eq!(decrypt(&id, &sealed), plain, "length {len}");
            assert_eq!(decrypt(&other, &sealed), plain, "length {len}, second key");
        }
    }

    #[test]
    fn ssh_recipients_go_through_the_age_crate() {
        // An ed25519 key pair in OpenSSH format (a test key, used nowhere else).
        let public =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP67tuxJifoPE3v1XnLnjlx4VODWCMsu8wl0uPyAXn6Q";
        let r = age::ssh::Recipient::from_str(public).unwrap();
        let stanzas = Wrapper::Age(Box::new(r)).wrap(&[9; 16]).unwrap();
        assert_eq!(stanzas.len(), 1);
        assert_eq!(stanzas[0].tag, "ssh-ed25519");
    }

    #[test]
    fn stanza_bodies_wrap_at_64_columns_with_a_short_last_line() {
        let mut out = Vec::new();
        let body = vec![1u8; 48]; // exactly 64 base64 characters
        write_stanza(
            &mut out,
            &Stanza {
                tag: "t".into(),
                args: vec!["a".into()],
                body,
            },
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "-> t a");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2], "", "a full last line is followed by an empty one");
    }

    #[test]
    fn a_tampered_object_does_not_decrypt() {
        let id = age::x25519::Identity::generate();
        let recipients = [Wrapper::x25519(&id.to_public().to_string()).unwrap()];
        let mut s = Sealer::new(Vec::new(), &recipients).unwrap();
        s.write_all(&[5u8; 1000]).unwrap();
        let mut sealed = s.finish().unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        let d = age::Decryptor::new(&sealed[..]).unwrap();
        let mut r = d
            .decrypt(std::iter::once(&id as &dyn age::Identity))
            .unwrap();
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }
}
