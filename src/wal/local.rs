//! The embedded object store: one file per object under a root directory,
//! keyed by the same object keys as Blob Storage.
//!
//! A put writes a temporary file, fsyncs it, hard-links it to its key (which
//! fails if the key exists, so objects are never overwritten), then fsyncs the
//! directory. A crash leaves either no object or a complete one.
//!
//! A directory counts as durable only once the fsync of its parent after its
//! creation returned, in this process. A put never trusts a directory just
//! because it exists: another flusher may have created it and still be
//! fsyncing its parent, or that fsync may have failed. Until a put has seen
//! the parent fsync succeed (its own or an earlier one), it fsyncs it again.

use super::store::{ObjectInfo, ObjectStore, PutOptions, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::{
    collections::HashSet,
    fs,
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// How a directory is made durable (`fsync_dir`; a test swaps in faults).
type DirSync = Arc<dyn Fn(&Path) -> io::Result<()> + Send + Sync>;

pub struct LocalStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    dirs: Arc<DurableDirs>,
}

/// Directories whose entry in their parent is known durable.
struct DurableDirs {
    root: PathBuf,
    known: Mutex<HashSet<PathBuf>>,
    sync: DirSync,
}

impl DurableDirs {
    fn is_known(&self, dir: &Path) -> bool {
        dir == self.root
            || self
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(dir)
    }

    /// Creates `dir` and any missing parents under the root, and returns only
    /// once each one's entry in its parent has been fsynced (by this call or
    /// an earlier one that succeeded).
    fn ensure(&self, dir: &Path) -> io::Result<()> {
        if self.is_known(dir) {
            return Ok(());
        }
        let parent = dir
            .parent()
            .filter(|p| p.starts_with(&self.root))
            .ok_or_else(|| io::Error::other(format!("{} is outside the store", dir.display())))?;
        self.ensure(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        (self.sync)(parent)?;
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir.to_owned());
        Ok(())
    }
}

impl LocalStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(root.join(".tmp")).map_err(|e| io_fatal(&root, e))?;
        // Leftover temporaries are puts that never completed: not durable, never acknowledged.
        if let Ok(entries) = fs::read_dir(root.join(".tmp")) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(LocalStore {
            dirs: Arc::new(DurableDirs {
                root: root.clone(),
                known: Mutex::new(HashSet::new()),
                sync: Arc::new(|d: &Path| fsync_dir(d)),
            }),
            root,
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// The same store with directory fsyncs going through `sync` (fault tests).
    #[cfg(test)]
    fn with_dir_sync(mut self, sync: DirSync) -> Self {
        self.dirs = Arc::new(DurableDirs {
            root: self.root.clone(),
            known: Mutex::new(HashSet::new()),
            sync,
        });
        self
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == ".." || p.starts_with('.'))
        {
            return Err(StoreError::Fatal(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }
}

fn io_fatal(path: &Path, e: io::Error) -> StoreError {
    StoreError::Fatal(format!("{}: {e}", path.display()))
}

fn io_err(key: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound(key.to_owned()),
        io::ErrorKind::AlreadyExists => StoreError::AlreadyExists(key.to_owned()),
        // A full or failing disk may recover; let the WAL's bounded retry decide.
        _ => StoreError::Unavailable(format!("{key}: {e}")),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_new(&self, key: &str, body: Bytes, _opts: &PutOptions) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let tmp = self.root.join(".tmp").join(format!(
            "{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let key = key.to_owned();
        let dirs = self.dirs.clone();
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                let mut f = fs::File::create_new(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
                let dir = path.parent().expect("object keys have a parent directory");
                dirs.ensure(dir)?;
                fs::hard_link(&tmp, &path)?;
                (dirs.sync)(dir)
            })();
            let _ = fs::remove_file(&tmp);
            result.map_err(|e| io_err(&key, e))
        })
        .await
        .map_err(|e| StoreError::Fatal(format!("put task failed: {e}")))?
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| io_err(&key, e))
        })
        .await
        .map_err(|e| StoreError::Fatal(format!("get task failed: {e}")))?
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            (|| {
                let mut f = fs::File::open(&path)?;
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = vec![0; len as usize];
                f.read_exact(&mut buf)?;
                Ok(Bytes::from(buf))
            })()
            .map_err(|e: io::Error| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    StoreError::Fatal(format!("{key}: range {offset}+{len} is past the end"))
                } else {
                    io_err(&key, e)
                }
            })
        })
        .await
        .map_err(|e| StoreError::Fatal(format!("get task failed: {e}")))?
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            // Walk only the directories the prefix can reach.
            let dir_part = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            let start = root.join(dir_part);
            let mut out = Vec::new();
            let mut stack = vec![start];
            while let Some(dir) = stack.pop() {
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&prefix, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| io_err(&prefix, e))?;
                    let path = entry.path();
                    let rel = path
                        .strip_prefix(&root)
                        .expect("walk stays under root")
                        .to_string_lossy()
                        .replace('\\', "/");
                    if rel.starts_with(".tmp") {
                        continue;
                    }
                    let ft = entry.file_type().map_err(|e| io_err(&rel, e))?;
                    if ft.is_dir() {
                        if prefix.starts_with(&format!("{rel}/"))
                            || rel.starts_with(&prefix)
                            || prefix.starts_with(&rel)
                        {
                            stack.push(path);
                        }
                    } else if rel.starts_with(&prefix) {
                        let size = entry.metadata().map_err(|e| io_err(&rel, e))?.len();
                        out.push(ObjectInfo {
                            key: rel,
                            size,
                            metadata: Default::default(),
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Fatal(format!("list task failed: {e}")))?
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.root.join(".tmp").is_dir() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "{} is gone",
                self.root.display()
            )))
        }
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn opts() -> PutOptions {
        PutOptions::default()
    }

    /// Item 9 of issue 12: an `fsync_dir` failure must not be forgotten. The
    /// first put into a new directory fails fsyncing its parent; the next put
    /// into the same directory must fsync that parent again before it acks.
    #[tokio::test]
    async fn local_wal_dir_fsync_failure_is_retried_before_the_next_ack() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("objects");
        let parent = root.join("wal/v1/2026");
        let log: Arc<Mutex<Vec<PathBuf>>> = Default::default();
        let (seen, fail_first) = (log.clone(), Arc::new(AtomicU64::new(1)));
        let p = parent.clone();
        let store = LocalStore::open(&root)
            .unwrap()
            .with_dir_sync(Arc::new(move |d: &Path| {
                if d == p && fail_first.fetch_sub(1, Ordering::SeqCst) == 1 {
                    return Err(io::Error::other("injected fsync failure"));
                }
                fsync_dir(d)?;
                seen.lock().unwrap().push(d.to_owned());
                Ok(())
            }));
        let err = store
            .put_new("wal/v1/2026/11/a.ndjson", Bytes::from_static(b"a"), &opts())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!log.lock().unwrap().contains(&parent));
        store
            .put_new("wal/v1/2026/11/b.ndjson", Bytes::from_static(b"b"), &opts())
            .await
            .unwrap();
        assert!(
            log.lock().unwrap().contains(&parent),
            "the retry acked without a successful fsync of {}",
            parent.display()
        );
        assert_eq!(
            &store.get("wal/v1/2026/11/b.ndjson").await.unwrap()[..],
            b"b"
        );
    }

    /// Item 9 of issue 12: while the flusher that created a directory is
    /// still fsyncing its parent, a second flusher writing into it must not
    /// ack on the strength of that unfinished fsync.
    #[tokio::test]
    async fn local_wal_second_flusher_does_not_ack_before_the_dir_fsync() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("objects");
        let parent = root.join("wal/v1/2026");
        let done: Arc<Mutex<Vec<PathBuf>>> = Default::default();
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(Some(release_rx));
        let entered_tx = Mutex::new(entered_tx);
        let (p, d2) = (parent.clone(), done.clone());
        let store = Arc::new(LocalStore::open(&root).unwrap().with_dir_sync(Arc::new(
            move |d: &Path| {
                // The first fsync of the parent (the creator's) stalls until released.
                let stall = if d == p {
                    release_rx.lock().unwrap().take()
                } else {
                    None
                };
                if let Some(rx) = stall {
                    entered_tx.lock().unwrap().send(()).unwrap();
                    rx.recv().unwrap();
                }
                fsync_dir(d)?;
                d2.lock().unwrap().push(d.to_owned());
                Ok(())
            },
        )));
        let creator = {
            let s = store.clone();
            tokio::spawn(async move {
                s.put_new("wal/v1/2026/11/a.ndjson", Bytes::from_static(b"a"), &opts())
                    .await
            })
        };
        tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
            .await
            .unwrap();
        store
            .put_new("wal/v1/2026/11/b.ndjson", Bytes::from_static(b"b"), &opts())
            .await
            .unwrap();
        assert!(
            done.lock().unwrap().contains(&parent),
            "the second flusher acked before any fsync of {} completed",
            parent.display()
        );
        release_tx.send(()).unwrap();
        creator.await.unwrap().unwrap();
    }
}
