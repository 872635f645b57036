//! The operations console at `/console` (issue 18): server-rendered pages
//! over [`crate::console`], behind the admin token. This module owns the
//! gate — login, sessions, CSRF, the security headers — and the routes;
//! `views` renders the pages; `assets/` holds the one stylesheet, the one
//! script and the icon, compiled into the binary.
//!
//! Who may use it: a browser logged in with an admin token (a session
//! cookie), or any client presenting the token as `Authorization: Bearer`.
//! Every POST from a session carries the session's CSRF token, and comes
//! from this origin as far as the browser says (`Sec-Fetch-Site`, `Origin`;
//! see `same_origin`). Payloads are shown only
//! in page bodies (redacted by `RTPD_CONSOLE_REDACT`), never in a URL or a
//! log line. `RTPD_CONSOLE=false` leaves the routes out (404).

pub mod session;
mod views;

use super::ApiState;
use crate::auth::Principal;
use crate::console::{Console, DeadLetterPick, Observed, Selection, redact::Redaction};
use crate::replay::{Operator, ReplayRequest};
use crate::transaction::{State, TransactionId, WalRef};
use actix_web::{
    HttpRequest, HttpResponse,
    cookie::{Cookie, SameSite, time::Duration as CookieDuration},
    http::{StatusCode, header},
    web,
};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use maud::Markup;
use serde::Deserialize;
use session::{COOKIE, Current, Sessions};

/// The console's part of the API state.
pub struct ConsoleState {
    pub console: Console,
    pub sessions: Sessions,
}

impl ConsoleState {
    pub fn new(replayer: crate::replay::Replayer, redact: &str) -> ConsoleState {
        ConsoleState {
            console: Console::new(replayer, Redaction::parse(redact), Observed::default()),
            sessions: Sessions::default(),
        }
    }
}

/// The Content-Security-Policy of every console answer: only this origin's
/// script and stylesheet (no inline script or style), no framing, forms
/// post only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/favicon.svg");

/// Registers the console's routes (when `RTPD_CONSOLE` is on).
pub fn configure(cfg: &mut web::ServiceConfig, console: std::sync::Arc<ConsoleState>) {
    cfg.service(
        web::scope("/console")
            .app_data(web::Data::from(console))
            // A bulk replay's confirmation carries its keys.
            .app_data(
                web::FormConfig::default()
                    .limit(256 * 1024)
                    .error_handler(|e, _| malformed(e)),
            )
            .app_data(web::QueryConfig::default().error_handler(|e, _| malformed(e)))
            .route("", web::get().to(overview))
            .route("/", web::get().to(overview))
            .route("/login", web::get().to(login_form))
            .route("/login", web::post().to(login))
            .route("/logout", web::post().to(logout))
            .route("/overview.frag", web::get().to(overview_fragment))
            .route("/find", web::get().to(find))
            .route("/tx", web::get().to(timeline))
            .route("/tx/live", web::get().to(timeline_live))
            .route("/tx/events", web::get().to(timeline_events))
            .route("/dlq", web::get().to(dead_letters))
            .route("/replay/preview", web::post().to(replay_preview))
            .route("/replay", web::post().to(replay))
            .route("/wal", web::get().to(wal_day))
            .route("/wal/hour", web::get().to(wal_hour))
            .route("/wal/segment", web::get().to(wal_segment))
            .route("/wal/record", web::get().to(wal_record))
            .route("/assets/console.css", web::get().to(css))
            .route("/assets/console.js", web::get().to(js))
            .route("/assets/favicon.svg", web::get().to(icon))
            .default_service(web::to(not_found)),
    );
}

/// A form or query the console's pages never send: 400, as a page.
fn malformed(e: impl std::fmt::Display + std::fmt::Debug + 'static) -> actix_web::Error {
    let page = html(
        StatusCode::BAD_REQUEST,
        views::forbidden(&format!("This request is not one the console sends: {e}")),
    );
    actix_web::error::InternalError::from_response(e, page).into()
}

/// Who is using the console.
pub enum Who {
    /// A browser session.
    Session(Current),
    /// `Authorization: Bearer <admin token>`: no cookie, so no CSRF token needed.
    Bearer(String),
}

