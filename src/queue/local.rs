//! The embedded queue: Service Bus peek-lock semantics on SQLite.
//!
//! Visibility is one column: a message is receivable when `visible_at <= now`.
//! Scheduling sets it in the future; a lock sets it to `locked_until`, so an
//! expired lock makes the message visible again without a sweeper.

use super::{
    MAX_DELIVERY_COUNT_EXCEEDED, OutgoingMessage, Queue, QueueError, ReceivedMessage, Subqueue,
};
use crate::sqlite::{Db, DbError};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tokio::sync::Notify;
use uuid::Uuid;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS messages (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    subqueue       INTEGER NOT NULL DEFAULT 0,
    message_id     TEXT NOT NULL,
    body           BLOB NOT NULL,
    content_type   TEXT,
    properties     TEXT NOT NULL,
    enqueued_at    INTEGER NOT NULL,
    visible_at     INTEGER NOT NULL,
    lock_token     TEXT,
    locked_until   INTEGER,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    dl_reason      TEXT,
    dl_description TEXT
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages(subqueue, visible_at);
CREATE TABLE IF NOT EXISTS sent_ids (
    message_id TEXT PRIMARY KEY,
    sent_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_ids_age ON sent_ids(sent_at);
"#;

/// Settings of the embedded queue, mirroring a Service Bus queue's properties.
#[derive(Debug, Clone)]
pub struct LocalQueueOptions {
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub duplicate_detection_window: Duration,
}

impl Default for LocalQueueOptions {
    fn default() -> Self {
        LocalQueueOptions {
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 10,
            duplicate_detection_window: Duration::from_secs(600),
        }
    }
}

pub struct LocalQueue {
    db: Db,
    path: PathBuf,
    opts: LocalQueueOptions,
    notify: Arc<Notify>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn dur_us(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

fn db_err(e: DbError) -> QueueError {
    match e {
        DbError::Closed => QueueError::Unavailable(e.to_string()),
        DbError::Sqlite(e) => QueueError::Fatal(e.to_string()),
    }
}

impl LocalQueue {
    pub fn open(path: &Path, opts: LocalQueueOptions) -> Result<LocalQueue, QueueError> {
        let db = Db::open(path, SCHEMA).map_err(db_err)?;
        Ok(LocalQueue {
            db,
            path: path.to_owned(),
            opts,
            notify: Arc::new(Notify::new()),
        })
    }

    /// Deletes every message of a subqueue; returns how many. For tests and
    /// operators simulating a lost queue.
    pub async fn purge(&self, sub: Subqueue) -> Result<usize, QueueError> {
        let code = subqueue_code(sub);
        self.db
            .run(move |c| c.execute("DELETE FROM messages WHERE subqueue = ?1", params![code]))
            .await
            .map_err(db_err)
    }

    async fn receive_from(
        &self,
        sub: Subqueue,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so a send between the look and the wait is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lock_us = dur_us(self.opts.lock_duration);
            let max_delivery = self.opts.max_delivery_count;
            let (got, next_visible) = self
                .db
                .run(move |c| lock_batch(c, sub, max, lock_us, max_delivery))
                .await
                .map_err(db_err)?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(t) = next_visible {
                let in_us = (t - crate::clock::now().timestamp_micros()).max(0) as u64;
                until = until.min(now + Duration::from_micros(in_us));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Runs a settlement statement that applies only while the caller's lock
    /// holds; its parameters are `?1` seq, `?2` lock token, `?3` now, then `extra`.
    async fn settle(
        &self,
        m: &ReceivedMessage,
        sql: &'static str,
        extra: Vec<String>,
    ) -> Result<(), QueueError> {
        let (seq, token) = (m.sequence_number, m.lock_token.to_string());
        let changed = self
            .db
            .run(move |c| {
                let now = crate::clock::now().timestamp_micros();
                let mut p: Vec<&dyn rusqlite::ToSql> = vec![&seq, &token, &now];
                p.extend(extra.iter().map(|e| e as &dyn rusqlite::ToSql));
                c.prepare_cached(sql)?.execute(p.as_slice())
            })
            .await
            .map_err(db_err)?;
        if changed == 0 {
            return Err(QueueError::LockLost);
        }
        self.notify.notify_waiters();
        Ok(())
    }
}

fn subqueue_code(s: Subqueue) -> i64 {
    match s {
        Subqueue::Main => 0,
        Subqueue::DeadLetter => 1,
    }
}

const COLUMNS: &str = "seq, subqueue, message_id, body, content_type, properties, enqueued_at, \
                       lock_token, locked_until, delivery_count, dl_reason, dl_description";

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReceivedMessage> {
    let props: String = r.get(5)?;
    let token: Option<String> = r.get(7)?;
    Ok(ReceivedMessage {
        sequence_number: r.get(0)?,
        subqueue: if r.get::<_, i64>(1)? == 0 {
            Subqueue::Main
        } else {
            Subqueue::DeadLetter
        },
        message_id: r.get(2)?,
        body: Bytes::from(r.get::<_, Vec<u8>>(3)?),
        content_type: r.get(4)?,
        properties: serde_json::from_str(&props).unwrap_or_default(),
        enqueued_at: from_micros(r.get(6)?),
        lock_token: token
            .and_then(|t| Uuid::parse_str(&t).ok())
            .unwrap_or_default(),
        locked_until: from_micros(r.get::<_, Option<i64>>(8)?.unwrap_or_default()),
        delivery_count: r.get::<_, i64>(9)? as u32,
        dead_letter_reason: r.get(10)?,
        dead_letter_description: r.get(11)?,
    })
}

/// Locks up to `max` visible messages; also returns when the next one becomes visible.
fn lock_batch(
    c: &Connection,
    sub: Subqueue,
    max: usize,
    lock_us: i64,
    max_delivery: u32,
) -> rusqlite::Result<(Vec<ReceivedMessage>, Option<i64>)> {
    let now = crate::clock::now().timestamp_micros();
    let code = subqueue_code(sub);
    let mut out = Vec::new();
    loop {
        let candidates: Vec<(i64, i64)> = c
            .prepare_cached(
                "SELECT seq, delivery_count FROM messages WHERE subqueue = ?1 AND visible_at <= ?2 \
                 ORDER BY visible_at, seq LIMIT ?3",
            )?
            .query_map(params![code, now, (max - out.len()) as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        if candidates.is_empty() {
            break;
        }
        for (seq, count) in candidates {
            if sub == Subqueue::Main && count >= max_delivery as i64 {
                // Delivered the maximum number of times and the last lock ran out.
                c.prepare_cached(
                    "UPDATE messages SET subqueue = 1, lock_token = NULL, locked_until = NULL, visible_at = ?2, \
                     dl_reason = ?3, dl_description = ?4 WHERE seq = ?1",
                )?
                .execute(params![
                    seq,
                    now,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    format!("Message could not be consumed after {max_delivery} delivery attempts.")
                ])?;
                continue;
            }
            let token = Uuid::new_v4().to_string();
            let until = now + lock_us;
            c.prepare_cached(
                "UPDATE messages SET lock_token = ?2, locked_until = ?3, visible_at = ?3, \
                 delivery_count = delivery_count + 1 WHERE seq = ?1",
            )?
            .execute(params![seq, token, until])?;
            let m = c
                .prepare_cached(&format!("SELECT {COLUMNS} FROM messages WHERE seq = ?1"))?
                .query_row(params![seq], row_to_message)?;
            out.push(m);
        }
        if out.len() >= max {
            break;
        }
    }
    let next: Option<i64> = if out.is_empty() {
        c.prepare_cached("SELECT MIN(visible_at) FROM messages WHERE subqueue = ?1")?
            .query_row(params![code], |r| r.get(0))
            .optional()?
            .flatten()
    } else {
        None
    };
    Ok((out, next))
}

#[async_trait]
impl Queue for LocalQueue {
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let window = dur_us(self.opts.duplicate_detection_window);
        self.db
            .run(move |c| {
                let now = crate::clock::now().timestamp_micros();
                c.prepare_cached("DELETE FROM sent_ids WHERE sent_at < ?1")?
                    .execute(params![now - window])?;
                for m in messages {
                    let seen: Option<i64> = c
                        .prepare_cached("SELECT sent_at FROM sent_ids WHERE message_id = ?1")?
                        .query_row(params![m.message_id], |r| r.get(0))
                        .optional()?;
                    if seen.is_some() {
                        tracing::debug!(message_id = %m.message_id, "duplicate message id dropped");
                        continue;
                    }
                    c.prepare_cached("INSERT INTO sent_ids (message_id, sent_at) VALUES (?1, ?2)")?
                        .execute(params![m.message_id, now])?;
                    let visible = m.scheduled_enqueue_at.map(micros).unwrap_or(now).max(now);
                    let props = serde_json::to_string(&m.properties).unwrap_or_else(|_| "{}".into());
                    c.prepare_cached(
                        "INSERT INTO messages (message_id, body, content_type, properties, enqueued_at, visible_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![m.message_id, &m.body[..], m.content_type, props, now, visible])?;
                }
                Ok(())
            })
            .await
            .map_err(db_err)?;
        self.notify.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.receive_from(Subqueue::Main, max.max(1), wait).await
    }

    async fn receive_dead_letters(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.receive_from(Subqueue::DeadLetter, max.max(1), wait)
            .await
    }

    async fn peek_dead_letters(
        &self,
        from: i64,
        max: usize,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.db
            .run(move |c| {
                c.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM messages WHERE subqueue = 1 AND seq >= ?1 ORDER BY seq LIMIT ?2"
                ))?
                .query_map(params![from, max as i64], row_to_message)?
                .collect()
            })
            .await
            .map_err(db_err)
    }

    async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        self.settle(
            m,
            "DELETE FROM messages WHERE seq = ?1 AND lock_token = ?2 AND locked_until > ?3",
            vec![],
        )
        .await
    }

    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        // Visible again at once; the receive path dead-letters it if its deliveries are used up.
        self.settle(
            m,
            "UPDATE messages SET lock_token = NULL, locked_until = NULL, visible_at = ?3 \
             WHERE seq = ?1 AND lock_token = ?2 AND locked_until > ?3",
            vec![],
        )
        .await
    }

    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        self.settle(
            m,
            "UPDATE messages SET subqueue = 1, lock_token = NULL, locked_until = NULL, visible_at = ?3, \
             dl_reason = ?4, dl_description = ?5 WHERE seq = ?1 AND lock_token = ?2 AND locked_until > ?3",
            vec![reason.to_owned(), description.to_owned()],
        )
        .await
    }

    async fn renew_lock(&self, m: &ReceivedMessage) -> Result<DateTime<Utc>, QueueError> {
        let (seq, token) = (m.sequence_number, m.lock_token.to_string());
        let lock_us = dur_us(self.opts.lock_duration);
        let until = self
            .db
            .run(move |c| {
                let now = crate::clock::now().timestamp_micros();
                let until = now + lock_us;
                let n = c.execute(
                    "UPDATE messages SET locked_until = ?4, visible_at = ?4 \
                     WHERE seq = ?1 AND lock_token = ?2 AND locked_until > ?3",
                    params![seq, token, now, until],
                )?;
                Ok((n > 0).then_some(until))
            })
            .await
            .map_err(db_err)?;
        until.map(from_micros).ok_or(QueueError::LockLost)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.db
            .run(|c| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
            .map_err(db_err)
    }

    fn describe(&self) -> String {
        format!("embedded queue {}", self.path.display())
    }
}

/// Application properties as a map (helper for callers building messages).
pub fn props<const N: usize>(pairs: [(&str, String); N]) -> BTreeMap<String, String> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}
