//! The Azure Blob Storage adapter of the WAL object-store port: one blob per
//! immutable object in one container, written with a conditional create.
//!
//! - `put_new` is a single Put Blob with `If-None-Match: *` (objects up to
//!   [`SINGLE_PUT_MAX`] go in one request, so they appear whole or not at all);
//!   409/412 mean the key is taken. Azure acknowledges a Put Blob only once the
//!   data is durably stored, so `Ok` means durable.
//! - The SDK's own retry is kept short (2 retries, ≤ 10 s): the WAL above runs a
//!   bounded retry loop of its own and must see failures quickly. Each call is
//!   also capped by [`OP_TIMEOUT`] so a dead connection becomes `Unavailable`.
//! - Authorization is chosen once, in `credential.rs`.

mod connection_string;
pub(crate) mod credential;
mod errors;
mod sas;

use crate::wal::store::{ObjectInfo, ObjectStore, PutOptions, StoreError};
use async_trait::async_trait;
use azure_core::{
    http::{ClientOptions, ExponentialRetryOptions, NoFormat, RequestContent, RetryOptions},
    time::Duration as SdkDuration,
};
use azure_storage_blob::{
    BlobContainerClient, BlobContainerClientOptions,
    models::{
        BlobClientDownloadOptions, BlobContainerClientListBlobsOptions,
        BlockBlobClientUploadOptions, ListBlobsIncludeItem,
    },
};
use bytes::Bytes;
use credential::Authorization;
use errors::Op;
use futures::TryStreamExt as _;
use secrecy::SecretString;
use std::{collections::BTreeMap, future::Future, num::NonZero, time::Duration};

/// Where and as whom the WAL stores its objects (from `RTPD_*` settings).
pub struct AzureBlobSettings {
    /// `RTPD_STORAGE_CONNECTION_STRING`: Azurite, account key, or SAS.
    pub connection_string: Option<SecretString>,
    /// `RTPD_STORAGE_ACCOUNT_URL`: `https://<account>.blob.core.windows.net`, Entra ID auth.
    pub account_url: Option<String>,
    /// `RTPD_WAL_CONTAINER`.
    pub container: String,
    /// `RTPD_WAL_CREATE_CONTAINER`: create the container if it is missing.
    pub create_container: bool,
    /// `RTPD_AZURE_CLIENT_ID`: client id of a user-assigned managed identity.
    pub client_id: Option<String>,
}

/// Upper bound of one call, SDK retries included.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Objects up to this size are written with one Put Blob request.
pub const SINGLE_PUT_MAX: u64 = 256 * 1024 * 1024;

pub struct AzureBlobStore {
    container: BlobContainerClient,
    container_name: String,
    identity: String,
}

impl AzureBlobStore {
    /// Builds the client, then checks the container exists and is readable
    /// (creating it first when `create_container` allows), so a wrong
    /// container, identity or key fails at start-up with a clear message.
    pub async fn connect(s: &AzureBlobSettings) -> Result<Self, StoreError> {
        check_container_name(&s.container)?;
        let access = credential::resolve(s)?;
        let mut url = access.endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| {
                StoreError::Fatal(format!("{} cannot be a blob endpoint", access.endpoint))
            })?
            .pop_if_empty()
            .push(&s.container);

