//! The embedded object store: one file per object under a root directory,
//! keyed by the same object keys as Blob Storage.
//!
//! A put writes a temporary file, fsyncs it, hard-links it to its key (which
//! fails if the key exists, so objects are never overwritten), then fsyncs the
//! directory. A crash leaves either no object or a complete one.

use super::store::{ObjectInfo, ObjectStore, PutOptions, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::{
    fs,
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

pub struct LocalStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl LocalStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(root.join(".tmp")).map_err(|e| io_fatal(&root, e))?;
        remove_abandoned_temporaries(&root.join(".tmp"));
        Ok(LocalStore {
            root,
            tmp_seq: AtomicU64::new(0),
        })
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

/// A temporary older than this belongs to no put still running, whoever made it.
const ABANDONED_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Leftover temporaries are puts that never completed: not durable, never
/// acknowledged. But the directory may be shared with a running server (a CLI
/// such as `rtpd wal` or `rtpd reconcile` opened next to it), whose in-flight
/// temporaries must survive: a temporary (named `<pid>-<seq>`) is removed
/// only when the process that made it is gone, or when it is older than
/// [`ABANDONED_AFTER`].
fn remove_abandoned_temporaries(tmp_dir: &Path) {
    let Ok(entries) = fs::read_dir(tmp_dir) else {
        return;
    };
    let now = crate::clock::now();
    for e in entries.flatten() {
        let owner = e
            .file_name()
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now - chrono::DateTime::<chrono::Utc>::from(t) > ABANDONED_AFTER)
            .unwrap_or(false);
        if old || owner.is_none_or(|pid| !process_alive(pid)) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Whether process `pid` exists. Where that cannot be told (no `/proc`), a
/// process counts as alive, so only age removes its temporaries.
fn process_alive(pid: u32) -> bool {
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    pid == std::process::id() || proc_root.join(pid.to_string()).exists()
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

/// Creates `dir` and any missing parents, fsyncing each parent whose entry list changed.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
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
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                let mut f = fs::File::create_new(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
                let dir = path.parent().expect("object keys have a parent directory");
                create_dirs_durably(dir)?;
                fs::hard_link(&tmp, &path)?;
                fsync_dir(dir)
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
