//! Notifications (`[notify]`): a backup's (or a scheduled check's) outcome, sent to ntfy
//! (`ntfy.rs`), a JSON webhook (`webhook.rs`) and e-mail over SMTP (`email.rs`).
//!
//! Sending never fails a run: a channel that cannot deliver within `[notify] timeout_secs` is a
//! warning naming the channel and the cause (with every secret of `[notify]` scrubbed), and the
//! run's outcome and exit code stay what they were. `notify test` uses [`Notifier::send_all`] to
//! report each channel's result instead.

mod email;
mod ntfy;
mod webhook;

use std::time::Duration;

use serde::Serialize;

use crate::config::{NotifyConfig, RunStatus};
use crate::error::{Error, Result};
use crate::redact::Redactor;

/// What happened, as every channel tells it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `"backup"`, `"check"` (the agent's scheduled checks) or `"test"` (`notify test`).
    pub job: String,
    pub status: &'static str,
    /// The snapshot made, if any.
    pub snapshot: Option<String>,
    pub host: String,
    /// Why it failed or is partial (one line); None on success.
    pub reason: Option<String>,
    pub exit_code: i32,
    /// Files in the snapshot, and of them uploaded as new.
    pub files: Option<u64>,
    pub files_new: Option<u64>,
    /// Bytes in the snapshot, and written to the store.
    pub bytes: Option<u64>,
    pub bytes_stored: Option<u64>,
    pub duration_secs: f64,
    pub time: chrono::DateTime<chrono::Utc>,
    /// `status`, for `[notify] on`.
    #[serde(skip)]
    pub run_status: RunStatus,
}

impl Event {
    /// An event of `job` ending with `status` on this host, now; the other fields are filled in by
    /// the caller.
    pub fn new(job: &str, status: RunStatus, exit_code: i32, duration: Duration) -> Event {
        Event {
            job: job.to_string(),
            status: status.as_str(),
            snapshot: None,
            host: crate::host::hostname(),
            reason: None,
            exit_code,
            files: None,
            files_new: None,
            bytes: None,
            bytes_stored: None,
            duration_secs: duration.as_secs_f64(),
            time: chrono::Utc::now(),
            run_status: status,
        }
    }

    /// One line: `immich-backup on HOST: backup failed`.
    pub fn title(&self) -> String {
        let verdict = match (self.job.as_str(), self.status) {
            ("test", _) => "test notification".to_string(),
            (_, "success") => format!("{} succeeded", self.job),
            (_, "partial") => format!("{} partial", self.job),
            (job, _) => format!("{job} failed"),
        };
        format!("immich-backup on {}: {verdict}", self.host)
    }

    /// The text of the message: what happened, why, and the numbers.
    pub fn body(&self) -> String {
        let mut lines = Vec::new();
        if self.job == "test" {
            lines.push("This is a test: immich-backup can reach this channel.".to_string());
        }
        if let Some(r) = &self.reason {
            lines.push(format!("Reason: {r}"));
        }
        if let Some(s) = &self.snapshot {
            lines.push(format!("Snapshot: {s}"));
        }
        if let (Some(f), Some(n)) = (self.files, self.files_new) {
            lines.push(format!("Files: {f} ({n} new)"));
        }
        if let (Some(b), Some(s)) = (self.bytes, self.bytes_stored) {
            lines.push(format!("Bytes: {b} in the snapshot, {s} stored"));
        }
        lines.push(format!(
            "Status: {} (exit code {}), {:.1}s",
            self.status, self.exit_code, self.duration_secs
        ));
        lines.join("\n")
    }
}

/// One configured channel.
enum Channel {
    Ntfy(ntfy::Ntfy),
    Webhook(webhook::Webhook),
    Email(email::Email),
}

impl Channel {
    fn name(&self) -> &'static str {
        match self {
            Channel::Ntfy(_) => "ntfy",
            Channel::Webhook(_) => "webhook",
            Channel::Email(_) => "email",
        }
    }

    async fn send(&self, event: &Event) -> std::result::Result<(), String> {
        match self {
            Channel::Ntfy(c) => c.send(event).await,
            Channel::Webhook(c) => c.send(event).await,
            Channel::Email(c) => c.send(event).await,
        }
    }
}

/// One channel's result, for `notify test`.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub channel: &'static str,
    pub ok: bool,
    pub error: Option<String>,
}

/// The configured channels, ready to send.
pub struct Notifier {
    channels: Vec<Channel>,
    on: Vec<RunStatus>,
    timeout: Duration,
    redactor: Redactor,
}

