//! The console's pages and fragments (maud: checked at compile time, every
//! value escaped). Each page is a plain HTML document that works without
//! script; `console.js` only refreshes the parts marked `data-live`.

use super::{Health, Who};
use crate::console::{
    DeadLetter, DeadLetterGroup, Done, Event, Found, ItemDone, Overview, Plan, Rates, Timeline,
    WalHour, WalSegment, WalSegmentInfo, redact::Shown,
};
use crate::journal::EntryKind;
use crate::transaction::{State, TxRecord, WalRef};
use crate::wal::WalRecord;
use chrono::{DateTime, NaiveDate, Utc};
use maud::{DOCTYPE, Markup, html};

/// A value for a query string.
fn q(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn timeline_href(key: &str) -> String {
    format!("/console/tx?key={}", q(key))
}

fn record_href(r: &WalRef) -> String {
    format!("/console/wal/record?ref={}", q(&r.to_string()))
}

fn when(t: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)) {
            (t.format("%Y-%m-%d %H:%M:%S%.3f UTC"))
        }
    }
}

fn age(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        3600..86400 => format!("{} h {} min", secs / 3600, (secs % 3600) / 60),
        _ => format!("{} d {} h", secs / 86400, (secs % 86400) / 3600),
    }
}

fn state_badge(s: State) -> Markup {
    html! { span class={ "state state-" (s.as_str()) } { (s.as_str()) } }
}

fn layout(title: &str, who: Option<&Who>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " — rtpd console" }
                link rel="icon" href="/console/assets/favicon.svg" type="image/svg+xml";
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/console" { "rtpd console" }
                    @if let Some(w) = who {
                        nav aria-label="Console" {
                            ul {
                                li { a href="/console" { "Overview" } }
                                li { a href="/console/find" { "Find a payment" } }
                                li { a href="/console/dlq" { "Dead letters" } }
                                li { a href="/console/wal" { "WAL" } }
                            }
                        }
                        div.who {
                            "Signed in as " strong { (w.operator()) }
                            @if let Some(csrf) = w.csrf() {
                                form.inline method="post" action="/console/logout" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button.link type="submit" { "Log out" }
                                }
                            }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

pub fn login(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            @if let Some(e) = error {
                p.error role="alert" { (e) }
            }
            form.card.login method="post" action="/console/login" {
                label for="token" { "Admin token" }
                input id="token" name="token" type="password" autocomplete="off" required autofocus;
                p.hint {
                    "One of RTPD_ADMIN_TOKENS (rtpd dev prints its own). The token stays on the server; "
                    "the browser keeps only a session cookie, for 8 hours."
                }
                button type="submit" { "Log in" }
            }
        },
    )
}

pub fn session_ended() -> Markup {
    html! {
        p.error role="alert" {
            "Your console session ended. " a href="/console/login" { "Log in again" } "."
        }
    }
}

pub fn gone() -> Markup {
    html! { p.error { "Not available right now." } }
}

pub fn not_found(who: &Who) -> Markup {
    layout(
        "Not found",
        Some(who),
        html! { p { "Nothing here. " a href="/console" { "Back to the overview" } "." } },
    )
}

pub fn forbidden(message: &str) -> Markup {
    layout(
        "Refused",
        None,
        html! {
            p.error role="alert" { (message) }
            p { a href="/console" { "Back to the console" } }
        },
    )
}

pub fn bad_request(who: &Who, message: &str) -> Markup {
    layout(
        "Cannot do that",
        Some(who),
        html! { p.error role="alert" { (message) } },
    )
}

pub fn failed(who: &Who, what: &str, error: &str) -> Markup {
    layout(
        "Not available",
        Some(who),
        html! {
            p.error role="alert" { (what) " failed: " (error) }
            p { "Try again in a moment; the overview shows which dependency does not answer." }
        },
    )
}

pub fn overview(who: &Who, o: &Overview, health: &[Health]) -> Markup {
    layout(
        "Overview",
        Some(who),
        html! {
            section #overview aria-live="polite" data-live="/console/overview.frag" data-every="3000" {
                (overview_numbers(o, health))
            }
        },
    )
}

