//! `immich-backup health`: ask a running agent's `/healthz` and turn its answer into an exit code.
//!
//! A container's `HEALTHCHECK` (and compose's `healthcheck:`) runs a command inside the container;
//! the image has no curl, so the binary asks its own agent. The address comes from `[agent]
//! listen`: an agent listening on every interface (`:2284`, `0.0.0.0:2284`, `[::]:2284`) is asked
//! on loopback, one bound to an address on that address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use crate::config::parse_listen;
use crate::error::{Error, Result};

/// What the agent answered.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub url: String,
    /// `/healthz` answered 200.
    pub healthy: bool,
    /// The HTTP status.
    pub status: u16,
    /// The agent's one-line verdict (`ok: last successful backup …`, `last backup failed …`).
    pub reason: String,
}

/// The `/healthz` URL of an agent listening on `listen` (`[agent] listen`).
pub fn healthz_url(listen: &str) -> Result<String> {
    if listen.is_empty() {
        return Err(Error::Usage(
            "[agent] listen is not set, so the agent serves no /healthz: set it (e.g. listen = \":2284\") and restart the agent, or pass --url".into(),
        ));
    }
    let addr = parse_listen(listen)?;
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(format!(
        "http://{}/healthz",
        SocketAddr::new(ip, addr.port())
    ))
}

/// GET `url` within `timeout`. An agent that answers is a [`Probe`] (healthy or not); one that
/// cannot be reached is an error saying so.
pub async fn probe(url: &str, timeout: Duration) -> Result<Probe> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::Other(format!(
            "cannot reach the agent at {url}: {e}; is `immich-backup run` running, with [agent] listen on that port?"
        ))
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| unreachable(&e))?;
    let resp = client.get(url).send().await.map_err(|e| {
        let cause = if e.is_timeout() {
            format!("no answer within {} s", timeout.as_secs_f64())
        } else if e.is_connect() {
            "connection refused or no route".to_string()
        } else {
            e.without_url().to_string()
        };
        unreachable(&cause)
    })?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| unreachable(&e))?;
    Ok(Probe {
        url: url.to_string(),
        healthy: status.is_success(),
        status: status.as_u16(),
        reason: body.lines().next().unwrap_or_default().trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_become_urls_asked_on_loopback_when_unspecified() {
        assert_eq!(
            healthz_url(":2284").unwrap(),
            "http://127.0.0.1:2284/healthz"
        );
        assert_eq!(
            healthz_url("0.0.0.0:9").unwrap(),
            "http://127.0.0.1:9/healthz"
        );
        assert_eq!(healthz_url("[::]:9").unwrap(), "http://[::1]:9/healthz");
        assert_eq!(
            healthz_url("192.168.1.5:2284").unwrap(),
            "http://192.168.1.5:2284/healthz"
        );
        let e = healthz_url("").unwrap_err().to_string();
        assert!(e.contains("[agent] listen is not set"), "{e}");
        assert!(healthz_url("nonsense").is_err());
    }
}
