//! Opening age files: the header is parsed here and unwrapped by the age crate's identities, and the
//! payload is decrypted with AWS-LC's ChaCha20-Poly1305, the other half of seal.rs.
//!
//! The age crate's reader decrypts at about a third of the speed of AWS-LC's assembly, which made
//! it the largest part of a restore's time. This reader checks everything the spec asks, as the age
//! crate does:
//!
//! - the header: `age-encryption.org/v1`, stanzas (any tag, so age's "grease" stanzas and objects
//!   written by any age implementation open), `--- ` and its MAC; at most `MAX_HEADER` bytes;
//! - the file key, from the first identity that unwraps a stanza (the age crate's `Identity`:
//!   X25519, SSH and passphrase-protected identity files alike); the header MAC under it;
//! - the payload: 64 KiB chunks, each authenticated, the last one flagged, nothing after it, and no
//!   empty last chunk unless the whole payload is empty. A damaged or truncated object is an
//!   `InvalidData`/`UnexpectedEof` error, never short or wrong plaintext.

use std::io::{self, BufRead, BufReader, Read};

use age::secrecy::ExposeSecret;
use age::{DecryptError, Identity};
use age_core::format::{FileKey, Stanza};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce};
use aws_lc_rs::{agreement, hmac};
use base64::prelude::{Engine, BASE64_STANDARD_NO_PAD};

use crate::crypto::seal::{
    aead_key, decode_bech32, header_mac_key, payload_key, stream_nonce, x25519_wrap_key, CHUNK,
    NONCE_BYTES, TAG, X25519_TAG,
};

/// The longest header accepted (a damaged object must not make us read without end).
pub(crate) const MAX_HEADER: usize = 64 * 1024;
const VERSION_LINE: &[u8] = b"age-encryption.org/v1\n";

/// Open the age file `input` with the first of `identities` that can: a reader of its plaintext.
pub fn open<'a, R: Read>(
    input: R,
    identities: impl Iterator<Item = &'a dyn Identity>,
) -> Result<Opened<BufReader<R>>, DecryptError> {
    let mut input = BufReader::with_capacity(16 * 1024, input);
    let header = read_header(&mut input)?;
    let (stanzas, mac) = parse_header(&header)?;
    let file_key = unwrap_file_key(&stanzas, identities)?;
    // The MAC covers the header up to and including `---`.
    let signed = &header[..header.len() - MAC_LINE_TAIL];
    hmac::verify(&header_mac_key(&file_key), signed, &mac).map_err(|_| DecryptError::InvalidMac)?;
    let mut nonce = [0u8; NONCE_BYTES];
    input.read_exact(&mut nonce)?;
    let key = payload_key(&file_key, &nonce).map_err(|_| DecryptError::DecryptionFailed)?;
    Ok(Opened {
        input,
        key,
        header_mac: mac,
        counter: 0,
        chunk: vec![0u8; CHUNK + TAG + 1],
        start: 0,
        end: 0,
        carried: false,
        done: false,
    })
}

/// The header's bytes, from the version line through the MAC line.
fn read_header(input: &mut impl BufRead) -> Result<Vec<u8>, DecryptError> {
    let mut header = Vec::with_capacity(512);
    loop {
        let before = header.len();
        let n = input
            .take((MAX_HEADER - before) as u64)
            .read_until(b'\n', &mut header)?;
        let line = &header[before..];
        if n == 0 || !line.ends_with(b"\n") {
            return Err(DecryptError::InvalidHeader); // truncated, or longer than MAX_HEADER
        }
        if before == 0 && line != VERSION_LINE {
            return Err(DecryptError::InvalidHeader);
        }
        if line.starts_with(b"---") {
            return Ok(header);
        }
    }
}

/// Bytes after `---` on the MAC line: a space, the MAC in 43 base64 characters, a newline.
const MAC_LINE_TAIL: usize = 1 + 43 + 1;

/// The stanzas and the 32-byte MAC of a complete header.
fn parse_header(header: &[u8]) -> Result<(Vec<Stanza>, [u8; 32]), DecryptError> {
    let bad = || DecryptError::InvalidHeader;
    let text = std::str::from_utf8(&header[VERSION_LINE.len()..]).map_err(|_| bad())?;
    let mut lines = text.split_terminator('\n').peekable();
    let mut stanzas = Vec::new();
    while let Some(line) = lines.next() {
        if let Some(encoded) = line.strip_prefix("--- ") {
            if lines.next().is_some() || encoded.len() != 43 {
                return Err(bad());
            }
            let mac = decode(encoded).ok_or_else(bad)?;
            return Ok((stanzas, mac.try_into().map_err(|_| bad())?));
        }
        let mut words = line.strip_prefix("-> ").ok_or_else(bad)?.split(' ');
        let tag = words.next().filter(|t| arbitrary(t)).ok_or_else(bad)?;
        let args: Vec<String> = words.map(str::to_string).collect();
        if !args.iter().all(|a| arbitrary(a)) {
            return Err(bad());
        }
        // Body lines until the next stanza or the MAC; each full line is 64 characters.
        let mut body = String::new();
        while let Some(next) = lines.next_if(|l| !l.starts_with("-> ") && !l.starts_with("---")) {
            if next.len() > 64 || (!body.is_empty() && !body.len().is_multiple_of(64)) {
                return Err(bad()); // a line after a short one, or too long
            }
            body.push_str(next);
        }
        stanzas.push(Stanza {
            tag: tag.to_string(),
            args,
            body: decode(&body).ok_or_else(bad)?,
        });
    }
    Err(bad())
}

