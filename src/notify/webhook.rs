//! `[notify.webhook]`: a JSON POST to any URL — the whole event (`format = "json"`, for Gotify
//! proxies, Apprise's API, n8n or a script), or the message in the one field a chat service reads
//! (`"discord"`: `content`, `"slack"`: `text`). The URL is a secret: only its host is shown.

use super::{post, Event};
use crate::config::{WebhookConfig, WebhookFormat};

/// Discord refuses a `content` longer than this.
const DISCORD_MAX: usize = 2000;

pub(super) struct Webhook {
    client: reqwest::Client,
    url: String,
    format: WebhookFormat,
}

impl Webhook {
    pub(super) fn new(cfg: &WebhookConfig, client: reqwest::Client) -> Webhook {
        Webhook {
            client,
            url: cfg.url.clone(),
            format: cfg.format,
        }
    }

    pub(super) async fn send(&self, event: &Event) -> Result<(), String> {
        let request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body(self.format, event).to_string());
        post(&self.url, request).await
    }
}

/// The JSON body for `format`.
fn body(format: WebhookFormat, event: &Event) -> serde_json::Value {
    match format {
        WebhookFormat::Json => {
            let mut v = serde_json::to_value(event).unwrap_or_default();
            v["event"] = format!("{}.{}", event.job, event.status).into();
            v["title"] = event.title().into();
            v["message"] = event.body().into();
            v
        }
        WebhookFormat::Discord => {
            let text = format!("**{}**\n{}", event.title(), event.body());
            let text: String = text.chars().take(DISCORD_MAX).collect();
            serde_json::json!({ "content": text })
        }
        WebhookFormat::Slack => {
            serde_json::json!({ "text": format!("*{}*\n{}", event.title(), event.body()) })
        }
    }
}
