//! Keeping secrets out of what is shown: store URLs without their credentials, error texts without
//! keys, tokens or signatures, and one line per error.
//!
//! A leaf: the store, the config and the cloud builders all show text that may carry a secret.

/// Hide credentials (user:password@ and query strings) in a store URL before it is shown.
pub(crate) fn redact_url(url: &str) -> String {
    if url.is_empty() || url.starts_with('/') {
        // Empty, or a folder store's plain path: nothing secret in it.
        return url.to_string();
    }
    match url::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            let had_query = u.query().is_some();
            u.set_query(None);
            let mut shown = u.to_string();
            if had_query {
                shown.push_str("?<redacted>");
            }
            shown
        }
        Err(_) => "<unparsable url>".to_string(),
    }
}

/// Removes secrets from text that is about to be shown (errors, logs).
#[derive(Debug, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

/// Longest error detail shown, in characters.
const MAX_DETAIL: usize = 400;

impl Redactor {
    pub fn new(secrets: Vec<String>) -> Redactor {
        Redactor {
            secrets: secrets.into_iter().filter(|s| s.len() >= 4).collect(),
        }
    }

    /// Our own one-line message (already worded for the user, so never shortened), without secrets.
    pub fn scrub(&self, text: &str) -> String {
        let mut s = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for secret in &self.secrets {
            s = s.replace(secret.as_str(), "<redacted>");
        }
        s
    }

    /// One line, no secrets, no URL query strings, XML error bodies reduced to their code and message.
    pub fn clean(&self, text: &str) -> String {
        let mut s = summarize_xml(text);
        for secret in &self.secrets {
            s = s.replace(secret.as_str(), "<redacted>");
        }
        let mut out = String::with_capacity(s.len());
        for (i, word) in s.split_whitespace().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(&redact_word(word));
        }
        if out.chars().count() > MAX_DETAIL {
            out = out.chars().take(MAX_DETAIL).collect::<String>() + "…";
        }
        out
    }
}

/// A URL's query string, and `sig=`/`signature=`/`token=` values anywhere, become `<redacted>`.
fn redact_word(word: &str) -> String {
    let mut w = word.to_string();
    if let Some(i) = w.find("://") {
        if let Some(q) = w[i..].find('?') {
            let end = w[i + q..]
                .find(['"', '\'', '>', ')', ','])
                .map(|e| i + q + e)
                .unwrap_or(w.len());
            w.replace_range(i + q + 1..end, "<redacted>");
        }
    }
    let lower = w.to_ascii_lowercase();
    for marker in ["sig=", "signature=", "token=", "credential="] {
        if let Some(at) = lower.find(marker) {
            let from = at + marker.len();
            let end = w[from..]
                .find(['&', '"', '\'', '<', ' '])
                .map(|e| from + e)
                .unwrap_or(w.len());
            w.replace_range(from..end, "<redacted>");
            break;
        }
    }
    w
}

/// `<Code>` and the first line of `<Message>` of an XML error body, instead of the whole body
/// (S3's SignatureDoesNotMatch carries the string to sign; Azure's the signature).
fn summarize_xml(text: &str) -> String {
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error")) else {
        return text.to_string();
    };
    let tag = |name: &str| -> Option<String> {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let a = text[start..].find(&open)? + start + open.len();
        let b = text[a..].find(&close)? + a;
        Some(text[a..b].lines().next().unwrap_or("").trim().to_string())
    };
    let mut out = text[..start].trim_end().to_string();
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => out.push_str(&format!(" {c}: {m}")),
        (Some(c), None) => out.push_str(&format!(" {c}")),
        (None, Some(m)) => out.push_str(&format!(" {m}")),
        (None, None) => out.push_str(" (XML error body)"),
    }
    out
}

/// An error and its sources, each part once.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !t.is_empty() && !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

/// The first `io::Error` in an error's source chain (itself included).
pub(crate) fn io_error_in<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a std::io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redactor_removes_secrets_queries_and_xml_bodies() {
        let r = Redactor::new(vec!["s3cr3t/KEY+value".into(), "abc".into()]);
        let text = "Generic S3 error: Error performing PUT https://acct.blob.core.windows.net/c/data/x?sv=2023&sig=AbC%2Fdef in 2s - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match\nRequestId: 1</Message><StringToSign>AWS4-HMAC-SHA256 s3cr3t/KEY+value</StringToSign></Error>";
        let out = r.clean(text);
        assert!(!out.contains("s3cr3t"), "{out}");
        assert!(!out.contains("AbC"), "{out}");
        assert!(!out.contains("StringToSign"), "{out}");
        assert!(!out.contains('\n'), "{out}");
        assert!(out.contains("?<redacted> in 2s"), "{out}");
        assert!(
            out.ends_with("403 Forbidden: SignatureDoesNotMatch: The request signature we calculated does not match"),
            "{out}"
        );
        // Short strings are not treated as secrets (they would blank out ordinary words).
        assert!(r.clean("abc def").contains("abc"));
        // A secret outside XML and URLs is replaced too; long text is cut.
        assert_eq!(r.clean("key s3cr3t/KEY+value here"), "key <redacted> here");
        assert!(r.clean(&"x ".repeat(1000)).chars().count() <= MAX_DETAIL + 1);
        assert_eq!(redact_word("token=abc&x=1"), "token=<redacted>&x=1");
    }

    #[test]
    fn redact_url_keeps_empty_empty() {
        assert_eq!(redact_url(""), "");
        assert_eq!(
            redact_url("https://u:p@host/x?sig=1"),
            "https://host/x?<redacted>"
        );
    }
}
