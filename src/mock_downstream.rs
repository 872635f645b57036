//! A stand-in payment service (`rtpd mock-downstream`): a real HTTP server
//! with a configurable success rate, latency and failure mix, that counts
//! calls per idempotency key so tests and audits can see duplicates.
//!
//! A payload may script its own fate with `"_mock": {"script": ["503", "ok"]}`:
//! call n for that key answers the n-th entry (`ok`, a status code, or `hang`);
//! calls past the end succeed.
//!
//! `POST /control` changes the success rate, failure mix, latency or hang
//! length of a running mock (a downstream "storm" in the fault campaign)
//! without restarting it, so its per-key accounting survives the storm.

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::Server, web};
use rand::RngExt;
use serde::Serialize;
use std::{
    collections::BTreeMap,
    net::TcpListener,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Probability that an unscripted call succeeds.
    pub success_rate: f64,
    pub latency: Duration,
    /// Relative weights of failure kinds for unscripted failures.
    pub failure_mix: Vec<(Failure, u32)>,
    /// How long a `hang` lasts (should exceed the processor's timeout).
    pub hang: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Status(u16),
    Hang,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            success_rate: 0.8,
            latency: Duration::ZERO,
            failure_mix: vec![
                (Failure::Status(503), 5),
                (Failure::Status(429), 2),
                (Failure::Status(400), 1),
                (Failure::Hang, 1),
            ],
            hang: Duration::from_secs(60),
        }
    }
}

/// Parses `503=5,429=2,400=1,hang=1`.
pub fn parse_mix(s: &str) -> Result<Vec<(Failure, u32)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            let (kind, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KIND=WEIGHT"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: weight is not a number"))?;
            let kind = match kind.trim() {
                "hang" => Failure::Hang,
                code => match code.parse::<u16>() {
                    Ok(c) if (400..=599).contains(&c) => Failure::Status(c),
                    _ => return Err(format!("{part:?}: kind must be hang or a 4xx/5xx status")),
                },
            };
            Ok((kind, weight))
        })
        .collect()
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct KeyStats {
    pub calls: u64,
    pub successes: u64,
    /// Calls that overlapped another call for the same key.
    pub concurrent_overlaps: u64,
    /// Hex sha256 of the body of each successful call, so an audit can check
    /// that what executed is what the vendor's receipt names.
    pub success_sha256: Vec<String>,
    /// When the last call for this key arrived (Unix ms): after it the
    /// processor only settles, so an audit reads it as the time the
    /// transaction became final.
    pub last_call_ms: i64,
    /// The `traceparent` header of each call that carried one, so a test
    /// can check the caller's trace reached the payment service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub traceparents: Vec<String>,
    #[serde(skip)]
    in_flight: u32,
}

struct InFlight {
    state: Arc<Mutex<MockState>>,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock()
            && let Some(k) = st.keys.get_mut(&self.key)
        {
            k.in_flight = k.in_flight.saturating_sub(1);
        }
    }
}

#[derive(Default)]
struct MockState {
    keys: BTreeMap<String, KeyStats>,
    calls_without_key: u64,
}

/// Fields of `POST /control`; absent ones stay as they are.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    pub success_rate: Option<f64>,
    pub failure_mix: Option<String>,
    pub latency_ms: Option<u64>,
    pub hang_secs: Option<u64>,
}

#[derive(Clone)]
pub struct Mock {
    opts: Arc<RwLock<MockOptions>>,
    state: Arc<Mutex<MockState>>,
}

enum Answer {
    Ok,
    Status(u16),
    Hang,
}

impl Mock {
    pub fn new(opts: MockOptions) -> Mock {
        Mock {
            opts: Arc::new(RwLock::new(opts)),
            state: Arc::default(),
        }
    }

    fn options(&self) -> MockOptions {
        self.opts.read().expect("mock options lock").clone()
    }

    /// Applies a `POST /control` body; the options in force after it.
    pub fn control(&self, c: Control) -> Result<MockOptions, String> {
        let mut opts = self.options();
        if let Some(rate) = c.success_rate {
            if !(0.0..=1.0).contains(&rate) {
                return Err("success_rate must be between 0 and 1".into());
            }
            opts.success_rate = rate;
        }
        if let Some(mix) = &c.failure_mix {
            opts.failure_mix = parse_mix(mix)?;
        }
        if let Some(ms) = c.latency_ms {
            opts.latency = Duration::from_millis(ms);
        }
        if let Some(secs) = c.hang_secs {
            opts.hang = Duration::from_secs(secs);
        }
        *self.opts.write().expect("mock options lock") = opts.clone();
        Ok(opts)
    }

    fn pick(&self, opts: &MockOptions, script: Option<&Vec<String>>, call_no: u64) -> Answer {
        if let Some(script) = script {
            return match script.get(call_no as usize - 1).map(String::as_str) {
                None | Some("ok") => Answer::Ok,
                Some("hang") => Answer::Hang,
                Some(code) => code.parse().map(Answer::Status).unwrap_or(Answer::Ok),
            };
        }
        let mut rng = rand::rng();
        if rng.random_bool(opts.success_rate.clamp(0.0, 1.0)) {
            return Answer::Ok;
        }
        let total: u32 = opts.failure_mix.iter().map(|(_, w)| *w).sum();
        if total == 0 {
            return Answer::Status(503);
        }
        let mut roll = rng.random_range(0..total);
        for (f, w) in &opts.failure_mix {
            if roll < *w {
                return match f {
                    Failure::Status(c) => Answer::Status(*c),
                    Failure::Hang => Answer::Hang,
                };
            }
            roll -= w;
        }
        Answer::Status(503)
    }

