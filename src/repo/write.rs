//! The write side of a repository, what a backup holds: the public recipients every sealed object
//! is encrypted to and the signing keys a snapshot is signed with. Nothing here can decrypt.
//!
//! A dump, a file list or a content object streams through a [`SealedWriter`] (synchronous, for the
//! blocking threads that compress and encrypt); a snapshot is committed by [`Writer::commit`], in
//! the order that keeps an interrupted backup invisible: summary, signature, manifest last.

use std::io::{self, Write};
use std::sync::Arc;

use crate::crypto::seal::Sealer;
use crate::crypto::sign::{self, SignatureFile, SigningKey, Statement};
use crate::crypto::Recipients;
use crate::error::{Error, Result};
use crate::format::{ContentId, Manifest, Object, Summary};
use crate::store::ObjectWriter;

use super::{expect_sealed, sealed_payload_len, write_error, Repository, Sealed};

/// The write side of a repository: what a backup, which holds only public recipients, needs.
#[derive(Clone, Debug)]
pub struct Writer {
    repo: Repository,
    recipients: Arc<Recipients>,
    signing: Arc<Vec<SigningKey>>,
    repository_key: Option<String>,
}

impl Writer {
    pub(super) fn new(
        repo: Repository,
        recipients: Arc<Recipients>,
        signing: Vec<SigningKey>,
        repository_key: Option<String>,
    ) -> Writer {
        Writer {
            repo,
            recipients,
            signing: Arc::new(signing),
            repository_key,
        }
    }

    /// The folder of the repository key this writer seals to (`None`: the recipients themselves,
    /// format 1): recorded in the summary and the manifest.
    pub fn repository_key(&self) -> Option<&str> {
        self.repository_key.as_deref()
    }

    /// Whether snapshots are signed (a signing key was given).
    pub fn signs(&self) -> bool {
        !self.signing.is_empty()
    }

    /// Make a snapshot visible: write its plaintext summary, its signature (when there is a
    /// signing key), then its sealed manifest. Everything the manifest references must be complete
    /// (and, in a folder store, published) before.
    pub async fn commit(
        &self,
        summary: &Summary,
        manifest: &Manifest,
        refs_sha256: &str,
    ) -> Result<()> {
        let repo = &self.repo;
        let summary_json = serde_json::to_vec_pretty(summary).expect("summary serialises");
        let summary_sha256 = sign::sha256_hex(&summary_json);
        repo.create(&Object::Summary(summary.id.clone()), summary_json)
            .await?;
        let plain = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        let sealed = self.seal(&plain)?;
        if self.signs() {
            let statement = Statement {
                id: manifest.id.clone(),
                time: manifest.time,
                manifest_sha256: sign::sha256_hex(sealed.as_bytes()),
                summary_sha256,
                refs_sha256: refs_sha256.to_string(),
            };
            let file = SignatureFile::sign(&statement, &self.signing);
            let json = serde_json::to_vec_pretty(&file).expect("signature serialises");
            repo.create(&Object::Signature(manifest.id.clone()), json)
                .await?;
        }
        repo.create_sealed(&Object::Manifest(manifest.id.clone()), &sealed)
            .await
    }

    /// The repository written to.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The key of the content addresses (derived from the recipients).
    pub fn content_key(&self) -> [u8; 32] {
        self.recipients.content_key()
    }

    /// Seal a small object in memory (a manifest: its signature needs the sealed bytes' hash
    /// before it is stored).
    pub fn seal(&self, plain: &[u8]) -> Result<Sealed> {
        seal_bytes(&self.recipients, plain)
    }

    /// Bytes of the age header (and its line endings) of an object sealed to these recipients:
    /// with [`sealed_payload_len`], the stored size a plaintext size gives.
    pub fn header_len(&self) -> Result<u64> {
        let empty = self.seal(&[])?;
        Ok(empty.0.len() as u64 - sealed_payload_len(0))
    }

    /// Stream a new sealed object (a dump, a file list, a content object) into the store; call on
    /// a blocking thread. It appears only when [`SealedWriter::finish`]ed.
    pub(crate) fn sealed_writer(&self, obj: &Object) -> Result<SealedWriter> {
        expect_sealed(obj)?;
        let key = obj.key();
        self.seal_into(self.repo.store.writer(&key), key)
    }

    /// Like [`Writer::sealed_writer`] for a content object that exists damaged: the finished
    /// object replaces it in one step (`backup --repair`).
    pub(crate) fn replacing_writer(&self, id: &ContentId) -> Result<SealedWriter> {
        let key = id.key();
        self.seal_into(self.repo.store.replacing_writer(&key), key)
    }

    /// A content object whose address is known only at its end ([`SealedWriter::finish_as`]):
    /// a folder store during a backup only, so a new file is read once, hashed as it is sealed.
    pub(crate) fn unnamed_content_writer(&self) -> Option<Result<SealedWriter>> {
        let inner = self.repo.store.unnamed_writer()?;
        Some(self.seal_into(inner, format!("{}/(new)", crate::format::DATA_DIR)))
    }

    fn seal_into(&self, inner: ObjectWriter, key: String) -> Result<SealedWriter> {
        let sealer = self
            .recipients
            .encrypt(inner)
            .map_err(|e| write_error(&key, e))?;
        Ok(SealedWriter { sealer, key })
    }
}

/// Seal `plain` to `recipients` in memory (a manifest; a key file or machine file, each to its
/// one recipient).
pub(super) fn seal_bytes(recipients: &Recipients, plain: &[u8]) -> Result<Sealed> {
    let crypto = |e: io::Error| Error::Crypto(e.to_string());
    let mut sealer = recipients.encrypt(Vec::new()).map_err(crypto)?;
    sealer.write_all(plain).map_err(crypto)?;
    Ok(Sealed(sealer.finish().map_err(crypto)?.into()))
}

/// A sealed object being written: what is written to it is encrypted on the way to the store.
/// Dropped unfinished, nothing becomes visible.
pub struct SealedWriter {
    sealer: Sealer<ObjectWriter>,
    key: String,
}

impl SealedWriter {
    /// The object's key (for messages).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Announce the plaintext's length before writing it, so that a very large object is sent in
    /// parts large enough to fit the store's part limit ([`ObjectWriter::expect_len`]).
    pub fn expect_plaintext_len(&mut self, len: u64) {
        let inner = self.sealer.get_mut();
        let header = inner.written();
        inner.expect_len(header + crate::crypto::seal::age_payload_len(len));
    }

    /// The MAC of the object's age header, which a manifest records to pin it.
    pub fn header_mac(&self) -> [u8; 32] {
        self.sealer.header_mac()
    }

    /// Our error for an I/O error met while writing this object (through any layers on top).
    pub fn error(&self, e: io::Error) -> Error {
        write_error(&self.key, e)
    }

    /// Seal the last chunk and complete the object; returns its stored size.
    pub fn finish(self) -> Result<u64> {
        let key = self.key;
        let inner = self.sealer.finish().map_err(|e| write_error(&key, e))?;
        inner.finish()
    }

    /// Complete an unnamed content object as `id` ([`Writer::unnamed_content_writer`]).
    pub(crate) fn finish_as(self, id: &ContentId) -> Result<u64> {
        let key = id.key();
        let mut inner = self.sealer.finish().map_err(|e| write_error(&key, e))?;
        inner.name(&key);
        inner.finish()
    }

    /// Abandon the object and wait until nothing of it is left in flight.
    pub fn abort(self) {
        self.sealer.into_inner().abort()
    }
}

impl Write for SealedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.sealer.write(data)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sealer.flush()
    }
}
