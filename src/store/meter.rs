//! The requests a cloud store is sent, counted by the kind a provider bills them as, and the
//! bandwidth limits (`[storage] upload_limit` / `download_limit`) applied to them.
//!
//! [`Metered`] wraps the `object_store` backend, so every request passes it whatever part of the
//! program makes it: a backup's parts, a restore's downloads, a prune's listing. B2 and S3 charge
//! per request class (class A/B/C, PUT/GET/LIST), so `backup --json` and the agent's `/metrics`
//! report what was sent. A limit is a token bucket shared by all requests of a direction: parts
//! and puts take their bytes before they are sent, downloads as their chunks arrive.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use serde::Serialize;
use tokio::time::Instant;

/// Items one listing request returns (S3's and GCS's page; Azure's is 5,000).
const LIST_PAGE: u64 = 1000;

/// Requests and bytes so far, by kind.
#[derive(Debug, Default)]
pub struct Traffic {
    put: AtomicU64,
    part: AtomicU64,
    multipart: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    copy: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// A copy of [`Traffic`]'s counts (`backup --json`'s `requests`, the agent's metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrafficCounts {
    /// Single-request object writes.
    pub put: u64,
    /// Multipart parts (S3 UploadPart, Azure Put Block).
    pub part: u64,
    /// Multipart creations, completions and aborts.
    pub multipart: u64,
    /// Downloads (whole objects or ranges).
    pub get: u64,
    /// Metadata requests (HEAD).
    pub head: u64,
    /// Listing pages (1,000 keys each on S3 and GCS).
    pub list: u64,
    /// Objects deleted (S3 may batch up to 1,000 in one request).
    pub delete: u64,
    /// Server-side copies.
    pub copy: u64,
    /// Bytes of object data sent.
    pub bytes_sent: u64,
    /// Bytes of object data received.
    pub bytes_received: u64,
}

impl TrafficCounts {
    /// All requests.
    pub fn requests(&self) -> u64 {
        self.put
            + self.part
            + self.multipart
            + self.get
            + self.head
            + self.list
            + self.delete
            + self.copy
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &TrafficCounts) -> TrafficCounts {
        TrafficCounts {
            put: self.put - earlier.put,
            part: self.part - earlier.part,
            multipart: self.multipart - earlier.multipart,
            get: self.get - earlier.get,
            head: self.head - earlier.head,
            list: self.list - earlier.list,
            delete: self.delete - earlier.delete,
            copy: self.copy - earlier.copy,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
        }
    }
}

impl Traffic {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> TrafficCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrafficCounts {
            put: get(&self.put),
            part: get(&self.part),
            multipart: get(&self.multipart),
            get: get(&self.get),
            head: get(&self.head),
            list: get(&self.list),
            delete: get(&self.delete),
            copy: get(&self.copy),
            bytes_sent: get(&self.sent),
            bytes_received: get(&self.received),
        }
    }
}

/// A bandwidth limit: a token bucket of `rate` bytes a second holding at most one second's worth,
/// shared by every request of one direction.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    /// When the bytes taken so far will have been paid for at `rate`.
    paid_until: Mutex<Instant>,
}

impl Limiter {
    /// A limit of `bytes_per_sec` (> 0).
    pub fn new(bytes_per_sec: u64) -> Limiter {
        Limiter {
            rate: bytes_per_sec.max(1) as f64,
            paid_until: Mutex::new(Instant::now()),
        }
    }

    /// Take `n` bytes: wait while more than a second's worth is owed.
    pub async fn take(&self, n: u64) {
        let wait_until = {
            let mut paid = self.paid_until.lock().expect("limiter lock");
            // Credit does not pile up while idle: the one second's burst is all there is.
            let start = (*paid).max(Instant::now());
            *paid = start + Duration::from_secs_f64(n as f64 / self.rate);
            *paid - Duration::from_secs(1)
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

/// An `ObjectStore` that counts what passes and holds it to the limits.
pub struct Metered {
    inner: Arc<dyn ObjectStore>,
    traffic: Arc<Traffic>,
    up: Option<Arc<Limiter>>,
    down: Option<Arc<Limiter>>,
}

impl Metered {
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        traffic: Arc<Traffic>,
        up: Option<Arc<Limiter>>,
        down: Option<Arc<Limiter>>,
    ) -> Metered {
        Metered {
            inner,
            traffic,
            up,
            down,
        }
    }
}

impl fmt::Display for Metered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

impl fmt::Debug for Metered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Metered({:?})", self.inner)
    }
}

