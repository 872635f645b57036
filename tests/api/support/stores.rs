//! An object store a test switches: down (every call fails as unavailable,
//! as Blob Storage does when it is unreachable) or slow (the next listing
//! waits), around a real store.

use async_trait::async_trait;
use bytes::Bytes;
use rtp_durability::journal::Journal;
use rtp_durability::wal::{
    GroupCommit, JOURNAL_PREFIX, Log,
    store::{ObjectInfo, ObjectStore, PutOptions, StoreError},
};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

pub struct Switchable {
    inner: Arc<dyn ObjectStore>,
    down: AtomicBool,
    next_list_delay: Mutex<Option<Duration>>,
}

impl Switchable {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Switchable> {
        Arc::new(Switchable {
            inner,
            down: AtomicBool::new(false),
            next_list_delay: Mutex::new(None),
        })
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The next `list` answers only after `d`.
    pub fn delay_next_list(&self, d: Duration) {
        *self.next_list_delay.lock().unwrap() = Some(d);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
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
        self.check()?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.check()?;
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
