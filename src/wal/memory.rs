//! The in-memory object store under the WAL and the journal: immutable
//! objects in a map, `put_new` refusing an existing key like a conditional
//! blob PUT. Used by the deterministic simulation (`tests/sim`) and the store
//! contract test. Nothing in it is durable beyond the process.

use super::store::{ObjectInfo, ObjectStore, PutOptions, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::{collections::BTreeMap, sync::Mutex};

/// Body and metadata by key.
type Objects = BTreeMap<String, (Bytes, BTreeMap<String, String>)>;

#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<Objects>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Objects) -> T) -> T {
        f(&mut self.objects.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put_new(&self, key: &str, body: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        self.with(|o| {
            if o.contains_key(key) {
                return Err(StoreError::AlreadyExists(key.to_owned()));
            }
            o.insert(key.to_owned(), (body, opts.metadata.clone()));
            Ok(())
        })
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.with(|o| o.get(key).map(|(b, _)| b.clone()))
            .ok_or_else(|| StoreError::NotFound(key.to_owned()))
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let body = self.get(key).await?;
        let end = offset.checked_add(len).filter(|e| *e <= body.len() as u64);
        match end {
            Some(end) => Ok(body.slice(offset as usize..end as usize)),
            None => Err(StoreError::Fatal(format!(
                "{key}: range {offset}+{len} is past the end"
            ))),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        Ok(self.with(|o| {
            o.range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, (b, m))| ObjectInfo {
                    key: k.clone(),
                    size: b.len() as u64,
                    metadata: m.clone(),
                })
                .collect()
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in-memory object store".into()
    }
}
