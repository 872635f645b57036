//! Real OTLP receivers for tests, decoding with the official OpenTelemetry
//! definitions (`opentelemetry-proto`'s prost types) and keeping what they
//! got for the test to read: OTLP/HTTP (`POST /v1/traces`, `/v1/metrics`
//! and `/v1/logs` in binary protobuf) with [`OtlpReceiver::start`], OTLP/gRPC (the trace
//! service) with [`OtlpReceiver::start_grpc`].

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// OTLP `SpanKind` as its number (2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// `trace_id/span_id` of each link.
    pub links: Vec<String>,
    pub service_name: String,
    /// The resource's attributes (`service.name`, `service.instance.id`, ...).
    pub resource: BTreeMap<String, String>,
}

/// One received number data point (sums and gauges), flattened.
#[derive(Debug, Clone)]
pub struct Point {
    pub metric: String,
    pub attributes: BTreeMap<String, String>,
    pub value: f64,
}

/// One received log record, flattened.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub body: String,
    pub severity_text: String,
    /// Hex; empty when the line was written outside any traced span.
    pub trace_id: String,
    pub span_id: String,
    pub attributes: BTreeMap<String, String>,
    pub resource: BTreeMap<String, String>,
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    logs: Vec<LogLine>,
    points: Vec<Point>,
    /// Histogram metric names seen.
    histograms: Vec<String>,
    /// The resource attributes of each metrics export.
    metric_resources: Vec<BTreeMap<String, String>>,
}

pub struct OtlpReceiver {
    pub url: String,
    received: Arc<Mutex<Received>>,
    stop: Stop,
}

enum Stop {
    Http(actix_web::dev::ServerHandle),
    Grpc(tokio::sync::oneshot::Sender<()>),
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn keep_spans(req: ExportTraceServiceRequest, r: &Mutex<Received>) {
    let mut r = r.lock().unwrap();
    for rs in req.resource_spans {
        let resource = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                r.spans.push(Span {
                    name: s.name,
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    kind: s.kind,
                    attributes: attrs(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| {
                            format!("{}/{}", hex::encode(&l.trace_id), hex::encode(&l.span_id))
                        })
                        .collect(),
                    service_name: service.clone(),
                    resource: resource.clone(),
                });
            }
        }
    }
}

async fn traces(body: web::Bytes, r: web::Data<Arc<Mutex<Received>>>) -> HttpResponse {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    keep_spans(req, &r);
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

async fn logs(body: web::Bytes, r: web::Data<Arc<Mutex<Received>>>) -> HttpResponse {
    let Ok(req) = ExportLogsServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut r = r.lock().unwrap();
    for rl in req.resource_logs {
        let resource = attrs(&rl.resource.map(|r| r.attributes).unwrap_or_default());
        for sl in rl.scope_logs {
            for l in sl.log_records {
                r.logs.push(LogLine {
                    body: text(&l.body),
                    severity_text: l.severity_text,
                    trace_id: hex::encode(&l.trace_id),
                    span_id: hex::encode(&l.span_id),
                    attributes: attrs(&l.attributes),
                    resource: resource.clone(),
                });
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

struct GrpcTraces(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep_spans(request.into_inner(), &self.0);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn metrics(body: web::Bytes, r: web::Data<Arc<Mutex<Received>>>) -> HttpResponse {
    let Ok(req) = ExportMetricsServiceRequest::decode(body) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut r = r.lock().unwrap();
    for rm in req.resource_metrics {
        let resource = attrs(&rm.resource.map(|r| r.attributes).unwrap_or_default());
        r.metric_resources.push(resource);
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let points = match &m.data {
                    Some(metric::Data::Sum(s)) => s.data_points.clone(),
                    Some(metric::Data::Gauge(g)) => g.data_points.clone(),
                    Some(metric::Data::Histogram(_)) => {
                        r.histograms.push(m.name.clone());
                        continue;
                    }
                    _ => continue,
                };
                for p in points {
                    let value = match p.value {
                        Some(number_data_point::Value::AsDouble(d)) => d,
                        Some(number_data_point::Value::AsInt(i)) => i as f64,
                        None => continue,
                    };
                    r.points.push(Point {
                        metric: m.name.clone(),
                        attributes: attrs(&p.attributes),
                        value,
                    });
                }
            }
        }
    }
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

impl OtlpReceiver {
    pub fn start() -> OtlpReceiver {
        Self::start_on(0)
    }

    /// An OTLP/HTTP receiver on `port` (0: any free port), e.g. one that
    /// comes up where rtpd was told a collector would be.
    pub fn start_on(port: u16) -> OtlpReceiver {
        let received = Arc::new(Mutex::new(Received::default()));
        let data = web::Data::new(received.clone());
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(16 << 20))
                .route("/v1/traces", web::post().to(traces))
                .route("/v1/metrics", web::post().to(metrics))
                .route("/v1/logs", web::post().to(logs))
        })
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        OtlpReceiver {
            url: format!("http://127.0.0.1:{port}"),
            received,
            stop: Stop::Http(handle),
        }
    }

    /// An OTLP/gRPC receiver of spans (the trace service only).
    pub async fn start_grpc() -> OtlpReceiver {
        let received = Arc::new(Mutex::new(Received::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(GrpcTraces(received.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        OtlpReceiver {
            url: format!("http://127.0.0.1:{port}"),
            received,
            stop: Stop::Grpc(stop),
        }
    }

    pub fn logs(&self) -> Vec<LogLine> {
        self.received.lock().unwrap().logs.clone()
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    pub fn points(&self) -> Vec<Point> {
        self.received.lock().unwrap().points.clone()
    }

    pub fn histograms(&self) -> Vec<String> {
        self.received.lock().unwrap().histograms.clone()
    }

    /// The resource attributes of every metrics export received.
    pub fn metric_resources(&self) -> Vec<BTreeMap<String, String>> {
        self.received.lock().unwrap().metric_resources.clone()
    }

    /// Waits until `until` holds for what was received; fails the test after `within`.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        until: impl Fn(&OtlpReceiver) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !until(self) {
            assert!(
                Instant::now() < deadline,
                "OTLP receiver: {what} did not arrive within {within:?}; spans: {:#?}",
                self.spans()
                    .iter()
                    .map(|s| (&s.name, &s.trace_id))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) {
        match self.stop {
            Stop::Http(h) => h.stop(false).await,
            Stop::Grpc(tx) => {
                let _ = tx.send(());
            }
        }
    }
}
