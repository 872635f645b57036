//! A console client for the gate tests: logs in with a token, keeps the
//! session cookie and the page's CSRF token, follows no redirect (the tests
//! look at each answer).

use reqwest::{Response, header};

pub struct ConsoleClient {
    pub base: String,
    pub client: reqwest::Client,
    /// `rtpd_console=<id>` once logged in.
    pub cookie: Option<String>,
}

impl ConsoleClient {
    pub fn new(base: &str) -> ConsoleClient {
        ConsoleClient {
            base: base.to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
        }
    }

    /// POSTs the login form; keeps the session cookie it sets.
    pub async fn login(&mut self, token: &str) -> Response {
        let r = self
            .client
            .post(format!("{}/console/login", self.base))
            .header(header::CONTENT_TYPE, FORM)
            .body(form_body(&[("token", token)]))
            .send()
            .await
            .unwrap();
        if let Some(set) = r.headers().get(header::SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap().to_owned();
            self.cookie = Some(pair);
        }
        r
    }

    pub async fn get(&self, path: &str) -> Response {
        let mut r = self.client.get(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            r = r.header(header::COOKIE, c);
        }
        r.send().await.unwrap()
    }

    pub async fn text(&self, path: &str) -> String {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        r.text().await.unwrap()
    }

    /// POSTs a form with the session cookie and any extra headers.
    pub async fn post(
        &self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Response {
        let mut r = self
            .client
            .post(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, FORM)
            .body(form_body(form));
        if let Some(c) = &self.cookie {
            r = r.header(header::COOKIE, c);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.unwrap()
    }

    /// The CSRF token the overview's logout form carries.
    pub async fn csrf(&self) -> String {
        let page = self.text("/console").await;
        csrf_in(&page).expect("a CSRF token on the page")
    }
}

pub const FORM: &str = "application/x-www-form-urlencoded";

/// An HTML form's body.
pub fn form_body(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

/// The value of the first `name="csrf"` hidden field of a page.
pub fn csrf_in(page: &str) -> Option<String> {
    let at = page.find(r#"name="csrf" value=""#)?;
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// Every `href`, `src` and `action` attribute value of a page.
pub fn urls_in(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in [
        "href=\"",
        "src=\"",
        "action=\"",
        "data-live=\"",
        "data-src=\"",
    ] {
        let mut rest = page;
        while let Some(at) = rest.find(attr) {
            rest = &rest[at + attr.len()..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

/// The value of the hidden field `name` of a page.
pub fn hidden_field(page: &str, name: &str) -> Option<String> {
    let needle = format!(r#"name="{name}" value=""#);
    let at = page.find(&needle)?;
    let rest = &page[at + needle.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}