    async fn process(&self, req: HttpRequest, body: web::Bytes) -> HttpResponse {
        let key = req
            .headers()
            .get("Idempotency-Key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let Some(key) = key else {
            self.state
                .lock()
                .expect("mock state lock")
                .calls_without_key += 1;
            return HttpResponse::BadRequest()
                .json(serde_json::json!({"error": "missing Idempotency-Key"}));
        };
        let script: Option<Vec<String>> = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("_mock")?.get("script").cloned())
            .and_then(|s| serde_json::from_value(s).ok());
        let traceparent = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (call_no, already) = {
            let mut st = self.state.lock().expect("mock state lock");
            let k = st.keys.entry(key.clone()).or_default();
            k.calls += 1;
            k.traceparents.extend(traceparent);
            k.last_call_ms = crate::clock::now().timestamp_millis();
            if k.in_flight > 0 {
                k.concurrent_overlaps += 1;
            }
            k.in_flight += 1;
            (k.calls, k.successes > 0)
        };
        // Decrements the in-flight count even if the handler is dropped midway.
        let _in_flight = InFlight {
            state: self.state.clone(),
            key: key.clone(),
        };
        let opts = self.options();
        let answer = self.pick(&opts, script.as_ref(), call_no);
        if !opts.latency.is_zero() {
            tokio::time::sleep(opts.latency).await;
        }
        match answer {
            Answer::Hang => {
                tokio::time::sleep(opts.hang).await;
                HttpResponse::GatewayTimeout().finish()
            }
            Answer::Ok if already => HttpResponse::Conflict()
                .json(serde_json::json!({"status": "already_processed", "idempotency_key": key})),
            Answer::Ok => {
                {
                    let mut st = self.state.lock().expect("mock state lock");
                    let k = st.keys.entry(key.clone()).or_default();
                    k.successes += 1;
                    k.success_sha256
                        .push(crate::transaction::Sha256::of(&body).as_str().to_owned());
                }
                HttpResponse::Ok()
                    .json(serde_json::json!({"status": "processed", "idempotency_key": key}))
            }
            Answer::Status(code) => {
                let status = actix_web::http::StatusCode::from_u16(code)
                    .unwrap_or(actix_web::http::StatusCode::SERVICE_UNAVAILABLE);
                let mut r = HttpResponse::build(status);
                if code == 429 || code == 503 {
                    r.insert_header(("Retry-After", "1"));
                }
                r.json(serde_json::json!({"error": format!("mock failure {code}")}))
            }
        }
    }

    pub fn report(&self) -> serde_json::Value {
        let st = self.state.lock().expect("mock state lock");
        let total: u64 = st.keys.values().map(|k| k.calls).sum();
        let duplicate_successes: u64 = st
            .keys
            .values()
            .map(|k| k.successes.saturating_sub(1))
            .sum();
        let overlaps: u64 = st.keys.values().map(|k| k.concurrent_overlaps).sum();
        serde_json::json!({
            "total_calls": total,
            "keys": st.keys.len(),
            "calls_without_key": st.calls_without_key,
            "duplicate_successes": duplicate_successes,
            "concurrent_overlaps": overlaps,
            "by_key": st.keys,
        })
    }

    /// Binds and returns the server (not yet awaited) and its port.
    pub fn serve(self, listener: TcpListener) -> std::io::Result<(Server, u16)> {
        let port = listener.local_addr()?.port();
        let server = HttpServer::new(move || {
            let m = self.clone();
            let m2 = self.clone();
            let m3 = self.clone();
            App::new()
                .route(
                    "/process",
                    web::post().to(move |req: HttpRequest, body: web::Bytes| {
                        let m = m.clone();
                        async move { m.process(req, body).await }
                    }),
                )
                .route(
                    "/calls",
                    web::get().to(move || {
                        let m = m2.clone();
                        async move { HttpResponse::Ok().json(m.report()) }
                    }),
                )
                .route(
                    "/control",
                    web::post().to(move |c: web::Json<Control>| {
                        let m = m3.clone();
                        async move {
                            match m.control(c.into_inner()) {
                                Ok(o) => HttpResponse::Ok().json(serde_json::json!({
                                    "success_rate": o.success_rate,
                                    "latency_ms": o.latency.as_millis() as u64,
                                    "hang_secs": o.hang.as_secs(),
                                    "failure_kinds": o.failure_mix.len(),
                                })),
                                Err(e) => HttpResponse::BadRequest().json(
                                    serde_json::json!({"error": "invalid_control", "message": e}),
                                ),
                            }
                        }
                    }),
                )
                .route(
                    "/healthz",
                    web::get().to(|| async {
                        HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
                    }),
                )
        })
        .listen(listener)?
        .disable_signals()
        .shutdown_timeout(1)
        .run();
        Ok((server, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse() {
        assert_eq!(
            parse_mix("503=5,hang=1").unwrap(),
            vec![(Failure::Status(503), 5), (Failure::Hang, 1)]
        );
        assert!(parse_mix("200=1").is_err());
        assert!(parse_mix("503").is_err());
    }

    #[test]
    fn control_changes_a_running_mock() {
        let m = Mock::new(MockOptions::default());
        let o = m
            .control(Control {
                success_rate: Some(0.0),
                failure_mix: Some("429=1".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(o.success_rate, 0.0);
        assert_eq!(o.failure_mix, vec![(Failure::Status(429), 1)]);
        assert!(matches!(m.pick(&m.options(), None, 1), Answer::Status(429)));
        assert!(
            m.control(Control {
                success_rate: Some(2.0),
                ..Default::default()
            })
            .is_err()
        );
        assert_eq!(
            m.options().success_rate,
            0.0,
            "a refused control changes nothing"
        );
    }
}