impl Who {
    pub fn operator(&self) -> &str {
        match self {
            Who::Session(s) => &s.operator,
            Who::Bearer(name) => name,
        }
    }

    pub(crate) fn csrf(&self) -> Option<&str> {
        match self {
            Who::Session(s) => Some(&s.csrf),
            Who::Bearer(_) => None,
        }
    }
}

fn operator_name(p: Principal) -> Option<String> {
    match p {
        Principal::Admin(name) => Some(name),
        Principal::Anonymous => Some("anonymous".into()),
        Principal::Vendor(_) => None,
    }
}

fn console_state(state: &ApiState) -> Option<&ConsoleState> {
    state.console.as_deref()
}

/// The session of the request's cookie, if it is live and its token is
/// still an admin token.
pub fn session_of(state: &ApiState, req: &HttpRequest) -> Option<Current> {
    let c = console_state(state)?;
    let id = req.cookie(COOKIE)?;
    let current = c.sessions.get(id.value())?;
    if state.auth.admin(Some(current.token())).is_none() {
        c.sessions.end(&current.id);
        return None;
    }
    Some(current)
}

fn who(state: &ApiState, req: &HttpRequest) -> Option<Who> {
    if let Some(token) = super::bearer(req) {
        return state
            .auth
            .admin(Some(token))
            .and_then(operator_name)
            .map(Who::Bearer);
    }
    session_of(state, req).map(Who::Session)
}

/// A console answer with the security headers.
fn respond(status: StatusCode, content_type: &str, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, content_type.to_owned()))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("Cross-Origin-Opener-Policy", "same-origin"))
        .insert_header(("Cross-Origin-Resource-Policy", "same-origin"))
        .body(body)
}

fn html(status: StatusCode, m: Markup) -> HttpResponse {
    respond(status, "text/html; charset=utf-8", m.into_string())
}

fn see_other(to: &str) -> HttpResponse {
    let mut r = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        String::new(),
    );
    if let Ok(v) = header::HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Not logged in: pages send the browser to the login form; fragments
/// answer 401 (the page's script then offers the login).
fn unauthenticated(req: &HttpRequest) -> HttpResponse {
    if req.path().ends_with(".frag") || req.path().starts_with("/console/tx/") {
        return html(StatusCode::UNAUTHORIZED, views::session_ended());
    }
    see_other("/console/login")
}

/// A console answer for an error of the reads or actions.
fn failed(who: &Who, what: &str, e: impl std::fmt::Display) -> HttpResponse {
    tracing::warn!(error = %e, "console: {what} failed");
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        views::failed(who, what, &e.to_string()),
    )
}

fn bad_request(who: &Who, message: &str) -> HttpResponse {
    html(StatusCode::BAD_REQUEST, views::bad_request(who, message))
}

/// The refusal of a POST that does not come from this console: one from
/// a session must carry the session's CSRF token, and come from this
/// origin when the browser says where from (a bearer caller has no cookie
/// to be lured into sending).
fn refused_post(req: &HttpRequest, who: &Who, csrf: Option<&str>) -> Option<HttpResponse> {
    if !same_origin(req) {
        tracing::warn!("console: a POST from another origin refused");
        return Some(forbidden("This request came from another site."));
    }
    if let Who::Session(s) = who
        && !csrf.is_some_and(|c| s.csrf_matches(c))
    {
        tracing::warn!(operator = %s.operator, "console: a POST without its CSRF token refused");
        return Some(forbidden(
            "This form is not from your session (its CSRF token is missing or wrong). Reload the page and try again.",
        ));
    }
    None
}

fn forbidden(message: &str) -> HttpResponse {
    html(StatusCode::FORBIDDEN, views::forbidden(message))
}

/// Whether a POST comes from a page of this server, as far as the browser
/// says: `Sec-Fetch-Site` (sent by current browsers whatever the referrer
/// policy) is `same-origin` or `none` (typed, a bookmark) when sent; `Origin`
/// names this server (the request's `Host`) when sent — except `null`,
/// which is what a browser sends for a same-origin form under
/// `Referrer-Policy: no-referrer` and says nothing.
fn same_origin(req: &HttpRequest) -> bool {
    let h = req.headers();
    if let Some(site) = h.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return false;
        }
    }
    let Some(origin) = h.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if origin == "null" {
        return true;
    }
    let Some(host) = h.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