        let mut client_options = ClientOptions {
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: SdkDuration::milliseconds(200),
                max_retries: 2,
                max_delay: SdkDuration::seconds(2),
                max_total_elapsed: SdkDuration::seconds(10),
            }),
            ..Default::default()
        };
        let credential = match access.authorization {
            Authorization::Token(credential) => Some(credential),
            Authorization::Sas(policy) => {
                client_options.per_try_policies.push(policy);
                None
            }
        };
        let options = BlobContainerClientOptions {
            client_options,
            ..Default::default()
        };
        let container = BlobContainerClient::new(url, credential, Some(options))
            .map_err(|e| StoreError::Fatal(format!("cannot build the blob client: {e}")))?;
        let store = AzureBlobStore {
            container,
            container_name: s.container.clone(),
            identity: access.identity,
        };
        store.ensure_container(s.create_container).await?;
        tracing::info!(store = %store.describe(), "WAL object store ready");
        Ok(store)
    }

    fn op<'a>(&'a self, what: &'static str, key: &'a str) -> Op<'a> {
        Op {
            what,
            key,
            container: &self.container_name,
            identity: &self.identity,
        }
    }

    async fn ensure_container(&self, create: bool) -> Result<(), StoreError> {
        match self.probe().await {
            Err(e) if errors::status(&e) == Some(404) => {}
            other => return other.map_err(|e| self.container_error(e)),
        }
        if !create {
            return Err(StoreError::Fatal(format!(
                "container {} does not exist (checked as {}); create it, or set RTPD_WAL_CREATE_CONTAINER=true",
                self.container_name, self.identity
            )));
        }
        match within(OP_TIMEOUT, self.container.create(None)).await? {
            Ok(_) => {
                tracing::info!(container = %self.container_name, "created WAL container");
                Ok(())
            }
            // Another instance won the race.
            Err(e) if errors::status(&e) == Some(409) => Ok(()),
            Err(e) => Err(self.container_error(e)),
        }
    }

    /// Lists at most one blob: proves the container exists and is readable with
    /// only the permissions the WAL needs anyway (works with a container-scoped SAS,
    /// which cannot read container properties).
    async fn probe(&self) -> Result<(), azure_core::Error> {
        let options = BlobContainerClientListBlobsOptions {
            maxresults: Some(1),
            ..Default::default()
        };
        let mut pages = self.container.list_blobs(Some(options))?.into_pages();
        match tokio::time::timeout(OP_TIMEOUT, pages.try_next()).await {
            Ok(page) => page.map(|_| ()),
            Err(_) => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Io,
                format!("no answer within {OP_TIMEOUT:?}"),
            )),
        }
    }

    fn container_error(&self, e: azure_core::Error) -> StoreError {
        let op = Op {
            what: "check container",
            key: "",
            container: &self.container_name,
            identity: &self.identity,
        };
        match errors::map(&op, e) {
            StoreError::NotFound(_) => StoreError::Fatal(format!(
                "container {} does not exist (checked as {})",
                self.container_name, self.identity
            )),
            other => other,
        }
    }
}

/// Runs `fut` with a deadline; a missed deadline is `Unavailable`.
async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T, StoreError> {
    tokio::time::timeout(limit, fut).await.map_err(|_| {
        StoreError::Unavailable(format!("no answer from blob storage within {limit:?}"))
    })
}

/// Azure's rules: 3–63 characters, lowercase letters, digits and single hyphens,
/// starting and ending with a letter or digit.
fn check_container_name(name: &str) -> Result<(), StoreError> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(StoreError::Fatal(format!(
            "RTPD_WAL_CONTAINER {name:?} is not a valid container name \
             (3-63 characters: lowercase letters, digits, single hyphens inside)"
        )))
    }
}

