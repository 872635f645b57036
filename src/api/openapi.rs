//! `GET /openapi.json`: the OpenAPI 3 document of every route, hand-written in
//! `openapi.json` beside this file. A unit test here and an HTTP test in
//! `tests/api/security.rs` keep it and [`super::routes`] in step.

use actix_web::HttpResponse;

pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn serve() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT)
}

/// `(METHOD, path)` of every documented operation.
pub fn documented_routes() -> Vec<(String, String)> {
    let doc: serde_json::Value = match serde_json::from_str(DOCUMENT) {
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
        assert!(!documented.is_empty(), "openapi.json parses");
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
    fn every_response_reference_resolves() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        let text = DOCUMENT;
        for cap in text.split("\"$ref\": \"#/").skip(1) {
            let target = cap.split('"').next().unwrap();
            let mut node = &doc;
            for part in target.split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref #/{target}");
        }
    }
}