async fn css() -> HttpResponse {
    respond(StatusCode::OK, "text/css; charset=utf-8", CSS.to_owned())
}

async fn js() -> HttpResponse {
    respond(
        StatusCode::OK,
        "text/javascript; charset=utf-8",
        JS.to_owned(),
    )
}

async fn icon() -> HttpResponse {
    respond(StatusCode::OK, "image/svg+xml", ICON.to_owned())
}

async fn not_found(req: HttpRequest, state: web::Data<ApiState>) -> HttpResponse {
    match who(&state, &req) {
        Some(w) => html(StatusCode::NOT_FOUND, views::not_found(&w)),
        None => unauthenticated(&req),
    }
}

async fn login_form(req: HttpRequest, state: web::Data<ApiState>) -> HttpResponse {
    if who(&state, &req).is_some() {
        return see_other("/console");
    }
    html(StatusCode::OK, views::login(None))
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

async fn login(
    req: HttpRequest,
    form: web::Form<LoginForm>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let Some(c) = console_state(&state) else {
        return html(StatusCode::NOT_FOUND, views::login(None));
    };
    if !same_origin(&req) {
        return forbidden("This request came from another site.");
    }
    let token = form.token.trim();
    let Some(operator) = (!token.is_empty())
        .then(|| state.auth.admin(Some(token)))
        .flatten()
        .and_then(operator_name)
    else {
        let from = state.client_ip(&req).map(|ip| ip.to_string());
        tracing::warn!(from, "console: login refused (not an admin token)");
        return html(
            StatusCode::UNAUTHORIZED,
            views::login(Some("That is not an admin token.")),
        );
    };
    let Some(session) = c.sessions.create(&operator, token) else {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            views::login(Some(
                "Too many console sessions are open in this process; try again later.",
            )),
        );
    };
    tracing::info!(operator = %operator, "console: logged in");
    let secure = req.connection_info().scheme() == "https";
    let cookie = Cookie::build(COOKIE, session.id)
        .path("/console")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(CookieDuration::seconds(session::LIFETIME.as_secs() as i64))
        .finish();
    let mut r = see_other("/console");
    let _ = r.add_cookie(&cookie);
    r
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    csrf: Option<String>,
}

async fn logout(
    req: HttpRequest,
    form: web::Form<CsrfOnly>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    if let Some(refused) = refused_post(&req, &who, form.csrf.as_deref()) {
        return refused;
    }
    if let (Who::Session(s), Some(c)) = (&who, console_state(&state)) {
        c.sessions.end(&s.id);
    }
    let mut r = see_other("/console/login");
    let mut gone = Cookie::build(COOKIE, "").path("/console").finish();
    gone.make_removal();
    let _ = r.add_cookie(&gone);
    r
}

/// One dependency as the overview shows it.
pub struct Health {
    pub name: String,
    pub ok: bool,
    /// What it answered: `connected`, or why not.
    pub detail: String,
}

/// What the overview shows of the process's dependencies: the readiness
/// checks, and whether the downstream accepts a TCP connection from here.
async fn health(state: &ApiState) -> Vec<Health> {
    let mut out: Vec<Health> = state
        .dependencies
        .checked()
        .await
        .into_iter()
        .map(|(name, detail)| Health {
            name: name.to_owned(),
            // As /readyz and /status read the checks.
            ok: detail == "connected",
            detail,
        })
        .collect();
    out.push(downstream_reachable(state).await);
    out
}

async fn downstream_reachable(state: &ApiState) -> Health {
    let url = &state.settings.downstream_url;
    let (ok, detail) = match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => {
            let connect = tokio::net::TcpStream::connect((host, port));
            match tokio::time::timeout(std::time::Duration::from_secs(2), connect).await {
                Ok(Ok(_)) => (true, "reachable (TCP, from this process)".to_owned()),
                Ok(Err(e)) => (false, format!("unavailable: {e}")),
                Err(_) => (false, "unavailable: no answer within 2 s".to_owned()),
            }
        }
        _ => (
            false,
            "unavailable: no host in RTPD_DOWNSTREAM_URL".to_owned(),
        ),
    };
    Health {
        name: "downstream".into(),
        ok,
        detail,
    }
}

