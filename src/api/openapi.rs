//! `GET /openapi.json`: the OpenAPI document, generated from the handlers'
//! annotations and the types they serialize, so schemas cannot drift from
//! the code. A unit test here and an HTTP test in `tests/api/security.rs`
//! keep it and [`super::routes`] in step.

use super::{error, health, ingest, seed, transactions};
use actix_web::HttpResponse;
use std::sync::LazyLock;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, OpenApi as Document, Ref, ResponseBuilder, Type,
};
use utoipa::{Modify, OpenApi};

const DESCRIPTION: &str = "Every error is JSON: {\"error\": <code>, \"message\": <text>}. Vendors \
authenticate with an API key (X-Api-Key) or an HMAC-SHA256 signature (X-Rtpd-Vendor, \
X-Rtpd-Timestamp, X-Rtpd-Signature: v1=<hex> over timestamp + \".\" + body; for a request without \
a body, over timestamp + \".\" + METHOD + \" \" + path?query), or a Standard Webhooks signature \
(webhook-id, webhook-timestamp, webhook-signature: v1,<base64> over id + \".\" + timestamp + \".\" + \
body). Operators use Authorization: Bearer <admin token>. See docs/security.md.";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rtpd — durability layer for real-time payments",
        version = "1",
        description = DESCRIPTION
    ),
    paths(
        ingest::ingest,
        transactions::list,
        transactions::get,
        transactions::replay,
        seed::metrics,
        seed::status,
        seed::transactions,
        seed::replay,
        health::healthz,
        health::readyz,
        serve,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&SecuritySchemes, &EveryRoute)
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut Document) {
        let c = doc.components.get_or_insert_with(Default::default);
        let header = |name: &str, what: &str| {
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(name, what)))
        };
        c.add_security_scheme(
            "ApiKey",
            header(
                "X-Api-Key",
                "Vendor API key (vendors configured with sha256:<hash>)",
            ),
        );
        c.add_security_scheme("VendorId", header("X-Rtpd-Vendor", "Signing vendor id"));
        c.add_security_scheme(
            "SignatureTimestamp",
            header(
                "X-Rtpd-Timestamp",
                "Unix seconds; refused outside the replay window (RTPD_SIGNATURE_WINDOW_SECS, default 300) either way",
            ),
        );
        c.add_security_scheme(
            "VendorSignature",
            header(
                "X-Rtpd-Signature",
                "v1=<hex HMAC-SHA256 of timestamp + \".\" + body>; each signature is accepted once",
            ),
        );
        c.add_security_scheme(
            "WebhookId",
            header("webhook-id", "Standard Webhooks message id"),
        );
        c.add_security_scheme(
            "WebhookTimestamp",
            header(
                "webhook-timestamp",
                "Standard Webhooks attempt time, unix seconds; refused outside the replay window",
            ),
        );
        c.add_security_scheme(
            "WebhookSignature",
            header(
                "webhook-signature",
                "Space-separated v1,<base64 HMAC-SHA256 of id + \".\" + timestamp + \".\" + body> (whsec_ secret); each attempt accepted once",
            ),
        );
        c.add_security_scheme(
            "AdminToken",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Operator token (RTPD_ADMIN_TOKENS)"))
                    .build(),
            ),
        );
    }
}

/// What every route can answer, because every request passes the same
/// limits (`super::limits`) before its handler.
struct EveryRoute;

impl Modify for EveryRoute {
    fn modify(&self, doc: &mut Document) {
        let error = || ContentBuilder::new().schema(Some(Ref::from_schema_name("Error")));
        let retry_after = || {
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                .description(Some("Seconds to wait"))
                .build()
        };
        let common = [
            (
                "429",
                ResponseBuilder::new()
                    .description("Over the vendor's rate limit (RTPD_VENDOR_RATE_PER_SEC); retry after Retry-After")
                    .content("application/json", error().build())
                    .header("Retry-After", retry_after())
                    .build(),
            ),
            (
                "431",
                ResponseBuilder::new()
                    .description("Request line and headers larger than RTPD_MAX_HEADER_BYTES")
                    .content("application/json", error().build())
                    .build(),
            ),
            (
                "503",
                ResponseBuilder::new()
                    .description("A dependency is unavailable, or too many requests are in flight (RTPD_MAX_IN_FLIGHT); retry after Retry-After")
                    .content("application/json", error().build())
                    .header("Retry-After", retry_after())
                    .build(),
            ),
        ];
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                for (status, response) in &common {
                    op.responses
                        .responses
                        .entry((*status).to_owned())
                        .or_insert_with(|| response.clone().into());
                }
            }
        }
    }
}

static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"openapi\",\"message\":\"{e}\"}}"))
});

/// The OpenAPI document of every route.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    responses((status = 200, description = "This document", content_type = "application/json")),
    security(())
)]
pub async fn serve() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT.as_str())
}

/// The document as JSON text.
pub fn document() -> &'static str {
    DOCUMENT.as_str()
}

/// `(METHOD, path)` of every documented operation.
pub fn documented_routes() -> Vec<(String, String)> {
    let doc: serde_json::Value = match serde_json::from_str(document()) {
        Ok(d) => d,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, ops) in paths {
            for method in ops.as_object().into_iter().flat_map(|o| o.keys()) {
                out.push((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_served_route_is_documented_and_nothing_else() {
        let served: BTreeSet<(String, String)> = crate::api::served_routes()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_owned()))
            .collect();
        let documented: BTreeSet<(String, String)> = documented_routes().into_iter().collect();
        assert!(!documented.is_empty(), "the document parses");
        assert_eq!(
            served.difference(&documented).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "served but not documented"
        );
        assert_eq!(
            documented.difference(&served).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "documented but not served"
        );
    }

    #[test]
    fn every_schema_reference_resolves() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        let text = document();
        let refs: Vec<&str> = text
            .split("\"$ref\": \"#/")
            .skip(1)
            .map(|c| c.split('"').next().unwrap())
            .collect();
        assert!(!refs.is_empty());
        for target in refs {
            let mut node = &doc;
            for part in target.split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref #/{target}");
        }
    }

    #[test]
    fn schemas_come_from_the_types() {
        let doc: serde_json::Value = serde_json::from_str(document()).unwrap();
        let schemas = &doc["components"]["schemas"];
        for name in [
            "Receipt",
            "Transaction",
            "Error",
            "ReplayRequest",
            "State",
            "Page",
        ] {
            assert!(schemas[name].is_object(), "{name} missing: {schemas}");
        }
        let states = &schemas["State"]["enum"];
        assert_eq!(
            states,
            &serde_json::json!(["pending", "processing", "success", "failed", "dead_letter"])
        );
        assert!(
            schemas["Receipt"]["properties"]["wal"].is_object(),
            "{}",
            schemas["Receipt"]
        );
    }
}
