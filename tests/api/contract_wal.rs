//! The WAL contract, written once and run against every object store.

use bytes::Bytes;
use chrono::Utc;
use rtp_durability::wal::{
    GroupCommit, Log, WAL_PREFIX, WalRef,
    store::{ObjectStore, PutOptions, StoreError},
};
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

fn opts() -> PutOptions {
    PutOptions {
        content_type: "application/x-ndjson".into(),
        metadata: BTreeMap::from([("records".into(), "1".into())]),
    }
}

pub async fn put_get_range_list(store: Arc<dyn ObjectStore>) {
    let key = "wal/v1/2026/01/02/03/a-1.ndjson";
    store
        .put_new(key, Bytes::from_static(b"hello\nworld\n"), &opts())
        .await
        .unwrap();
    assert_eq!(&store.get(key).await.unwrap()[..], b"hello\nworld\n");
    assert_eq!(&store.get_range(key, 6, 5).await.unwrap()[..], b"world");
    store
        .put_new(
            "wal/v1/2026/01/02/04/b-1.ndjson",
            Bytes::from_static(b"x\n"),
            &opts(),
        )
        .await
        .unwrap();
    let hour3: Vec<_> = store.list("wal/v1/2026/01/02/03/").await.unwrap();
    assert_eq!(
        hour3.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
        vec![key]
    );
    assert_eq!(hour3[0].size, 12);
    let day: Vec<_> = store.list("wal/v1/2026/01/02/").await.unwrap();
    assert_eq!(day.len(), 2);
    assert!(day[0].key < day[1].key, "listing is in key order");
    assert!(store.list("wal/v1/2027/").await.unwrap().is_empty());
    assert!(matches!(
        store.get("wal/v1/none").await,
        Err(StoreError::NotFound(_))
    ));
    store.ping().await.unwrap();
}

pub async fn never_overwrites(store: Arc<dyn ObjectStore>) {
    let key = "wal/v1/2026/01/02/03/dup.ndjson";
    store
        .put_new(key, Bytes::from_static(b"first\n"), &opts())
        .await
        .unwrap();
    let second = store
        .put_new(key, Bytes::from_static(b"second\n"), &opts())
        .await;
    assert!(
        matches!(second, Err(StoreError::AlreadyExists(_))),
        "{second:?}"
    );
    assert_eq!(&store.get(key).await.unwrap()[..], b"first\n");
}

/// Many concurrent appends share flushes, and every reference reads back
/// exactly the bytes appended.
pub async fn group_commit_batches_and_reads_back(store: Arc<dyn ObjectStore>) {
    let log = Log::start(store.clone(), WAL_PREFIX, "test", GroupCommit::default());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..400 {
        let log = log.clone();
        tasks.spawn(async move {
            let line = format!("{{\"n\":{i},\"text\":\"caf\\u00e9 {i}\"}}").into_bytes();
            let r = log.append(line.clone(), Utc::now()).await.unwrap();
            (r, line)
        });
    }
    let mut refs = Vec::new();
    while let Some(r) = tasks.join_next().await {
        refs.push(r.unwrap());
    }
    for (r, line) in &refs {
        let parsed: WalRef = r.to_string().parse().unwrap();
        assert_eq!(&log.read(&parsed).await.unwrap()[..], &line[..]);
    }
    let segments = log
        .segments(Utc::now() - chrono::Duration::hours(1), Utc::now())
        .await
        .unwrap();
    assert!(!segments.is_empty());
    assert!(
        segments.len() < 400,
        "group commit should batch 400 concurrent appends into fewer segments, got {}",
        segments.len()
    );
    let mut all = 0;
    for s in &segments {
        all += log.read_segment(&s.key).await.unwrap().len();
    }
    assert_eq!(all, 400);
}