async fn overview(
    req: HttpRequest,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    let o = console.console.overview().await;
    let h = health(&state).await;
    html(StatusCode::OK, views::overview(&who, &o, &h))
}

async fn overview_fragment(
    req: HttpRequest,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    if who(&state, &req).is_none() {
        return unauthenticated(&req);
    }
    let o = console.console.overview().await;
    let h = health(&state).await;
    html(StatusCode::OK, views::overview_numbers(&o, &h))
}

#[derive(Deserialize, Default)]
pub struct FindQuery {
    id: Option<String>,
    vendor: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// A time from a form: RFC 3339, or a `datetime-local` value (read as UTC).
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| Utc.from_utc_datetime(&t))
}

/// The longest time range a search by vendor reads.
const FIND_MAX_RANGE: chrono::Duration = chrono::Duration::hours(24);

async fn find(
    req: HttpRequest,
    q: web::Query<FindQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    let c = &console.console;
    fn nonempty(s: &Option<String>) -> Option<&str> {
        s.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }
    let (id, vendor) = (nonempty(&q.id), nonempty(&q.vendor));
    let (from, to) = (nonempty(&q.from), nonempty(&q.to));
    let results = if let Some(id) = id {
        let Ok(id) = TransactionId::parse(id) else {
            return bad_request(
                &who,
                "A transaction id is 1–128 characters of A-Za-z0-9._:-",
            );
        };
        match c.find_by_id(&id, vendor, &state.auth.vendor_names()).await {
            Ok(found) => views::FindResults::ById(found),
            Err(e) => return failed(&who, "the search", e),
        }
    } else if from.is_some() || to.is_some() {
        let (Some(from), Some(to)) = (from.and_then(parse_time), to.and_then(parse_time)) else {
            return bad_request(&who, "Give both ends of the time range (UTC).");
        };
        if to < from || to - from > FIND_MAX_RANGE {
            return bad_request(
                &who,
                "The time range must run forwards and span at most 24 hours.",
            );
        }
        match c.find_received(vendor, from, to).await {
            Ok((found, cut)) => views::FindResults::Received { found, cut },
            Err(e) => return failed(&who, "the search", e),
        }
    } else {
        views::FindResults::None
    };
    html(
        StatusCode::OK,
        views::find(&who, &q.into_inner().into(), &results),
    )
}