impl Notifier {
    /// The channels `cfg` configures (none: a notifier that sends nothing).
    pub fn new(cfg: &NotifyConfig) -> Result<Notifier> {
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        let http = || {
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout)
                .user_agent(concat!("immich-backup/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| Error::Config(format!("[notify]: {e}")))
        };
        let mut channels = Vec::new();
        if !cfg.ntfy.url.is_empty() {
            channels.push(Channel::Ntfy(ntfy::Ntfy::new(&cfg.ntfy, http()?)));
        }
        if !cfg.webhook.url.is_empty() {
            channels.push(Channel::Webhook(webhook::Webhook::new(
                &cfg.webhook,
                http()?,
            )));
        }
        if !cfg.email.smtp_url.is_empty() {
            channels.push(Channel::Email(email::Email::new(&cfg.email, timeout)?));
        }
        Ok(Notifier {
            channels,
            on: cfg.on.clone(),
            timeout,
            redactor: Redactor::new(cfg.secrets()),
        })
    }

    /// Whether any channel is configured.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Send `event` on every channel if `[notify] on` lists its outcome; a channel that fails is a
    /// warning, nothing more.
    pub async fn notify(&self, event: &Event) {
        if !self.on.contains(&event.run_status) {
            return;
        }
        for d in self.send_all(event).await {
            match d.error {
                None => tracing::info!(
                    channel = d.channel,
                    status = event.status,
                    "notification sent"
                ),
                Some(e) => tracing::warn!(
                    channel = d.channel,
                    error = %e,
                    "notification not delivered (the {} itself is not affected)",
                    event.job
                ),
            }
        }
    }

    /// Send `event` on every channel at once, whatever `[notify] on` says; each one's result.
    pub async fn send_all(&self, event: &Event) -> Vec<Delivery> {
        let sends = self.channels.iter().map(|c| async move {
            // Each channel's own client times out first (naming where it was sending); this is
            // the backstop for one that does not.
            let limit = self.timeout + Duration::from_secs(1);
            let r = match tokio::time::timeout(limit, c.send(event)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "timed out: no answer within {}s ([notify] timeout_secs)",
                    self.timeout.as_secs()
                )),
            };
            Delivery {
                channel: c.name(),
                ok: r.is_ok(),
                error: r.err().map(|e| self.redactor.clean(&e)),
            }
        });
        futures::future::join_all(sends).await
    }
}

/// A reqwest error without its URL (which may carry a token), with its causes.
fn http_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = crate::redact::error_chain(&e);
    if e.is_timeout() {
        text.push_str(" (timed out)");
    }
    text
}

/// The host of `url`, to say where a request went without showing the URL.
fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host_str().map(|h| {
                format!(
                    "{h}{}",
                    u.port().map(|p| format!(":{p}")).unwrap_or_default()
                )
            })
        })
        .unwrap_or_else(|| "<unparsable url>".into())
}

/// Send an HTTP channel's request to `url`: `Ok` on a 2xx answer, else the one-line cause, naming
/// the host (never the URL, which may carry a token).
async fn post(url: &str, request: reqwest::RequestBuilder) -> Result<(), String> {
    let host = host_of(url);
    let resp = request
        .send()
        .await
        .map_err(|e| format!("{host}: {}", http_error(e)))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(refused(&host, resp).await)
    }
}

/// A non-2xx answer: its status and the start of its body, one line.
async fn refused(host: &str, resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    let body: String = body.chars().take(200).collect();
    if body.is_empty() {
        format!("{host} answered {status}")
    } else {
        format!("{host} answered {status}: {body}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token, the webhook URL's path and the SMTP password (as typed and decoded) are neither
    /// in the config's `Debug` nor in a cleaned error text.
    #[test]
    fn secrets_stay_out_of_debug_and_messages() {
        let mut cfg = NotifyConfig::default();
        cfg.ntfy.url = "https://ntfy.example/topic".into();
        cfg.ntfy.token = "tk_abcdef123456".into();
        cfg.webhook.url = "https://discord.example/api/webhooks/1/SeCrEtToKeN".into();
        cfg.email.smtp_url = "smtps://me%40x.example:p%40ssw0rd@mail.example".into();
        let shown = format!("{cfg:?}");
        for secret in ["tk_abcdef123456", "SeCrEtToKeN", "p%40ssw0rd", "p@ssw0rd"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let r = Redactor::new(cfg.secrets());
        let text =
            r.clean("auth failed for p@ssw0rd at /api/webhooks/1/SeCrEtToKeN with tk_abcdef123456");
        for secret in ["tk_abcdef123456", "SeCrEtToKeN", "p@ssw0rd"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    /// The list keys and the secrets of [notify] come from the environment like any other key.
    #[test]
    fn notify_keys_come_from_the_environment() {
        let vars = [
            ("IMMICH_BACKUP__NOTIFY__ON", "failure, success"),
            ("IMMICH_BACKUP__NOTIFY__NTFY__TOKEN", "tk_0123"),
            ("IMMICH_BACKUP__NOTIFY__NTFY__TAGS", "immich,backup"),
            (
                "IMMICH_BACKUP__NOTIFY__EMAIL__SMTP_URL",
                "smtps://u:p@mail.example",
            ),
            ("IMMICH_BACKUP__NOTIFY__EMAIL__FROM", "backup@x.example"),
            (
                "IMMICH_BACKUP__NOTIFY__EMAIL__TO",
                "a@x.example,b@x.example",
            ),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let cfg = crate::config::Config::load(None).expect("loads from the environment");
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let n = &cfg.notify;
        assert_eq!(n.on, vec![RunStatus::Failure, RunStatus::Success]);
        assert_eq!(n.ntfy.token, "tk_0123");
        assert_eq!(
            n.ntfy.tags,
            vec!["immich".to_string(), "backup".to_string()]
        );
        assert_eq!(n.email.to.len(), 2);
        assert!(Notifier::new(n).is_ok());
    }

    #[test]
    fn titles_and_bodies_say_what_happened() {
        let mut e = Event::new("backup", RunStatus::Failure, 14, Duration::from_secs(3));
        e.host = "nas".into();
        e.reason = Some("database: connection refused".into());
        assert_eq!(e.title(), "immich-backup on nas: backup failed");
        assert!(e
            .body()
            .starts_with("Reason: database: connection refused\n"));
        assert!(e.body().ends_with("Status: failure (exit code 14), 3.0s"));
        let e = Event::new("check", RunStatus::Partial, 3, Duration::ZERO);
        assert!(e.title().ends_with("check partial"));
    }
}
