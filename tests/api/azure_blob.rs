//! Checks of [`AzureBlobStore`] against a real Azurite (started by
//! `scripts/test.sh` through `scripts/azurite.sh`). Each check works in its own
//! random container.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use chrono::{TimeDelta, Utc};
use hmac::{Hmac, Mac};
use rtp_durability::wal::{
    azure::{AzureBlobSettings, AzureBlobStore},
    store::{ObjectStore, PutOptions, StoreError},
};
use sha2::Sha256;
use std::collections::BTreeMap;

fn random_container() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

fn settings(connection_string: &str, container: &str, create_container: bool) -> AzureBlobSettings {
    AzureBlobSettings {
        connection_string: Some(connection_string.to_owned().into()),
        account_url: None,
        container: container.to_owned(),
        create_container,
        client_id: None,
    }
}

async fn fresh_store(connection_string: &str) -> (AzureBlobStore, String) {
    let container = random_container();
    let store = AzureBlobStore::connect(&settings(connection_string, &container, true))
        .await
        .expect("connect to Azurite");
    (store, container)
}

fn ndjson(metadata: &[(&str, &str)]) -> PutOptions {
    PutOptions {
        content_type: "application/x-ndjson".into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Splits a connection string into its fields (values may contain '=').
fn field<'a>(connection_string: &'a str, name: &str) -> &'a str {
    connection_string
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("connection string has no {name}"))
}

/// put / get / get_range / list, including metadata and prefix filtering.
pub async fn round_trip(connection_string: &str) {
    let (store, _) = fresh_store(connection_string).await;
    assert!(
        store.describe().contains("devstoreaccount1"),
        "{}",
        store.describe()
    );
    assert!(
        !store
            .describe()
            .contains(field(connection_string, "AccountKey"))
    );
    store.ping().await.expect("ping");

    let a = Bytes::from_static(b"{\"n\":1}\n{\"n\":2}\n");
    let b = Bytes::from_static(b"{\"n\":3}\n");
    store
        .put_new(
            "wal/v1/2025/01/01/00/seg-0001",
            a.clone(),
            &ndjson(&[("records", "2"), ("first_txn", "tx-1")]),
        )
        .await
        .expect("put a");
    store
        .put_new(
            "wal/v1/2025/01/01/01/seg-0002",
            b.clone(),
            &ndjson(&[("records", "1")]),
        )
        .await
        .expect("put b");
    store
        .put_new("outcomes/v1/2025/01/01/00/o-1", b.clone(), &ndjson(&[]))
        .await
        .expect("put outcome");

    assert_eq!(store.get("wal/v1/2025/01/01/00/seg-0001").await.unwrap(), a);
    assert_eq!(
        store
            .get_range("wal/v1/2025/01/01/00/seg-0001", 8, 8)
            .await
            .unwrap(),
        &a[8..16]
    );
    assert_eq!(
        store
            .get_range("wal/v1/2025/01/01/00/seg-0001", 0, 1)
            .await
            .unwrap(),
        &a[..1]
    );
    assert!(matches!(
        store
            .get_range("wal/v1/2025/01/01/00/seg-0001", 10, 100)
            .await,
        Err(StoreError::Fatal(_))
    ));
    assert!(
        matches!(store.get("wal/v1/none").await, Err(StoreError::NotFound(k)) if k == "wal/v1/none")
    );
    assert!(matches!(
        store.get_range("wal/v1/none", 0, 1).await,
        Err(StoreError::NotFound(_))
    ));

    let listed = store.list("wal/v1/").await.expect("list");
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "wal/v1/2025/01/01/00/seg-0001",
            "wal/v1/2025/01/01/01/seg-0002"
        ]
    );
    assert_eq!(listed[0].size, a.len() as u64);
    assert_eq!(
        listed[0].metadata,
        BTreeMap::from([
            ("first_txn".to_string(), "tx-1".to_string()),
            ("records".to_string(), "2".to_string())
        ])
    );
    assert_eq!(store.list("wal/v1/2025/01/01/01/").await.unwrap().len(), 1);
    assert_eq!(store.list("").await.unwrap().len(), 3);
    assert!(store.list("nothing/").await.unwrap().is_empty());

    // Empty objects and keys that need escaping survive too.
    store
        .put_new("odd/empty", Bytes::new(), &ndjson(&[]))
        .await
        .expect("put empty");
    assert!(store.get("odd/empty").await.unwrap().is_empty());
    let odd = "odd/a b+c%d=é&x";
    store
        .put_new(odd, b.clone(), &ndjson(&[]))
        .await
        .expect("put odd key");
    assert_eq!(store.get(odd).await.unwrap(), b);
    let keys: Vec<String> = store
        .list("odd/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["odd/a b+c%d=é&x", "odd/empty"]);
}

