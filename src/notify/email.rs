//! `[notify.email]`: a plain-text mail over SMTP with lettre, reached the way lettre's connection
//! URLs say: `smtps://` is TLS from the first byte (port 465 by default), `smtp://…?tls=required`
//! is STARTTLS or nothing, `smtp://…?tls=opportunistic` STARTTLS when offered, and bare `smtp://`
//! no encryption at all (port 587 by default for `smtp://`). Credentials come from the URL.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::Event;
use crate::config::EmailConfig;
use crate::error::{Error, Result};

pub(super) struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// `host:port` for messages (the URL's credentials are not shown).
    server: String,
}

impl Email {
    pub(super) fn new(cfg: &EmailConfig, timeout: Duration) -> Result<Email> {
        let bad = |what: String| Error::Config(format!("[notify.email] {what}"));
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&cfg.smtp_url)
            .map_err(|e| bad(format!("smtp_url: {e}")))?
            .timeout(Some(timeout))
            .build();
        let from = cfg
            .from
            .parse()
            .map_err(|e| bad(format!("from {:?}: {e}", cfg.from)))?;
        let to = cfg
            .to
            .iter()
            .map(|t| t.parse().map_err(|e| bad(format!("to {t:?}: {e}"))))
            .collect::<Result<Vec<Mailbox>>>()?;
        let server = url::Url::parse(&cfg.smtp_url)
            .ok()
            .map(|u| {
                let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
                format!("{}{port}", u.host_str().unwrap_or_default())
            })
            .unwrap_or_default();
        Ok(Email {
            transport,
            from,
            to,
            server,
        })
    }

    pub(super) async fn send(&self, event: &Event) -> std::result::Result<(), String> {
        let mut mail = Message::builder()
            .from(self.from.clone())
            .subject(event.title())
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            mail = mail.to(to.clone());
        }
        let mail = mail
            .body(event.body() + "\n")
            .map_err(|e| format!("the mail could not be built: {e}"))?;
        self.transport
            .send(mail)
            .await
            .map(|_| ())
            .map_err(|e| format!("{}: {}", self.server, crate::redact::error_chain(&e)))
    }
}