/// A segment at the byte cap round-trips, and appends past it start a new segment.
pub async fn segment_size_cap(store: Arc<dyn ObjectStore>) {
    let cap = 256 * 1024;
    let log = Log::start(
        store.clone(),
        WAL_PREFIX,
        "cap",
        GroupCommit {
            max_bytes: cap,
            flushers: 1,
            ..Default::default()
        },
    );
    let line = vec![b'a'; cap - 1];
    let r = log.append(line.clone(), Utc::now()).await.unwrap();
    assert_eq!(r.len as usize, cap - 1);
    assert_eq!(log.read(&r).await.unwrap().len(), cap - 1);
    let seg = store.get(&r.key).await.unwrap();
    assert_eq!(
        seg.len(),
        cap,
        "one record plus newline fills the segment exactly"
    );
    let (a, b) = tokio::join!(
        log.append(vec![b'b'; cap / 2], Utc::now()),
        log.append(vec![b'c'; cap / 2], Utc::now())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.key, b.key, "two half-cap records do not fit one segment");
}

/// Data written before the store is dropped is there after reopening.
pub async fn survives_reopen(open: impl Fn() -> Arc<dyn ObjectStore>) {
    let r = {
        let log = Log::start(open(), WAL_PREFIX, "reopen", GroupCommit::default());
        log.append(b"{\"kept\":true}".to_vec(), Utc::now())
            .await
            .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let log = Log::start(open(), WAL_PREFIX, "reopen2", GroupCommit::default());
    assert_eq!(&log.read(&r).await.unwrap()[..], b"{\"kept\":true}");
}

macro_rules! wal_contract {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn put_get_range_list() {
                super::put_get_range_list($make().await).await
            }
            #[tokio::test]
            async fn never_overwrites() {
                super::never_overwrites($make().await).await
            }
            #[tokio::test]
            async fn group_commit_batches_and_reads_back() {
                super::group_commit_batches_and_reads_back($make().await).await
            }
            #[tokio::test]
            async fn segment_size_cap() {
                super::segment_size_cap($make().await).await
            }
        }
    };
}

async fn local() -> Arc<dyn ObjectStore> {
    let dir = tempfile::tempdir().unwrap().keep();
    Arc::new(rtp_durability::wal::local::LocalStore::open(dir).unwrap())
}

/// The simulation's store (`tests/sim`) behaves like the real ones.
async fn memory() -> Arc<dyn ObjectStore> {
    Arc::new(rtp_durability::wal::memory::MemoryStore::new())
}

wal_contract!(memory_store, memory);

async fn azurite() -> Arc<dyn ObjectStore> {
    Arc::new(crate::support::azurite_store().await)
}

wal_contract!(local_store, local);
wal_contract!(azurite_store, azurite);

#[tokio::test]
async fn local_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    survives_reopen(move || {
        Arc::new(rtp_durability::wal::local::LocalStore::open(&path).unwrap())
            as Arc<dyn ObjectStore>
    })
    .await;
}

#[tokio::test]
async fn azurite_store_survives_reopen() {
    let (conn, container) = crate::support::azurite_container();
    let store = crate::support::azurite_store_in(&conn, &container).await;
    let store = Arc::new(store) as Arc<dyn ObjectStore>;
    let again = crate::support::azurite_store_in(&conn, &container).await;
    let again = Arc::new(again) as Arc<dyn ObjectStore>;
    let slot = std::sync::Mutex::new(vec![again, store]);
    survives_reopen(move || slot.lock().unwrap().pop().unwrap()).await;
}

/// Issue 12 item 13: a CLI opening the local WAL next to a running server
/// must not delete the server's in-flight temporaries; it removes only those
/// of processes that are gone, and any older than an hour.
#[test]
fn local_store_open_keeps_a_live_process_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join(".tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut live = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let put = |name: String| {
        std::fs::write(tmp.join(&name), b"partial").unwrap();
        name
    };
    let in_flight = put(format!("{}-7", live.id()));
    let of_the_dead = put(format!("{}-3", gone.id()));
    let stale = put(format!("{}-8", live.id()));
    std::fs::File::options()
        .write(true)
        .open(tmp.join(&stale))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();

    rtp_durability::wal::local::LocalStore::open(dir.path()).unwrap();

    let left: BTreeSet<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    live.kill().unwrap();
    live.wait().unwrap();
    assert!(
        left.contains(&in_flight),
        "a live server's temporary survives: {left:?}"
    );
    assert!(!left.contains(&of_the_dead), "{left:?}");
    assert!(!left.contains(&stale), "{left:?}");
}