/// Blob metadata travels as `x-ms-meta-<name>` headers: names must be C#
/// identifiers and values printable ASCII without surrounding spaces.
fn check_metadata(key: &str, metadata: &BTreeMap<String, String>) -> Result<(), StoreError> {
    for (name, value) in metadata {
        let name_ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let value_ok = value.bytes().all(|b| (b' '..=b'~').contains(&b)) && value.trim() == value;
        if !name_ok || !value_ok {
            return Err(StoreError::Fatal(format!(
                "put {key}: metadata {name:?} cannot be stored on a blob (names: letters, digits, _; values: printable ASCII)"
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for AzureBlobStore {
    async fn put_new(&self, key: &str, body: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        check_metadata(key, &opts.metadata)?;
        let options = BlockBlobClientUploadOptions {
            blob_content_type: Some(opts.content_type.clone()).filter(|c| !c.is_empty()),
            metadata: (!opts.metadata.is_empty()).then(|| {
                opts.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
            partition_size: NonZero::new(SINGLE_PUT_MAX),
            // One request (the partition is the whole body): saying so
            // spares the SDK its default, `available_parallelism()`, which
            // reads the cgroup files on every upload (2.7 % of `rtpd serve`'s
            // CPU on the production-shaped stack, docs/benchmarks.md).
            parallel: NonZero::new(1),
            ..Default::default()
        }
        .if_not_exists();
        let blob = self.container.blob_client(key);
        // `RequestContent::from` is an inherent fn taking Vec<u8>; the From<Bytes> impl avoids a copy.
        let content: RequestContent<Bytes, NoFormat> = body.into();
        match within(OP_TIMEOUT, blob.upload(content, Some(options))).await? {
            Ok(_) => Ok(()),
            Err(e) if matches!(errors::status(&e), Some(409 | 412)) => {
                Err(StoreError::AlreadyExists(key.to_owned()))
            }
            Err(e) => Err(errors::map(&self.op("put", key), e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let blob = self.container.blob_client(key);
        let read = async {
            let response = blob.download(None).await?;
            response.body.collect().await
        };
        within(OP_TIMEOUT, read)
            .await?
            .map_err(|e| errors::map(&self.op("get", key), e))
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.checked_add(len).ok_or_else(|| {
            StoreError::Fatal(format!("get {key}: range {offset}+{len} overflows"))
        })?;
        let blob = self.container.blob_client(key);
        let options = BlobClientDownloadOptions {
            range: Some((offset..end).into()),
            ..Default::default()
        };
        let read = async {
            let response = blob.download(Some(options)).await?;
            response.body.collect().await
        };
        let past_end =
            || StoreError::Fatal(format!("get {key}: range {offset}+{len} is past the end"));
        match within(OP_TIMEOUT, read).await? {
            Ok(bytes) if bytes.len() as u64 == len => Ok(bytes),
            Ok(_) => Err(past_end()),
            Err(e) if errors::status(&e) == Some(416) => Err(past_end()),
            Err(e) => Err(errors::map(&self.op("get", key), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let op = self.op("list", prefix);
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(prefix.to_owned()).filter(|p| !p.is_empty()),
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            ..Default::default()
        };
        let mut items = self
            .container
            .list_blobs(Some(options))
            .map_err(|e| errors::map(&op, e))?;
        let mut out = Vec::new();
        // The pager fetches a page (up to 5000 blobs) whenever its buffer runs dry; bound each step.
        while let Some(item) = within(OP_TIMEOUT, items.try_next())
            .await?
            .map_err(|e| errors::map(&op, e))?
        {
            let Some(key) = item.name else { continue };
            out.push(ObjectInfo {
                key,
                size: item.properties.and_then(|p| p.content_length).unwrap_or(0),
                metadata: item
                    .metadata
                    .and_then(|m| m.values)
                    .map(|values| values.into_iter().collect())
                    .unwrap_or_default(),
            });
        }
        // Blob Storage lists in UTF-8 binary order already; the port promises it, so make sure.
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.probe().await.map_err(|e| self.container_error(e))
    }

    fn describe(&self) -> String {
        format!("azure blob {} ({})", self.container.url(), self.identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_follow_azure_rules() {
        for ok in ["rtp-wal", "abc", "a1-b2"] {
            assert!(check_container_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "Rtp-wal",
            "-rtp",
            "rtp-",
            "rtp--wal",
            "rtp_wal",
            &"a".repeat(64),
        ] {
            assert!(check_container_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_must_fit_in_headers() {
        let md = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(check_metadata("k", &md("records", "12")).is_ok());
        assert!(check_metadata("k", &md("first_txn", "tx-1 a")).is_ok());
        assert!(check_metadata("k", &md("1st", "x")).is_err());
        assert!(check_metadata("k", &md("a-b", "x")).is_err());
        assert!(check_metadata("k", &md("a", "é")).is_err());
        assert!(check_metadata("k", &md("a", " x")).is_err());
    }
}