fn rates(r: &Option<Rates>) -> Markup {
    html! {
        @match r {
            Some(r) => {
                div.card {
                    span.label { "Received" }
                    span.value { (format!("{:.1}", Rates::per_minute(r.received, r.window))) " /min" }
                    span.hint { (r.received) " over the last " (age(r.window.num_seconds())) }
                }
                div.card {
                    span.label { "Finished" }
                    span.value { (format!("{:.1}", Rates::per_minute(r.finished, r.window))) " /min" }
                    span.hint { (r.finished) " to success or dead letter over the last " (age(r.window.num_seconds())) }
                }
            }
            None => {
                div.card.wide {
                    span.label { "Rates" }
                    span.hint { "Shown a minute after this process's first overview read of the last hour: the rates compare the ledger's counts then and now." }
                }
            }
        }
    }
}

pub fn overview_numbers(o: &Overview, health: &[Health]) -> Markup {
    html! {
        p.asof { "As of " (when(o.at)) }
        h2 { "Transactions by state" }
        @match &o.counts {
            Ok(c) => {
                div.cards {
                    @for (s, n) in c.by_state() {
                        div class={ "card count-" (s.as_str()) } {
                            span.label { (s.as_str()) }
                            span.value data-state=(s.as_str()) { (n) }
                        }
                    }
                    div.card {
                        span.label { "total" }
                        span.value { (c.total()) }
                    }
                }
            }
            Err(e) => p.error { "The ledger's counts could not be read: " (e) }
        }
        h2 { "Flow" }
        div.cards {
            (rates(&o.rates))
            div.card {
                span.label { "Oldest pending" }
                @match &o.oldest_pending {
                    Ok(Some(t)) => {
                        span.value { (age((o.at - *t).num_seconds())) }
                        span.hint { "waiting since " (when(*t)) }
                    }
                    Ok(None) => span.value { "none" },
                    Err(e) => span.hint.error { (e) },
                }
            }
            div.card {
                span.label { a href="/console/dlq" { "Dead-letter queue" } }
                @match &o.dead_letter_messages {
                    Ok((n, more)) => span.value #dlq-count { (n) @if *more { "+" } " messages" },
                    Err(e) => span.hint.error { (e) },
                }
            }
        }
        h2 { "Reconciler" }
        @match &o.last_pass {
            None => p.hint { "No pass in this process yet. The reconciler runs beside the processor (rtpd serve, processor, dev); a process with only the API shows none." }
            Some(p) => {
                @match &p.result {
                    Ok(r) => {
                        div.cards {
                            div.card { span.label { "Drift" } span.value { (r.drift()) } span.hint { "ledger entries missing or wrong, repaired" } }
                            div.card { span.label { "Re-driven" } span.value { (r.redriven()) } span.hint { "overdue transactions re-enqueued" } }
                            div.card { span.label { "Records read" } span.value { (r.records) } span.hint { (r.segments) " segments" @if r.unreadable > 0 { ", " (r.unreadable) " unreadable" } } }
                        }
                        p.hint { "Last pass " (when(p.at)) ", from " (when(p.from)) @if !r.complete { " — stopped short of its window" } "." }
                    }
                    Err(e) => p.error { "The last pass (" (when(p.at)) ") failed: " (e) }
                }
            }
        }
        h2 { "Dependencies" }
        table.health {
            thead { tr { th scope="col" { "dependency" } th scope="col" { "status" } } }
            tbody {
                @for h in health {
                    tr {
                        th scope="row" { (h.name) }
                        td class=(if h.ok { "ok" } else { "bad" }) { (h.detail) }
                    }
                }
            }
        }
    }
}

/// The find page's form values, shown back.
pub struct FindForm {
    pub id: String,
    pub vendor: String,
    pub from: String,
    pub to: String,
}

pub enum FindResults {
    None,
    ById(Vec<TxRecord>),
    Received { found: Vec<Found>, cut: bool },
}

