//! An object store a test switches: down (every call fails as unavailable,
//! as Blob Storage does when it is unreachable), slow (the next listing
//! waits), failing the next few reads, or with one object that never reads
//! (Azurite after a restart: one blob answering 500 for good), around a
//! real store.

use async_trait::async_trait;
use bytes::Bytes;
use rtp_durability::journal::Journal;
use rtp_durability::wal::{
    GroupCommit, JOURNAL_PREFIX, Log,
    store::{ObjectInfo, ObjectStore, PutOptions, StoreError},
};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};
use std::time::Duration;

pub struct Switchable {
    inner: Arc<dyn ObjectStore>,
    down: AtomicBool,
    refusing: AtomicBool,
    next_list_delay: Mutex<Option<Duration>>,
    failing_gets: AtomicUsize,
    broken: Mutex<Vec<String>>,
}

impl Switchable {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Switchable> {
        Arc::new(Switchable {
            inner,
            down: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            next_list_delay: Mutex::new(None),
            failing_gets: AtomicUsize::new(0),
            broken: Mutex::new(Vec::new()),
        })
    }

    /// The next `n` reads (get or ranged get) fail as unavailable.
    pub fn fail_next_gets(&self, n: usize) {
        self.failing_gets.store(n, Ordering::SeqCst);
    }

    /// Every read of `key` fails as unavailable from now on; the rest of
    /// the store answers.
    pub fn break_object(&self, key: &str) {
        self.broken.lock().unwrap().push(key.to_owned());
    }

    fn check_get(&self, key: &str) -> Result<(), StoreError> {
        self.check()?;
        if self.broken.lock().unwrap().iter().any(|k| k == key) {
            return Err(StoreError::Unavailable(format!(
                "{key}: HTTP 500 (injected)"
            )));
        }
        let took = self
            .failing_gets
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if took.is_ok() {
            return Err(StoreError::Unavailable("injected read failure".into()));
        }
        Ok(())
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Every call fails at once with an error not worth retrying (as a
    /// revoked role assignment answers: 403), or answers again.
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// The next `list` answers only after `d`.
    pub fn delay_next_list(&self, d: Duration) {
        *self.next_list_delay.lock().unwrap() = Some(d);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        if self.refusing.load(Ordering::SeqCst) {
            return Err(StoreError::Fatal("HTTP 403 (injected)".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for Switchable {
    async fn put_new(&self, key: &str, body: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        self.check()?;
        self.inner.put_new(key, body, opts).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.check_get(key)?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.check_get(key)?;
        self.inner.get_range(key, offset, len).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let delay = self.next_list_delay.lock().unwrap().take();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
    fn describe(&self) -> String {
        format!("switchable {}", self.inner.describe())
    }
}

/// An outcome journal on `store`, appending as `instance` (segment keys are
/// per instance: two journals on one store need two names).
pub fn journal_on(store: Arc<dyn ObjectStore>, instance: &str) -> Journal {
    Journal::new(Log::start(
        store,
        JOURNAL_PREFIX,
        instance,
        GroupCommit::default(),
    ))
}
