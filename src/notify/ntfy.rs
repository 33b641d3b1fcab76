//! `[notify.ntfy]`: publish to an ntfy topic — a POST to the topic's URL with the message as the
//! body and `Title`, `Priority` and `Tags` headers (ntfy's documented publish API), and the access
//! token as `Authorization: Bearer`.

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};

use super::{post, Event};
use crate::config::{ntfy_priority, NtfyConfig};

pub(super) struct Ntfy {
    client: reqwest::Client,
    url: String,
    priority: Option<u8>,
    tags: Vec<String>,
    token: String,
}

impl Ntfy {
    pub(super) fn new(cfg: &NtfyConfig, client: reqwest::Client) -> Ntfy {
        Ntfy {
            client,
            url: cfg.url.clone(),
            priority: ntfy_priority(&cfg.priority),
            tags: cfg.tags.iter().map(|t| t.trim().to_string()).collect(),
            token: cfg.token.clone(),
        }
    }

    pub(super) async fn send(&self, event: &Event) -> Result<(), String> {
        let (auto_priority, tag) = match event.status {
            "failure" => (4, "rotating_light"),
            "partial" => (3, "warning"),
            _ => (2, "white_check_mark"),
        };
        let mut tags = vec![tag.to_string()];
        tags.extend(self.tags.iter().cloned());
        let mut headers = HeaderMap::new();
        headers.insert("Title", header(&event.title()));
        headers.insert(
            "Priority",
            HeaderValue::from(u16::from(self.priority.unwrap_or(auto_priority))),
        );
        headers.insert("Tags", header(&tags.join(",")));
        if !self.token.is_empty() {
            let bearer = HeaderValue::from_str(&format!("Bearer {}", self.token))
                .map_err(|_| "[notify.ntfy] token is not a valid header value".to_string())?;
            headers.insert(AUTHORIZATION, bearer);
        }
        let request = self
            .client
            .post(&self.url)
            .headers(headers)
            .body(event.body());
        post(&self.url, request).await
    }
}

/// A header value from text: what is not printable ASCII becomes `?` (ntfy reads headers as
/// ASCII unless RFC 2047-encoded).
fn header(text: &str) -> HeaderValue {
    let ascii: String = text
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&ascii).unwrap_or_else(|_| HeaderValue::from_static("immich-backup"))
}
