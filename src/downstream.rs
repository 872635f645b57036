//! The downstream payment service: one POST per attempt, carrying
//! `Idempotency-Key: <transaction_id>`, and the classification of its answer.
//!
//! [`Downstream`] is the port the processor calls; [`HttpDownstream`] is the
//! real one. The deterministic simulation (`tests/sim`) plugs in a simulated
//! payment service behind the same trait.

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use std::time::{Duration, Instant};

use crate::metrics;
use crate::trace_context;
use tracing::Instrument;

/// Header carrying the attempt number (1 = first call).
pub const ATTEMPT_HEADER: &str = "X-Rtpd-Attempt";

/// What a downstream answer means for the transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum CallResult {
    /// 2xx, or 409: the service already processed this idempotency key.
    Success { status: u16 },
    /// Worth retrying: no response, timeout, connection error, 408, 429, 5xx.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Any other 4xx: retrying cannot help.
    Permanent { reason: String },
}

impl CallResult {
    pub fn label(&self) -> &'static str {
        match self {
            CallResult::Success { .. } => "success",
            CallResult::Transient { .. } => "transient",
            CallResult::Permanent { .. } => "permanent",
        }
    }
}

/// The classification table of DESIGN.md, by status code.
pub fn classify(status: u16, retry_after: Option<Duration>) -> CallResult {
    match status {
        200..=299 | 409 => CallResult::Success { status },
        408 | 429 | 500..=599 => CallResult::Transient {
            reason: format!("downstream answered {status}"),
            retry_after,
        },
        _ => CallResult::Permanent {
            reason: format!("downstream answered {status}"),
        },
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - crate::clock::now())
        .to_std()
        .ok()
}

/// The payment service as the processor sees it.
///
/// Contract: `call` sends one attempt of `transaction_id` carrying it as the
/// idempotency key, and classifies the answer; it returns within the
/// configured timeout (a hang is `Transient`).
#[async_trait::async_trait]
pub trait Downstream: Send + Sync + 'static {
    async fn call(&self, transaction_id: &str, attempt: u32, payload: Bytes) -> CallResult;
    /// For logs; never contains a secret.
    fn describe(&self) -> String;
}

/// The payment service over HTTP.
#[derive(Clone)]
pub struct HttpDownstream {
    client: reqwest::Client,
    url: url::Url,
    /// `url` as the span's `url.full` shows it ([`shown_url`]).
    shown: String,
}

/// The downstream URL without what may be a secret: its userinfo (a user
/// and password), its query (an Azure Functions `?code=`, a SAS `sig=`)
/// and its fragment. Spans are exported to a collector and kept in
/// Application Insights; the scheme, host, port and path say where the
/// call went, which is all a trace needs.
pub fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    // Fails only for a URL that cannot have userinfo, which then has none.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

impl HttpDownstream {
    pub fn new(url: url::Url, timeout: Duration) -> Result<HttpDownstream, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(HttpDownstream {
            client,
            shown: shown_url(&url),
            url,
        })
    }

    pub fn url(&self) -> &url::Url {
        &self.url
    }
}

#[async_trait::async_trait]
impl Downstream for HttpDownstream {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    async fn call(&self, transaction_id: &str, attempt: u32, payload: Bytes) -> CallResult {
        let span = tracing::info_span!(
            "downstream.call",
            otel.kind = "client",
            transaction_id = crate::transaction::TransactionId::vendor_part(transaction_id),
            transaction_key = transaction_id,
            otel.status_code = tracing::field::Empty,
            http.request.method = "POST",
            url.full = %self.shown,
            attempt,
            http.response.status_code = tracing::field::Empty,
            result = tracing::field::Empty,
        );
        let result = self
            .call_once(transaction_id, attempt, payload, &span)
            .instrument(span.clone())
            .await;
        span.record("result", result.label());
        if !matches!(result, CallResult::Success { .. }) {
            span.record("otel.status_code", "error");
        }
        result
    }
}

impl HttpDownstream {
    async fn call_once(
        &self,
        transaction_id: &str,
        attempt: u32,
        payload: Bytes,
        span: &tracing::Span,
    ) -> CallResult {
        let started = Instant::now();
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", transaction_id)
            .header(ATTEMPT_HEADER, attempt.to_string());
        // The payment service continues our trace.
        if let Some(tp) = trace_context::traceparent_of(span) {
            request = request.header(trace_context::TRACEPARENT, tp);
        }
        let sent = request.body(payload).send().await;
        let result = match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                span.record("http.response.status_code", status);
                let retry_after = parse_retry_after(resp.headers());
                // Drain the body so the connection can be reused.
                let _ = resp.bytes().await;
                classify(status, retry_after)
            }
            Err(e) => CallResult::Transient {
                reason: if e.is_timeout() {
                    "downstream timed out".to_owned()
                } else if e.is_connect() {
                    "could not connect to downstream".to_owned()
                } else {
                    // Without the URL: reqwest's text names it with its
                    // query (a `?code=` key), and this reason is stored in
                    // the ledger, which the vendor reads, and the journal.
                    format!("downstream request failed: {}", e.without_url())
                },
                retry_after: None,
            },
        };
        metrics::downstream_called(result.label(), started.elapsed());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shown_url_has_no_userinfo_query_or_fragment() {
        let url: url::Url = "https://user:pa55@pay.example.com:8443/api/pay?code=SECRET&sig=S#f"
            .parse()
            .unwrap();
        assert_eq!(shown_url(&url), "https://pay.example.com:8443/api/pay");
        let plain: url::Url = "http://127.0.0.1:9/process".parse().unwrap();
        assert_eq!(shown_url(&plain), "http://127.0.0.1:9/process");
    }

    /// Review of issue 15's url.full fix: a failed call's reason (stored in
    /// the ledger and shown to the vendor) does not carry the URL's secrets.
    #[tokio::test]
    async fn a_failed_calls_reason_does_not_name_the_urls_secrets() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Reads the request, then closes without answering.
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                drop(s);
            }
        });
        let url: url::Url =
            format!("http://payer:PA55WORD@127.0.0.1:{port}/process?code=SECRETKEY")
                .parse()
                .unwrap();
        let d = HttpDownstream::new(url, Duration::from_secs(5)).unwrap();
        let CallResult::Transient { reason, .. } =
            d.call("acme/T-1", 1, Bytes::from_static(b"{}")).await
        else {
            panic!("a closed connection is transient")
        };
        assert!(reason.starts_with("downstream request failed"), "{reason}");
        assert!(
            !reason.contains("SECRETKEY") && !reason.contains("PA55WORD"),
            "{reason}"
        );
    }

    #[test]
    fn classification_table() {
        for s in [200, 201, 202, 204, 409] {
            assert_eq!(classify(s, None), CallResult::Success { status: s }, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(
                matches!(classify(s, None), CallResult::Transient { .. }),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 405, 410, 413, 422] {
            assert!(
                matches!(classify(s, None), CallResult::Permanent { .. }),
                "{s}"
            );
        }
        let r = classify(429, Some(Duration::from_secs(7)));
        assert_eq!(
            r,
            CallResult::Transient {
                reason: "downstream answered 429".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "12".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(12)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(100)).to_rfc2822();
        h.insert(RETRY_AFTER, later.parse().unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(90) && d <= Duration::from_secs(100),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }
}