async fn take(limit: &Option<Arc<Limiter>>, n: u64) {
    if let Some(l) = limit {
        l.take(n).await;
    }
}

/// A listing stream that counts its pages when it ends (or is dropped).
struct PageCounter {
    items: u64,
    traffic: Arc<Traffic>,
}

impl Drop for PageCounter {
    fn drop(&mut self) {
        Traffic::add(&self.traffic.list, self.items.div_ceil(LIST_PAGE).max(1));
    }
}

fn counted_list(
    stream: BoxStream<'static, object_store::Result<ObjectMeta>>,
    traffic: Arc<Traffic>,
) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
    let mut pages = PageCounter { items: 0, traffic };
    stream
        .inspect(move |_| {
            // The whole counter moves into the stream (not just its field), so that it counts
            // when the stream is dropped.
            let pages = &mut pages;
            pages.items += 1;
        })
        .boxed()
}

#[async_trait]
impl ObjectStore for Metered {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let n = payload.content_length() as u64;
        take(&self.up, n).await;
        Traffic::add(&self.traffic.put, 1);
        let r = self.inner.put_opts(location, payload, opts).await;
        if r.is_ok() {
            Traffic::add(&self.traffic.sent, n);
        }
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Traffic::add(&self.traffic.multipart, 1);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(MeteredUpload {
            inner,
            traffic: self.traffic.clone(),
            up: self.up.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let head = options.head;
        Traffic::add(
            if head {
                &self.traffic.head
            } else {
                &self.traffic.get
            },
            1,
        );
        let mut result = self.inner.get_opts(location, options).await?;
        if head {
            return Ok(result);
        }
        if let GetResultPayload::Stream(stream) = result.payload {
            let (traffic, down) = (self.traffic.clone(), self.down.clone());
            result.payload = GetResultPayload::Stream(
                stream
                    .and_then(move |chunk: Bytes| {
                        let (traffic, down) = (traffic.clone(), down.clone());
                        async move {
                            take(&down, chunk.len() as u64).await;
                            Traffic::add(&traffic.received, chunk.len() as u64);
                            Ok(chunk)
                        }
                    })
                    .boxed(),
            );
        }
        Ok(result)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let n: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        take(&self.down, n).await;
        Traffic::add(&self.traffic.get, ranges.len() as u64);
        let r = self.inner.get_ranges(location, ranges).await?;
        Traffic::add(&self.traffic.received, n);
        Ok(r)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let traffic = self.traffic.clone();
        self.inner
            .delete_stream(locations)
            .inspect_ok(move |_| Traffic::add(&traffic.delete, 1))
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        counted_list(self.inner.list(prefix), self.traffic.clone())
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        counted_list(
            self.inner.list_with_offset(prefix, offset),
            self.traffic.clone(),
        )
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let r = self.inner.list_with_delimiter(prefix).await?;
        let items = (r.objects.len() + r.common_prefixes.len()) as u64;
        Traffic::add(&self.traffic.list, items.div_ceil(LIST_PAGE).max(1));
        Ok(r)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        Traffic::add(&self.traffic.copy, 1);
        self.inner.copy_opts(from, to, options).await
    }
}

/// A multipart upload whose parts are counted and limited.
#[derive(Debug)]
struct MeteredUpload {
    inner: Box<dyn MultipartUpload>,
    traffic: Arc<Traffic>,
    up: Option<Arc<Limiter>>,
}

#[async_trait]
impl MultipartUpload for MeteredUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let n = data.content_length() as u64;
        let part = self.inner.put_part(data);
        let (traffic, up) = (self.traffic.clone(), self.up.clone());
        Box::pin(async move {
            take(&up, n).await;
            Traffic::add(&traffic.part, 1);
            part.await?;
            Traffic::add(&traffic.sent, n);
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        Traffic::add(&self.traffic.multipart, 1);
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        Traffic::add(&self.traffic.multipart, 1);
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket lets one second's worth through at once, then holds the rate.
    #[tokio::test(start_paused = true)]
    async fn the_limiter_holds_its_rate() {
        let l = Limiter::new(1000);
        let start = Instant::now();
        for _ in 0..10 {
            l.take(500).await;
        }
        // 5,000 bytes at 1,000 B/s with one second of burst: 4 s.
        let took = start.elapsed().as_secs_f64();
        assert!((3.9..=4.1).contains(&took), "{took}");
    }
}
