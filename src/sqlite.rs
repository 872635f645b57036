//! A SQLite database owned by one thread that batches work: every job that
//! arrives while a commit is in flight joins the next transaction, so many
//! callers share one fsync. Each job runs inside its own savepoint, so a
//! failing job rolls back alone. Callers hear back only after the commit.
//!
//! The embedded queue and ledger sit on this.

use rusqlite::Connection;
use std::{path::Path, sync::mpsc as std_mpsc, thread};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database thread has stopped")]
    Closed,
}

type Reply = Box<dyn FnOnce(Option<&str>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Reply + Send>;

/// Handle to the database thread; cheap to clone.
#[derive(Clone)]
pub struct Db {
    tx: std_mpsc::Sender<Job>,
    /// Read-only connections: reads see the last commit and never wait for a batch.
    readers: std::sync::Arc<std::sync::Mutex<Vec<Connection>>>,
    path: std::path::PathBuf,
}

const MAX_BATCH: usize = 1024;

impl Db {
    /// Opens (creating if needed) the database and runs `schema` once.
    pub fn open(path: &Path, schema: &str) -> Result<Db, DbError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                DbError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
            })?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk before any caller hears back.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Other processes (rtpd replay next to rtpd dev) wait instead of failing.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(schema)?;
        let (tx, rx) = std_mpsc::channel::<Job>();
        thread::Builder::new()
            .name(format!(
                "sqlite-{}",
                path.file_stem().and_then(|s| s.to_str()).unwrap_or("db")
            ))
            .spawn(move || run(conn, rx))
            .map_err(|e| DbError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Db {
            tx,
            readers: Default::default(),
            path: path.to_owned(),
        })
    }

    /// Runs a read on a pooled read-only connection, outside the write batches.
    /// Reads are point lookups and short pages (microseconds), so they run on
    /// the calling task: a hop to a blocking thread would cost more than the read.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let pooled = self.readers.lock().map(|mut p| p.pop()).unwrap_or(None);
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(10))?;
                c
            }
        };
        let result = f(&conn);
        if let Ok(mut p) = self.readers.lock()
            && p.len() < 16
        {
            p.push(conn);
        }
        result.map_err(DbError::Sqlite)
    }

    /// Runs `f` in the next batch transaction and returns its result once committed.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<T, DbError>>();
        let job: Job = Box::new(move |conn: &Connection| {
            let result = in_savepoint(conn, f);
            Box::new(move |commit_error: Option<&str>| {
                let result = match (result, commit_error) {
                    (Ok(v), None) => Ok(v),
                    (Ok(_), Some(e)) => Err(DbError::Sqlite(
                        rusqlite::Error::InvalidParameterName(format!("commit failed: {e}")),
                    )),
                    (Err(e), _) => Err(DbError::Sqlite(e)),
                };
                let _ = reply_tx.send(result);
            })
        });
        self.tx.send(job).map_err(|_| DbError::Closed)?;
        reply_rx.await.map_err(|_| DbError::Closed)?
    }
}

fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
) -> Result<T, rusqlite::Error> {
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
            Err(e)
        }
    }
}

fn run(conn: Connection, rx: std_mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let begin = conn.execute_batch("BEGIN IMMEDIATE");
        let mut replies = Vec::with_capacity(jobs.len());
        if let Err(e) = begin {
            let msg = e.to_string();
            for j in jobs {
                // Run nothing: report the failure to every caller.
                drop(j);
                tracing::error!(error = %msg, "sqlite BEGIN failed");
            }
            continue;
        }
        for j in jobs {
            replies.push(j(&conn));
        }
        let commit = conn.execute_batch("COMMIT");
        let err = commit.as_ref().err().map(|e| e.to_string());
        if err.is_some() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for r in replies {
            r(err.as_deref());
        }
    }
}