/// A non-empty string of printable ASCII without spaces (the spec's "arbitrary string").
fn arbitrary(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (33..=126).contains(&b))
}

/// Canonical unpadded base64.
fn decode(s: &str) -> Option<Vec<u8>> {
    BASE64_STANDARD_NO_PAD.decode(s).ok()
}

/// The file key from the first identity that unwraps one of `stanzas`.
fn unwrap_file_key<'a>(
    stanzas: &[Stanza],
    identities: impl Iterator<Item = &'a dyn Identity>,
) -> Result<[u8; 16], DecryptError> {
    for identity in identities {
        if let Some(key) = identity.unwrap_stanzas(stanzas) {
            return Ok(*key?.expose_secret());
        }
    }
    Err(DecryptError::NoMatchingKeys)
}

/// An X25519 identity (`AGE-SECRET-KEY-1…`) that unwraps its stanzas with AWS-LC: the age crate's
/// own takes three times as long per object, which was a tenth of a restore's time.
pub(crate) struct X25519Identity {
    secret: agreement::PrivateKey,
    public: [u8; 32],
}

impl X25519Identity {
    /// From an identity line as `age-keygen` writes it; `None` if it is not one.
    pub fn parse(line: &str) -> Option<X25519Identity> {
        let bytes =
            age::secrecy::SecretBox::new(Box::new(decode_bech32(line.trim(), "age-secret-key-")?));
        let secret =
            agreement::PrivateKey::from_private_key(&agreement::X25519, bytes.expose_secret())
                .ok()?;
        let public = secret.compute_public_key().ok()?.as_ref().try_into().ok()?;
        Some(X25519Identity { secret, public })
    }
}

impl Identity for X25519Identity {
    fn unwrap_stanza(&self, stanza: &Stanza) -> Option<Result<FileKey, DecryptError>> {
        if stanza.tag != X25519_TAG {
            return None;
        }
        let share: [u8; 32] = match (&stanza.args[..], stanza.body.len()) {
            ([share], 32) => decode(share)?.try_into().ok()?,
            _ => return Some(Err(DecryptError::InvalidHeader)),
        };
        let wrap_key = x25519_wrap_key(&self.secret, &share, &share, &self.public)?;
        let key = aead_key(&wrap_key).ok()?;
        let mut body = stanza.body.clone();
        // Not ours if it does not authenticate.
        let file_key: [u8; 16] = key
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut body,
            )
            .ok()?
            .try_into()
            .ok()?;
        Some(Ok(FileKey::new(Box::new(file_key))))
    }
}

/// The plaintext of an opened age file, chunk by chunk.
pub struct Opened<R: Read> {
    input: R,
    key: LessSafeKey,
    /// The header's MAC (authenticated under the file key, so it names the file key).
    header_mac: [u8; 32],
    counter: u64,
    /// One sealed chunk, and one byte more to tell whether another follows.
    chunk: Vec<u8>,
    /// Plaintext not yet read: `chunk[start..end]`.
    start: usize,
    end: usize,
    /// `chunk[0]` holds the first byte of the next sealed chunk (read to look ahead).
    carried: bool,
    done: bool,
}

impl<R: Read> Opened<R> {
    /// The MAC of the header: equal for two objects only if they have the same file key.
    pub fn header_mac(&self) -> [u8; 32] {
        self.header_mac
    }

    /// Read, authenticate and decrypt the next chunk into `chunk[..end]`.
    fn next_chunk(&mut self) -> io::Result<()> {
        let mut filled = usize::from(self.carried);
        // Up to a full sealed chunk plus one byte: that byte says whether this one is the last.
        while filled < self.chunk.len() {
            match self.input.read(&mut self.chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let last = filled <= CHUNK + TAG;
        let sealed = filled.min(CHUNK + TAG);
        if sealed < TAG || (last && sealed == TAG && self.counter > 0) {
            // Nothing, or an empty last chunk after others: truncated at a chunk boundary.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "age payload is truncated",
            ));
        }
        let plain = self
            .key
            .open_in_place(
                stream_nonce(self.counter, last),
                Aad::empty(),
                &mut self.chunk[..sealed],
            )
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "age payload chunk failed to authenticate",
                )
            })?
            .len();
        self.counter += 1;
        (self.start, self.end, self.done) = (0, plain, last);
        // The look-ahead byte starts the next chunk; it moves there once this plaintext is read.
        self.carried = !last;
        Ok(())
    }
}