/// `put_new` never overwrites: the second put of a key fails and the first body stays.
pub async fn conditional_create_refuses_overwrite(connection_string: &str) {
    let (store, _) = fresh_store(connection_string).await;
    let key = "wal/v1/2025/01/01/00/seg-dup";
    store
        .put_new(key, Bytes::from_static(b"first\n"), &ndjson(&[]))
        .await
        .expect("first put");
    let second = store
        .put_new(key, Bytes::from_static(b"second\n"), &ndjson(&[]))
        .await;
    assert!(
        matches!(&second, Err(StoreError::AlreadyExists(k)) if k == key),
        "{second:?}"
    );
    assert!(!second.unwrap_err().is_retryable());
    assert_eq!(
        store.get(key).await.unwrap(),
        Bytes::from_static(b"first\n")
    );
}

/// 4 MiB (the SDK's transfer partition size) and a bit more round-trip intact,
/// whole and by range across the partition boundary.
pub async fn large_objects_round_trip(connection_string: &str) {
    let (store, _) = fresh_store(connection_string).await;
    for (key, len) in [
        ("big/exact-4mib", 4 << 20),
        ("big/over-4mib", (4 << 20) + 4099),
    ] {
        let body: Bytes = (0..len)
            .map(|i: usize| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        store
            .put_new(key, body.clone(), &ndjson(&[]))
            .await
            .expect("put big");
        let got = store.get(key).await.expect("get big");
        assert_eq!(got.len(), body.len());
        assert!(got == body, "{key}: content differs");
        let (offset, n) = ((4 << 20) - 10, 20.min(len - ((4 << 20) - 10)));
        let range = store
            .get_range(key, offset as u64, n as u64)
            .await
            .expect("range");
        assert_eq!(range, body.slice(offset..offset + n));
        assert_eq!(store.list(key).await.unwrap()[0].size, len as u64);
    }
}

/// A connection string whose account key is wrong yields SAS tokens Azurite
/// refuses (its signature check is on): connect fails, clearly and for good.
/// The right key, same everything else, works.
pub async fn wrong_account_key_is_refused(connection_string: &str) {
    let right_key = field(connection_string, "AccountKey");
    let wrong_key = STANDARD.encode([7u8; 64]);
    let wrong = connection_string.replace(right_key, &wrong_key);
    let container = random_container();

    let err = AzureBlobStore::connect(&settings(&wrong, &container, true))
        .await
        .err()
        .expect("a wrong key must be refused");
    let message = err.to_string();
    assert!(matches!(err, StoreError::Fatal(_)), "{message}");
    assert!(
        message.contains(&container) && message.contains("403"),
        "{message}"
    );
    assert!(
        message.contains("account key of devstoreaccount1"),
        "{message}"
    );
    assert!(!message.contains(&wrong_key));

    let store = AzureBlobStore::connect(&settings(connection_string, &container, true))
        .await
        .expect("the right key works");
    store
        .put_new("k/1", Bytes::from_static(b"x\n"), &ndjson(&[]))
        .await
        .expect("put");
}

/// Without permission to create, a missing container is a clear fatal error.
pub async fn missing_container_is_reported(connection_string: &str) {
    let container = random_container();
    let err = AzureBlobStore::connect(&settings(connection_string, &container, false))
        .await
        .err()
        .expect("missing container");
    let message = err.to_string();
    assert!(matches!(err, StoreError::Fatal(_)), "{message}");
    assert!(
        message.contains(&container) && message.contains("does not exist"),
        "{message}"
    );
    assert!(message.contains("RTPD_WAL_CREATE_CONTAINER"), "{message}");
    // Allowed to create: a second connect finds it (ContainerAlreadyExists is fine too).
    AzureBlobStore::connect(&settings(connection_string, &container, true))
        .await
        .expect("create");
    AzureBlobStore::connect(&settings(connection_string, &container, true))
        .await
        .expect("exists");
    AzureBlobStore::connect(&settings(connection_string, &container, false))
        .await
        .expect("exists");
}

/// A `SharedAccessSignature=` connection string is used as given: a container
/// SAS (service SAS, sr=c, sv=2022-11-02, signed here independently of the
/// adapter's account SAS code) works for the whole port; the same SAS with a
/// signature from another key is refused.
pub async fn container_sas_connection_string_works(connection_string: &str) {
    let (owner, container) = fresh_store(connection_string).await;
    owner
        .put_new("wal/v1/seed", Bytes::from_static(b"seed\n"), &ndjson(&[]))
        .await
        .unwrap();

    let account = field(connection_string, "AccountName");
    let endpoint = field(connection_string, "BlobEndpoint");
    let key = STANDARD
        .decode(field(connection_string, "AccountKey"))
        .unwrap();
    let sas_connection = |key: &[u8]| {
        format!(
            "BlobEndpoint={endpoint};SharedAccessSignature={}",
            container_sas(account, &container, key)
        )
    };

    let store = AzureBlobStore::connect(&settings(&sas_connection(&key), &container, false))
        .await
        .expect("connect with container SAS");
    assert!(
        store.describe().contains("shared access signature"),
        "{}",
        store.describe()
    );
    store.ping().await.expect("ping with container SAS");
    store
        .put_new(
            "wal/v1/sas",
            Bytes::from_static(b"sas\n"),
            &ndjson(&[("records", "1")]),
        )
        .await
        .unwrap();
    assert_eq!(
        store.get("wal/v1/seed").await.unwrap(),
        Bytes::from_static(b"seed\n")
    );
    assert_eq!(store.list("wal/v1/").await.unwrap().len(), 2);
    assert!(matches!(
        store
            .put_new("wal/v1/sas", Bytes::from_static(b"again\n"), &ndjson(&[]))
            .await,
        Err(StoreError::AlreadyExists(_))
    ));

    let forged =
        AzureBlobStore::connect(&settings(&sas_connection(&[9u8; 64]), &container, false)).await;
    assert!(
        matches!(&forged, Err(StoreError::Fatal(m)) if m.contains("403")),
        "{:?}",
        forged.err()
    );
}

/// Listing follows continuation markers: more blobs than one page (5000) all come back, in order.
pub async fn list_follows_pages(connection_string: &str) {
    use futures::{StreamExt as _, TryStreamExt as _};
    let (store, _) = fresh_store(connection_string).await;
    let n = 5_003;
    futures::stream::iter(0..n)
        .map(|i| {
            let store = &store;
            async move {
                store
                    .put_new(
                        &format!("p/{i:05}"),
                        Bytes::from_static(b"x"),
                        &PutOptions::default(),
                    )
                    .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .expect("puts");
    let listed = store.list("p/").await.expect("list");
    assert_eq!(listed.len(), n);
    assert!(listed.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(listed[n - 1].key, format!("p/{:05}", n - 1));
}

/// Service SAS for a container, sv=2022-11-02, per "Create a service SAS":
/// sp \n st \n se \n /blob/account/container \n si \n sip \n spr \n sv \n sr \n
/// snapshot \n ses \n rscc \n rscd \n rsce \n rscl \n rsct
fn container_sas(account: &str, container: &str, key: &[u8]) -> String {
    let fmt = |t: chrono::DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let now = Utc::now();
    let (st, se) = (
        fmt(now - TimeDelta::minutes(5)),
        fmt(now + TimeDelta::hours(1)),
    );
    let (sp, spr, sv, sr) = ("rcwl", "https,http", "2022-11-02", "c");
    let resource = format!("/blob/{account}/{container}");
    let to_sign = [
        sp, &st, &se, &resource, "", "", spr, sv, sr, "", "", "", "", "", "", "",
    ]
    .join("\n");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(to_sign.as_bytes());
    let sig = STANDARD.encode(mac.finalize().into_bytes());
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("sv", sv)
        .append_pair("sr", sr)
        .append_pair("sp", sp)
        .append_pair("st", &st)
        .append_pair("se", &se)
        .append_pair("spr", spr)
        .append_pair("sig", &sig)
        .finish()
}

/// Nothing listening: the failure is retryable and comes back within the SDK's short retry budget.
pub async fn unreachable_endpoint_is_unavailable(connection_string: &str) {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = field(connection_string, "BlobEndpoint");
    let dead = connection_string.replace(
        endpoint,
        &format!("http://127.0.0.1:{closed_port}/devstoreaccount1"),
    );
    let started = std::time::Instant::now();
    let err = AzureBlobStore::connect(&settings(&dead, &random_container(), true))
        .await
        .err()
        .expect("nothing listens there");
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

macro_rules! against_azurite {
    ($($name:ident),* $(,)?) => {
        mod against_azurite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&crate::support::azurite_connection_string()).await
                }
            )*
        }
    };
}

against_azurite!(
    round_trip,
    conditional_create_refuses_overwrite,
    large_objects_round_trip,
    wrong_account_key_is_refused,
    missing_container_is_reported,
    container_sas_connection_string_works,
    list_follows_pages,
    unreachable_endpoint_is_unavailable,
);
