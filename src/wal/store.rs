//! The object-store port under the WAL. Stores hold immutable objects: they
//! put, get and list, nothing else. Batching lives above them, once.

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub content_type: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} already exists")]
    AlreadyExists(String),
    #[error("object {0} not found")]
    NotFound(String),
    /// Worth retrying: timeouts, connection errors, 408/429/5xx.
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// Not worth retrying: auth, missing container, bad request.
    #[error("object store error: {0}")]
    Fatal(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Immutable objects. `put_new` never overwrites: it fails with
/// `AlreadyExists` if the key exists (conditional create). When `put_new`
/// returns `Ok` the object is durable (blob PUT acknowledged; file and its
/// directory fsynced).
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    async fn put_new(&self, key: &str, body: Bytes, opts: &PutOptions) -> Result<(), StoreError>;
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// Bytes `[offset, offset+len)` of the object.
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError>;
    /// All objects whose key starts with `prefix`, in lexicographic key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// For logs and errors; never contains a secret.
    fn describe(&self) -> String;
}