pub fn find(who: &Who, f: &FindForm, results: &FindResults) -> Markup {
    layout(
        "Find a payment",
        Some(who),
        html! {
            div.forms {
                form.card method="get" action="/console/find" {
                    h2 { "By transaction id" }
                    label for="find-id" { "Transaction id (exact)" }
                    input id="find-id" name="id" value=(f.id) required autocomplete="off";
                    label for="find-id-vendor" { "Vendor (if two vendors used the id)" }
                    input id="find-id-vendor" name="vendor" value=(f.vendor) autocomplete="off";
                    button type="submit" { "Find" }
                }
                form.card method="get" action="/console/find" {
                    h2 { "By vendor and time received" }
                    label for="find-vendor" { "Vendor" }
                    input id="find-vendor" name="vendor" value=(f.vendor) autocomplete="off";
                    label for="find-from" { "From (UTC)" }
                    input id="find-from" name="from" type="datetime-local" step="1" value=(f.from) required;
                    label for="find-to" { "To (UTC, at most 24 h later)" }
                    input id="find-to" name="to" type="datetime-local" step="1" value=(f.to) required;
                    button type="submit" { "Search the WAL" }
                }
            }
            @match results {
                FindResults::None => {}
                FindResults::ById(found) => {
                    h2 { "Results" }
                    @if found.is_empty() {
                        p #no-results { "No transaction with that id." }
                    } @else {
                        table.results {
                            thead { tr { th scope="col" { "transaction" } th scope="col" { "vendor" } th scope="col" { "state" } th scope="col" { "received" } th scope="col" { "attempts" } } }
                            tbody {
                                @for r in found {
                                    tr {
                                        td { a href=(timeline_href(r.transaction_id.as_str())) { (r.transaction_id.vendor_id()) } }
                                        td { (r.vendor.as_deref().unwrap_or("—")) }
                                        td { (state_badge(r.status)) }
                                        td { (when(r.created_at)) }
                                        td { (r.attempts) }
                                    }
                                }
                            }
                        }
                    }
                }
                FindResults::Received { found, cut } => {
                    h2 { "Results" }
                    @if *cut {
                        p.warning { "The search stopped early (" (crate::console::FIND_MAX_SHOWN) " payments shown at most): narrow the range." }
                    }
                    @if found.is_empty() {
                        p #no-results { "Nothing received in that range." }
                    } @else {
                        table.results {
                            thead { tr { th scope="col" { "transaction" } th scope="col" { "received" } th scope="col" { "state" } th scope="col" { "WAL ref" } } }
                            tbody {
                                @for r in found {
                                    tr {
                                        td { a href=(timeline_href(&r.key)) { (r.key) } }
                                        td { (when(r.received_at)) }
                                        td { @match r.state { Some(s) => (state_badge(s)), None => span.hint { "not in the ledger (another record of the id, or a refused one)" } } }
                                        td { a.ref href=(record_href(&r.wal_ref)) { (r.wal_ref) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn live_state(r: &TxRecord) -> Markup {
    html! {
        dl.facts {
            dt { "State" } dd #tx-status data-state=(r.status.as_str()) { (state_badge(r.status)) }
            dt { "Attempts" } dd { (r.attempts) }
            dt { "Retries in this budget" } dd { (r.retry_count) }
            @if let Some(e) = r.error_message.as_ref().filter(|_| r.status != State::Success) {
                dt { "Last error" } dd.error-text { (e) }
            }
            @if let Some(t) = r.next_retry_at { dt { "Next attempt due" } dd { (when(t)) } }
            @if let Some(o) = &r.lease_owner { dt { "Claimed by" } dd { (o) @if let Some(u) = r.lease_until { " until " (when(u)) } } }
            dt { "Updated" } dd { (when(r.updated_at)) }
        }
    }
}

fn replay_form(who: &Who, r: &TxRecord) -> Markup {
    let success = r.status == State::Success;
    html! {
        form method="post" action="/console/replay/preview" {
            @if let Some(csrf) = who.csrf() { input type="hidden" name="csrf" value=(csrf); }
            input type="hidden" name="target" value="tx";
            input type="hidden" name="key" value=(r.transaction_id.as_str());
            input type="hidden" name="seen" value=(r.status.as_str());
            @if success {
                p.warning { "This payment succeeded. A forced replay calls the downstream again." }
                input type="hidden" name="force" value="on";
                button type="submit" { "Forced replay: dry run…" }
            } @else {
                p.hint { "Replays from the WAL: back to pending with a fresh retry budget. A dry run comes first." }
                button type="submit" { "Replay: dry run…" }
            }
        }
    }
}

pub fn timeline(who: &Who, t: &Timeline) -> Markup {
    let r = &t.record;
    let key = r.transaction_id.as_str();
    let live = format!("/console/tx/live?key={}", q(key));
    let events_src = format!("/console/tx/events?key={}", q(key));
    layout(
        &format!("Payment {}", r.transaction_id.vendor_id()),
        Some(who),
        html! {
            p.hint { "Vendor " strong { (r.vendor.as_deref().unwrap_or("—")) } ", ledger key " code { (key) } }
            div.split {
                section.card aria-labelledby="now" {
                    h2 #now { "Now" }
                    div #tx-state aria-live="polite" data-live=(live) data-every="2000" {
                        (live_state(r))
                    }
                }
                section.card aria-labelledby="replay" {
                    h2 #replay { "Replay" }
                    (replay_form(who, r))
                }
            }
            section aria-labelledby="history" {
                h2 #history { "Timeline" }
                div #tx-events data-src=(events_src) data-refresh-on="tx-state" {
                    (events(t))
                }
            }
            section aria-labelledby="payload" {
                h2 #payload { "Payload" }
                @match (&t.wal, &t.payload) {
                    (Ok(w), Some(shown)) => (payload(w, shown)),
                    (Err(e), _) => p.error { "The WAL record could not be read: " (e) },
                    _ => {}
                }
            }
        },
    )
}

fn payload(w: &WalRecord, shown: &Shown) -> Markup {
    html! {
        @match shown {
            Shown::Exact(text) => {
                p.hint { "Exactly as stored in the WAL (its sha256 " code { (w.sha256.as_str()) } " checks out)." }
                pre #payload-text { code { (text) } }
            }
            Shown::Redacted { text, fields } => {
                p.hint {
                    (fields) " field" @if *fields != 1 { "s" } " redacted (RTPD_CONSOLE_REDACT). Shown re-serialized, so key order and spacing "
                    "differ from the stored bytes, whose sha256 " code { (w.sha256.as_str()) } " checks out."
                }
                pre #payload-text { code { (text) } }
            }
            Shown::Withheld => p.hint { "Not JSON, so it cannot be redacted: not shown (rtpd wal cat prints it)." },
        }
    }
}

fn event(e: &Event) -> Markup {
    html! {
        @match e {
            Event::Received { at, vendor, remote_addr, wal_ref, sha256 } => {
                li.ev.received {
                    (when(*at))
                    h3 { "Received, durable in the WAL" }
                    dl.facts {
                        @if let Some(v) = vendor { dt { "Vendor" } dd { (v) } }
                        @if let Some(a) = remote_addr { dt { "From" } dd { (a) } }
                        dt { "WAL ref" } dd { a.ref href=(record_href(wal_ref)) { (wal_ref) } }
                        dt { "sha256" } dd { code { (sha256.as_str()) } }
                    }
                }
            }
            Event::Journaled(j) => {
                @match j.kind {
                    EntryKind::Attempt => {
                        li class={ "ev attempt state-" (j.state.as_str()) } {
                            (when(j.at))
                            h3 {
                                "Attempt " (j.attempt.map(|a| a.to_string()).unwrap_or_else(|| "?".into())) ": "
                                (match j.state {
                                    State::Success => "success",
                                    State::Failed => "failed, retry scheduled",
                                    State::DeadLetter => "dead-lettered",
                                    other => other.as_str(),
                                })
                            }
                            dl.facts {
                                @if let Some(e) = &j.error { dt { "Error" } dd.error-text { (e) } }
                                @if let Some(ms) = j.latency_ms { dt { "Call took" } dd { (ms) " ms" } }
                                @if let Some(t) = j.next_retry_at { dt { "Retry at" } dd { (when(t)) } }
                                dt { "By" } dd { (j.actor) }
                            }
                        }
                    }
                    EntryKind::Replay => {
                        li.ev.replay {
                            (when(j.at))
                            h3 { @if j.state == State::Pending { "Replayed by " (j.actor) } @else { "Replay withdrawn (" (j.state.as_str()) ")" } }
                            @if let Some(r) = &j.reason { p.reason { (r) } }
                        }
                    }
                    EntryKind::Purge => {
                        li.ev.purge {
                            (when(j.at))
                            h3 { "Dead-lettered message purged by " (j.actor) }
                            @if let Some(r) = &j.reason { p.reason { (r) } }
                        }
                    }
                    EntryKind::Refused => {
                        li.ev.refused {
                            (when(j.at))
                            h3 { "Other content under this id refused (409)" }
                            @if let Some(s) = &j.sha256 { p { "sha256 " code { (s.as_str()) } } }
                        }
                    }
                    EntryKind::Rejected => {}
                }
            }
        }
    }
}

pub fn events(t: &Timeline) -> Markup {
    html! {
        ol.timeline {
            @for e in &t.events { (event(e)) }
            li class={ "ev final state-" (t.record.status.as_str()) } {
                (when(t.record.updated_at))
                h3 { "Now " (state_badge(t.record.status)) }
            }
        }
        @if let Some(e) = &t.journal_error {
            p.warning { "The outcome journal could not be read whole: " (e) }
        }
        @if t.journal_read.len() > 1 {
            p.hint {
                "The outcome journal was read "
                @for (i, (from, to)) in t.journal_read.iter().enumerate() {
                    @if i > 0 { " and " }
                    "from " (when(*from)) " to " (when(*to))
                }
                " (after receipt and before the last change): entries between, if any, are not shown."
            }
        }
        @if !t.dead_letters.is_empty() {
            h3 { "In the dead-letter queue" }
            ul.deadletters {
                @for d in &t.dead_letters {
                    li {
                        strong.dl-reason { (d.reason) }
                        @if let Some(desc) = &d.description { ": " span.error-text { (desc) } }
                        " — message " (d.sequence_number) ", dead-lettered " (when(d.enqueued_at))
                    }
                }
            }
        }
    }
}

fn dead_letter_row(who: &Who, d: &DeadLetter) -> Markup {
    html! {
        tr {
            td { (d.sequence_number) }
            td { @match &d.key { Some(k) => a href=(timeline_href(k)) { (k) }, None => span.hint { "none" } } }
            td { (when(d.enqueued_at)) }
            td { (d.delivery_count) }
            td.error-text { (d.description.as_deref().unwrap_or("—")) }
            td {
                @if d.key.is_some() {
                    form.inline method="post" action="/console/replay/preview" {
                        @if let Some(csrf) = who.csrf() { input type="hidden" name="csrf" value=(csrf); }
                        input type="hidden" name="target" value="dlq-one";
                        input type="hidden" name="seq" value=(d.sequence_number);
                        button type="submit" aria-label={ "Replay message " (d.sequence_number) } { "Replay…" }
                    }
                }
            }
        }
    }
}

/// A time as a `datetime-local` field holds it (read back as UTC).
fn local(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

pub fn dead_letters(who: &Who, groups: &[DeadLetterGroup], more: bool) -> Markup {
    let total: usize = groups.iter().map(|g| g.messages.len()).sum();
    let now = crate::clock::now();
    layout(
        "Dead letters",
        Some(who),
        html! {
            p { (total) " dead-lettered messages" @if more { " shown (the queue holds more; the first " (crate::console::DEAD_LETTERS_READ) " are read)" } ", grouped by reason." }
            form.card.range method="post" action="/console/replay/preview" {
                h2 { "Replay a time range" }
                @if let Some(csrf) = who.csrf() { input type="hidden" name="csrf" value=(csrf); }
                input type="hidden" name="target" value="dlq-range";
                label for="dl-from" { "Dead-lettered from (UTC)" }
                input id="dl-from" name="from" type="datetime-local" step="1" required value=(local(now - chrono::Duration::hours(1)));
                label for="dl-to" { "to (UTC)" }
                input id="dl-to" name="to" type="datetime-local" step="1" required value=(local(now));
                button type="submit" { "Dry run…" }
            }
            @for g in groups {
                section.group aria-label={ "Reason " (g.reason) } {
                    div.group-head {
                        h2 { span.dl-reason { (g.reason) } " " span.count { (g.messages.len()) } }
                        form.inline method="post" action="/console/replay/preview" {
                            @if let Some(csrf) = who.csrf() { input type="hidden" name="csrf" value=(csrf); }
                            input type="hidden" name="target" value="dlq-group";
                            input type="hidden" name="group" value=(g.reason);
                            button type="submit" { "Replay this group…" }
                        }
                    }
                    div.scroll {
                        table.results {
                            thead { tr { th scope="col" { "seq" } th scope="col" { "transaction" } th scope="col" { "dead-lettered" } th scope="col" { "deliveries" } th scope="col" { "description" } th scope="col" { span.visually-hidden { "action" } } } }
                            tbody { @for d in &g.messages { (dead_letter_row(who, d)) } }
                        }
                    }
                }
            }
        },
    )
}

pub fn replay_preview(who: &Who, target: &str, what: &str, plan: &Plan) -> Markup {
    let n = plan.would_replay();
    let keys: Vec<&str> = plan
        .items
        .iter()
        .filter(|i| i.would_replay)
        .map(|i| i.key.as_str())
        .collect();
    let seqs: Vec<String> = plan.sequence_numbers.iter().map(i64::to_string).collect();
    layout(
        "Replay: dry run",
        Some(who),
        html! {
            p.hint #selection { (what) }
            p.summary #dry-run-count data-count=(n) {
                strong { (n) } " of " (plan.items.len()) " transaction" @if plan.items.len() != 1 { "s" } " would be replayed now."
            }
            @if plan.force {
                p.warning role="alert" { "Forced replay of a payment that succeeded: the downstream will be called again for it." }
            }
            @if plan.truncated {
                p.warning { "More than " (crate::console::MAX_BULK) " were picked; this replay takes the first " (crate::console::MAX_BULK) "." }
            }
            @if !plan.without_transaction.is_empty() {
                p.warning { (plan.without_transaction.len()) " picked message(s) name no transaction: remove them with rtpd dlq purge <SEQ> --yes." }
            }
            div.scroll {
                table.results {
                    thead { tr { th scope="col" { "transaction" } th scope="col" { "now" } th scope="col" { "would" } } }
                    tbody {
                        @for i in &plan.items {
                            tr {
                                td { a href=(timeline_href(&i.key)) { (i.key) } }
                                td { @match i.now { Some(s) => (state_badge(s)), None => "not in the ledger" } }
                                td { @if i.would_replay { "replay" } @else { strong { "refuse" } } }
                            }
                        }
                    }
                }
            }
            @if n > 0 {
                form.card.confirm method="post" action="/console/replay" {
                    h2 { "Confirm" }
                    @if let Some(csrf) = who.csrf() { input type="hidden" name="csrf" value=(csrf); }
                    input type="hidden" name="target" value=(target);
                    input type="hidden" name="keys" value=(keys.join(" "));
                    input type="hidden" name="seqs" value=(seqs.join(" "));
                    @if let Some(s) = plan.expect { input type="hidden" name="seen" value=(s.as_str()); }
                    @if plan.force { input type="hidden" name="force" value="on"; }
                    label for="why" { "Reason (journaled with your name)" }
                    textarea id="why" name="why" required rows="2" {}
                    @if plan.force {
                        div.check {
                            input id="understood" name="understood" type="checkbox" required;
                            label for="understood" { "I understand the downstream will be called again for a payment that succeeded." }
                        }
                    }
                    button.danger type="submit" { "Replay " (n) " transaction" @if n != 1 { "s" } }
                }
            } @else {
                p { "Nothing to replay." }
            }
        },
    )
}

pub fn replayed(who: &Who, done: &Done) -> Markup {
    let replayed = done
        .items
        .iter()
        .filter(|(_, d)| matches!(d, ItemDone::Replayed { .. }))
        .count();
    layout(
        "Replayed",
        Some(who),
        html! {
            p.summary #replayed-count data-count=(replayed) { strong { (replayed) } " of " (done.items.len()) " replayed, journaled as console:" (who.operator()) "." }
            @if done.to_remove > 0 || done.removed > 0 {
                p { (done.removed) " of " (done.to_remove) " dead-lettered messages removed." }
                @if done.removed < done.to_remove {
                    p.warning { "Some were held by another command or not received in time: the dead-letter view still shows them." }
                }
            }
            div.scroll {
                table.results {
                    thead { tr { th scope="col" { "transaction" } th scope="col" { "outcome" } th scope="col" { "now (live)" } } }
                    tbody {
                        @for (i, (key, d)) in done.items.iter().enumerate() {
                            tr {
                                td { a href=(timeline_href(key)) { (key) } }
                                td {
                                    @match d {
                                        ItemDone::Replayed { message_id, due_at } => {
                                            "replayed as message " code { (message_id) }
                                            @if let Some(t) = due_at { ", due " (when(*t)) " (its last call may still be running downstream until then)" }
                                        }
                                        ItemDone::Refused(s) => { "refused (" (s.as_str()) " now)" }
                                        ItemDone::JournaledSuccess => { "refused: its success is journaled, the ledger catches up" }
                                        ItemDone::NotFound => { "not in the ledger" }
                                    }
                                }
                                td {
                                    @if i < 20 && matches!(d, ItemDone::Replayed { .. }) {
                                        div.live aria-live="polite" data-live=(format!("/console/tx/live?key={}", q(key))) data-every="2000" { "…" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn wal_day(who: &Who, day: NaiveDate, hours: &[WalHour]) -> Markup {
    layout(
        "WAL",
        Some(who),
        html! {
            div.forms {
                form.card method="get" action="/console/wal" {
                    label for="wal-day" { "Day (UTC)" }
                    input id="wal-day" name="day" type="date" value=(day.format("%Y-%m-%d"));
                    button type="submit" { "Show" }
                }
                form.card method="get" action="/console/wal/record" {
                    label for="wal-ref" { "Open a record by WAL ref" }
                    input id="wal-ref" name="ref" required autocomplete="off" placeholder="wal/v1/…#offset+length";
                    button type="submit" { "Open" }
                }
            }
            table.results {
                thead { tr { th scope="col" { "hour (UTC)" } th scope="col" { "segments" } th scope="col" { "records" } th scope="col" { "bytes" } } }
                tbody {
                    @for h in hours {
                        tr {
                            td {
                                @if h.segments > 0 {
                                    a href=(format!("/console/wal/hour?at={}", q(&h.hour.format("%Y-%m-%dT%H:00").to_string()))) { (h.hour.format("%Y-%m-%d %H:00")) }
                                } @else { (h.hour.format("%Y-%m-%d %H:00")) }
                            }
                            td { (h.segments) }
                            td { (h.records) @if h.uncounted > 0 { " + " (h.uncounted) " segments uncounted" } }
                            td { (h.bytes) }
                        }
                    }
                }
            }
        },
    )
}

fn segment_href(key: &str) -> String {
    format!("/console/wal/segment?key={}", q(key))
}

pub fn wal_hour(who: &Who, hour: DateTime<Utc>, segments: &[WalSegmentInfo]) -> Markup {
    let records: usize = segments.iter().filter_map(|s| s.records).sum();
    layout(
        &format!("WAL {}", hour.format("%Y-%m-%d %H:00 UTC")),
        Some(who),
        html! {
            p { (segments.len()) " segments, " (records) " records." }
            table.results {
                thead { tr { th scope="col" { "segment" } th scope="col" { "records" } th scope="col" { "bytes" } } }
                tbody {
                    @for s in segments {
                        tr {
                            td { a.ref href=(segment_href(&s.key)) { (s.key) } }
                            td { @match s.records { Some(n) => (n), None => "—" } }
                            td { (s.bytes) }
                        }
                    }
                }
            }
        },
    )
}

pub fn wal_segment(who: &Who, s: &WalSegment) -> Markup {
    layout(
        "WAL segment",
        Some(who),
        html! {
            p { code { (s.key) } " — " (s.records.len()) " records." }
            ul.records {
                @for (r, key) in &s.records {
                    li {
                        a.ref href=(record_href(r)) { (r) }
                        @match key {
                            Some(k) => { " " a href=(timeline_href(k)) { (k) } }
                            None => { " " span.error-text { "unreadable" } }
                        }
                    }
                }
            }
        },
    )
}

pub fn wal_record(who: &Who, r: &WalRef, rec: &WalRecord, shown: &Shown) -> Markup {
    let key = rec.key().ok().map(|k| k.to_string());
    layout(
        "WAL record",
        Some(who),
        html! {
            dl.facts {
                dt { "WAL ref" } dd { code { (r) } }
                dt { "Transaction" } dd {
                    @match &key { Some(k) => a href=(timeline_href(k)) { (k) }, None => (rec.transaction_id) }
                }
                dt { "Received" } dd { (when(rec.received_at)) }
                @if let Some(v) = &rec.source.vendor { dt { "Vendor" } dd { (v) } }
                @if let Some(a) = &rec.source.remote_addr { dt { "From" } dd { (a) } }
                @if let Some(k) = &rec.source.kafka { dt { "Kafka" } dd { (k.topic) " / " (k.partition) " @ " (k.offset) } }
                dt { "sha256" } dd { code { (rec.sha256.as_str()) } }
            }
            h2 { "Payload" }
            (payload(rec, shown))
        },
    )
}