impl From<FindQuery> for views::FindForm {
    fn from(q: FindQuery) -> Self {
        views::FindForm {
            id: q.id.unwrap_or_default(),
            vendor: q.vendor.unwrap_or_default(),
            from: q.from.unwrap_or_default(),
            to: q.to.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
pub struct KeyQuery {
    key: String,
}

async fn timeline(
    req: HttpRequest,
    q: web::Query<KeyQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    match console.console.timeline(&q.key).await {
        Ok(Some(t)) => html(StatusCode::OK, views::timeline(&who, &t)),
        Ok(None) => html(StatusCode::NOT_FOUND, views::not_found(&who)),
        Err(crate::console::ConsoleError::Invalid(m)) => bad_request(&who, &m),
        Err(e) => failed(&who, "reading the timeline", e),
    }
}

async fn timeline_live(
    req: HttpRequest,
    q: web::Query<KeyQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    if who(&state, &req).is_none() {
        return unauthenticated(&req);
    }
    match console.console.record(&q.key).await {
        Ok(Some(r)) => html(StatusCode::OK, views::live_state(&r)),
        Ok(None) => html(StatusCode::NOT_FOUND, views::gone()),
        Err(e) => {
            tracing::debug!(error = %e, "console: live state not read");
            html(StatusCode::SERVICE_UNAVAILABLE, views::gone())
        }
    }
}

async fn timeline_events(
    req: HttpRequest,
    q: web::Query<KeyQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    if who(&state, &req).is_none() {
        return unauthenticated(&req);
    }
    match console.console.timeline(&q.key).await {
        Ok(Some(t)) => html(StatusCode::OK, views::events(&t)),
        Ok(None) => html(StatusCode::NOT_FOUND, views::gone()),
        Err(e) => {
            tracing::debug!(error = %e, "console: timeline not read");
            html(StatusCode::SERVICE_UNAVAILABLE, views::gone())
        }
    }
}

async fn dead_letters(
    req: HttpRequest,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    match console.console.dead_letter_groups().await {
        Ok((groups, more)) => html(StatusCode::OK, views::dead_letters(&who, &groups, more)),
        Err(e) => failed(&who, "reading the dead-letter queue", e),
    }
}

/// A replay's form: what to take (a preview), then the confirmation.
#[derive(Deserialize, Debug, Default)]
pub struct ReplayForm {
    csrf: Option<String>,
    /// `tx`, `dlq-one`, `dlq-group` or `dlq-range`.
    target: String,
    /// `tx`: the transaction's key and the state the operator saw.
    key: Option<String>,
    seen: Option<String>,
    /// `tx` of a `success`: replay it anyway.
    force: Option<String>,
    /// `dlq-one`: the message's sequence number.
    seq: Option<i64>,
    /// `dlq-group`: the dead-letter reason.
    group: Option<String>,
    /// `dlq-range`: dead-lettered between (UTC).
    from: Option<String>,
    to: Option<String>,
    /// The confirmation: the keys and messages the dry run counted.
    keys: Option<String>,
    seqs: Option<String>,
    /// Why (journaled).
    why: Option<String>,
    /// A forced replay's acknowledgement that the downstream is called again.
    understood: Option<String>,
}

impl ReplayForm {
    fn selection(&self) -> Result<Selection, &'static str> {
        match self.target.as_str() {
            "tx" => {
                let key = self
                    .key
                    .as_deref()
                    .and_then(|k| TransactionId::parse_key(k).ok())
                    .ok_or("no transaction named")?;
                let seen = self
                    .seen
                    .as_deref()
                    .and_then(State::parse)
                    .ok_or("the state you saw is missing")?;
                Ok(Selection::Transaction {
                    key,
                    seen,
                    force: self.force.is_some(),
                })
            }
            "dlq-one" => Ok(Selection::DeadLetters(DeadLetterPick::One(
                self.seq.ok_or("no message named")?,
            ))),
            "dlq-group" => Ok(Selection::DeadLetters(DeadLetterPick::Reason(
                self.group.clone().ok_or("no group named")?,
            ))),
            "dlq-range" => {
                let from = self.from.as_deref().and_then(parse_time);
                let to = self.to.as_deref().and_then(parse_time);
                match (from, to) {
                    (Some(f), Some(t)) if f <= t => {
                        Ok(Selection::DeadLetters(DeadLetterPick::Between(f, t)))
                    }
                    _ => Err("give both ends of the time range (UTC), the start first"),
                }
            }
            _ => Err("unknown replay target"),
        }
    }
}

async fn replay_preview(
    req: HttpRequest,
    form: web::Form<ReplayForm>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    if let Some(refused) = refused_post(&req, &who, form.csrf.as_deref()) {
        return refused;
    }
    let selection = match form.selection() {
        Ok(s) => s,
        Err(m) => return bad_request(&who, m),
    };
    let what = match &selection {
        Selection::Transaction { key, .. } => format!("Transaction {key}"),
        Selection::DeadLetters(DeadLetterPick::One(seq)) => {
            format!("Dead-lettered message {seq}")
        }
        Selection::DeadLetters(DeadLetterPick::Reason(r)) => {
            format!("Dead letters with reason {r}")
        }
        Selection::DeadLetters(DeadLetterPick::Between(from, to)) => format!(
            "Dead letters from {} to {}",
            from.format("%Y-%m-%d %H:%M:%S UTC"),
            to.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    };
    match console.console.plan(&selection).await {
        Ok(plan) => html(
            StatusCode::OK,
            views::replay_preview(&who, &form.target, &what, &plan),
        ),
        Err(e) => failed(&who, "the dry run", e),
    }
}

async fn replay(
    req: HttpRequest,
    form: web::Form<ReplayForm>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    if let Some(refused) = refused_post(&req, &who, form.csrf.as_deref()) {
        return refused;
    }
    let why = form.why.as_deref().map(str::trim).unwrap_or_default();
    if why.is_empty() {
        return bad_request(&who, "Say why you replay: the reason is journaled.");
    }
    let keys: Vec<String> = form
        .keys
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if keys.is_empty() || keys.len() > crate::console::MAX_BULK {
        return bad_request(&who, "Nothing to replay: start from a dry run.");
    }
    if keys.iter().any(|k| TransactionId::parse_key(k).is_err()) {
        return bad_request(&who, "A transaction key in the form is not valid.");
    }
    let seqs: Result<Vec<i64>, _> = form
        .seqs
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::parse::<i64>)
        .collect();
    let Ok(seqs) = seqs else {
        return bad_request(&who, "A message sequence number in the form is not valid.");
    };
    let expect = form.seen.as_deref().and_then(State::parse);
    let force = form.force.is_some();
    if force && (expect != Some(State::Success) || form.understood.is_none()) {
        return bad_request(
            &who,
            "A forced replay calls the downstream again for a payment that succeeded: tick the box that says you understand.",
        );
    }
    let req_ = ReplayRequest {
        force,
        operator: Operator::Console(who.operator().to_owned()),
        reason: Some(why.to_owned()),
        expect,
    };
    tracing::info!(
        operator = %req_.operator,
        transactions = keys.len(),
        messages = seqs.len(),
        force,
        "console: replay confirmed"
    );
    match console.console.replay(&keys, &seqs, &req_).await {
        Ok(done) => html(StatusCode::OK, views::replayed(&who, &done)),
        Err(e) => failed(&who, "the replay", e),
    }
}

#[derive(Deserialize)]
pub struct DayQuery {
    day: Option<String>,
}

async fn wal_day(
    req: HttpRequest,
    q: web::Query<DayQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    let day = match q.day.as_deref().filter(|d| !d.is_empty()) {
        None => crate::clock::now().date_naive(),
        Some(d) => match NaiveDate::parse_from_str(d, "%Y-%m-%d") {
            Ok(d) => d,
            Err(_) => return bad_request(&who, "A day is YYYY-MM-DD."),
        },
    };
    let start = Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default());
    match console.console.wal_hours(start).await {
        Ok(hours) => html(StatusCode::OK, views::wal_day(&who, day, &hours)),
        Err(e) => failed(&who, "listing the WAL", e),
    }
}

#[derive(Deserialize)]
pub struct HourQuery {
    at: String,
}

async fn wal_hour(
    req: HttpRequest,
    q: web::Query<HourQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    let Some(hour) = parse_time(&q.at).map(crate::wal::truncate_to_hour) else {
        return bad_request(&who, "An hour is YYYY-MM-DDTHH:00 (UTC).");
    };
    match console.console.wal_hour(hour).await {
        Ok(segments) => html(StatusCode::OK, views::wal_hour(&who, hour, &segments)),
        Err(e) => failed(&who, "reading the WAL", e),
    }
}

#[derive(Deserialize)]
pub struct SegmentQuery {
    key: String,
}

async fn wal_segment(
    req: HttpRequest,
    q: web::Query<SegmentQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    match console.console.wal_segment(&q.key).await {
        Ok(segment) => html(StatusCode::OK, views::wal_segment(&who, &segment)),
        Err(crate::console::ConsoleError::Invalid(m)) => bad_request(&who, &m),
        Err(e) => failed(&who, "reading the WAL segment", e),
    }
}

#[derive(Deserialize)]
pub struct RefQuery {
    r#ref: String,
}

async fn wal_record(
    req: HttpRequest,
    q: web::Query<RefQuery>,
    state: web::Data<ApiState>,
    console: web::Data<ConsoleState>,
) -> HttpResponse {
    let Some(who) = who(&state, &req) else {
        return unauthenticated(&req);
    };
    let Ok(r) = q.r#ref.trim().parse::<WalRef>() else {
        return bad_request(
            &who,
            "A WAL ref is <segment key>#<offset>+<length>, as the timeline shows it.",
        );
    };
    let c = &console.console;
    match c.wal_record(&r).await {
        Ok(rec) => {
            let shown = c.redaction.shown(&rec.payload);
            html(StatusCode::OK, views::wal_record(&who, &r, &rec, &shown))
        }
        Err(crate::console::ConsoleError::Invalid(m)) => bad_request(&who, &m),
        Err(e) => failed(&who, "reading the WAL record", e),
    }
}