impl<R: Read> Read for Opened<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            if self.carried {
                self.chunk[0] = self.chunk[CHUNK + TAG];
            }
            self.next_chunk()?;
        }
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.chunk[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::seal::{Sealer, Wrapper};
    use std::io::Write;

    fn seal(id: &age::x25519::Identity, plain: &[u8]) -> Vec<u8> {
        let recipients = [Wrapper::x25519(&id.to_public().to_string()).unwrap()];
        let mut s = Sealer::new(Vec::new(), &recipients).unwrap();
        s.write_all(plain).unwrap();
        s.finish().unwrap()
    }

    fn read_all(sealed: &[u8], id: &dyn Identity) -> io::Result<Vec<u8>> {
        let mut r = open(sealed, std::iter::once(id)).map_err(io::Error::other)?;
        let mut out = Vec::new();
        // Odd-sized reads cross chunk boundaries.
        let mut buf = vec![0u8; 10_007];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn lengths() -> [usize; 8] {
        [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            2 * CHUNK,
            2 * CHUNK + 5,
            3 * CHUNK,
        ]
    }

    #[test]
    fn opens_what_seal_and_the_age_crate_write() {
        let id = age::x25519::Identity::generate();
        for len in lengths() {
            let plain: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
            assert_eq!(read_all(&seal(&id, &plain), &id).unwrap(), plain, "{len}");
            // The age crate's writer adds a grease stanza; its files open all the same.
            let e = age::Encryptor::with_recipients(std::iter::once(
                &id.to_public() as &dyn age::Recipient
            ))
            .unwrap();
            let mut w = e.wrap_output(Vec::new()).unwrap();
            w.write_all(&plain).unwrap();
            let sealed = w.finish().unwrap();
            assert_eq!(read_all(&sealed, &id).unwrap(), plain, "age crate, {len}");
        }
    }

    #[test]
    fn truncated_extended_or_altered_files_never_read_as_complete() {
        let id = age::x25519::Identity::generate();
        for len in lengths() {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = seal(&id, &plain);
            let header = sealed.iter().position(|&b| b == b'-').unwrap();
            let payload = sealed.windows(4).position(|w| w == b"\n---").unwrap();
            let payload = payload
                + sealed[payload + 1..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap()
                + 2;
            for cut in [
                payload + 16,
                payload + 16 + CHUNK + TAG,
                sealed.len() - 1,
                sealed.len() - TAG,
            ] {
                if cut < sealed.len() && cut > payload {
                    assert!(read_all(&sealed[..cut], &id).is_err(), "{len} cut at {cut}");
                }
            }
            let mut longer = sealed.clone();
            longer.push(0);
            assert!(read_all(&longer, &id).is_err(), "{len} with a byte more");
            for at in [header + 3, payload - 10, payload + 3, sealed.len() - 3] {
                let mut bad = sealed.clone();
                bad[at] ^= 0x20;
                assert!(read_all(&bad, &id).is_err(), "{len} altered at {at}");
            }
        }
    }

    #[test]
    fn x25519_identities_unwrap_as_the_age_crate_does() {
        use age::secrecy::ExposeSecret;
        let id = age::x25519::Identity::generate();
        let fast = X25519Identity::parse(id.to_string().expose_secret()).unwrap();
        assert_eq!(
            Some(fast.public.to_vec()),
            decode_bech32(&id.to_public().to_string(), "age"),
            "the same public key"
        );
        let plain = vec![7u8; CHUNK + 3];
        assert_eq!(read_all(&seal(&id, &plain), &fast).unwrap(), plain);
        let other = age::x25519::Identity::generate();
        assert!(matches!(
            open(
                &seal(&other, &plain)[..],
                std::iter::once(&fast as &dyn Identity)
            ),
            Err(DecryptError::NoMatchingKeys)
        ));
        assert!(X25519Identity::parse(&id.to_public().to_string()).is_none());
    }

    #[test]
    fn the_wrong_identity_is_told_apart_from_damage() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let sealed = seal(&id, b"photo");
        assert!(matches!(
            open(&sealed[..], std::iter::once(&other as &dyn Identity)),
            Err(DecryptError::NoMatchingKeys)
        ));
        let not_age = b"PK\x03\x04 a zip file".to_vec();
        assert!(matches!(
            open(&not_age[..], std::iter::once(&id as &dyn Identity)),
            Err(DecryptError::InvalidHeader)
        ));
    }
}
