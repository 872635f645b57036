//! Start-up wiring: the one factory that turns configuration into adapters
//! (chosen once, from `Settings`), and hands each flow the ports it uses.
//! Nothing below imports this module.

use crate::api::{ApiState, health::Dependencies};
use crate::auth::Auth;
use crate::backoff::RetryPolicy;
use crate::config::{LedgerKind, QueueKind, ServicebusTransport, Settings, WalKind};
use crate::downstream::HttpDownstream;
use crate::intake::Intake;
use crate::journal::Journal;
use crate::ledger::{
    Ledger,
    local::LocalLedger,
    postgres::{PostgresLedger, PostgresSettings},
    redis::{RedisLedger, RedisSettings},
};
use crate::processor::Processor;
use crate::queue::servicebus::{ServiceBusQueue, ServiceBusSettings, Transport};
use crate::queue::{
    Queue,
    local::{LocalQueue, LocalQueueOptions},
};
use crate::reconcile::Reconciler;
use crate::recovery::{self, Waiting};
use crate::replay::Replayer;
use crate::resend::{self, Resend};
use crate::telemetry::ports::{InstrumentedLedger, InstrumentedQueue};
use crate::wal::azure::{AzureBlobSettings, AzureBlobStore};
use crate::wal::{
    GroupCommit, JOURNAL_PREFIX, Log, REJECTED_PREFIX, WAL_PREFIX, local::LocalStore,
    store::ObjectStore,
};
use anyhow::Context;
use std::sync::Arc;

/// The backends every part of the service shares.
#[derive(Clone)]
pub struct Services {
    pub settings: Settings,
    pub instance: String,
    pub wal: Log,
    pub journal: Journal,
    /// Rejected inbound calls, for forensics.
    pub rejected: Log,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
    /// Failed sends after a ledger write, resent from memory.
    pub resend: Resend,
    /// Work held back by a dependency outage (the recovery gauges).
    pub waiting: Arc<Waiting>,
}

/// How long start-up waits for a ledger rebuild before the API starts
/// anyway (the rebuild goes on in the background; new transactions get a
/// 503, and readiness stays `starting`, until it is done). Short: a
/// container platform's start-up probe must not restart a replica mid-pass.
const START_REBUILD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Services {
    /// A ledger without its intact mark — new, or it lost its data — is rebuilt
    /// from the WAL (issue 12, N1; see `Ledger::intact`); start-up waits for
    /// it a few seconds at most (a new ledger over an empty WAL takes
    /// milliseconds), then leaves it running. The recovery watcher takes over
    /// if it fails or another instance holds the reconciler lease.
    pub async fn rebuild_ledger_at_start(&self) {
        let lookback = Settings::secs(self.settings.reconcile_lookback_secs);
        let rebuilder = self.reconciler();
        let task = tokio::spawn(async move { rebuilder.rebuild_if_lost(lookback).await });
        match tokio::time::timeout(START_REBUILD_WAIT, task).await {
            Ok(Ok(Ok(None | Some(true)))) => {}
            Ok(Ok(Ok(Some(false)))) => tracing::info!(
                "another instance is rebuilding the ledger; new transactions get a 503 until it is marked"
            ),
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "ledger check at start-up failed; the recovery watcher tries again")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "ledger rebuild at start-up panicked"),
            Err(_) => tracing::warn!(
                "ledger rebuild still running after {START_REBUILD_WAIT:?}; the API starts, answering 503 to new transactions until it is done"
            ),
        }
    }

    /// The adapter factory: chooses each port's adapter once, from configuration.
    pub async fn build(settings: &Settings) -> anyhow::Result<Services> {
        let instance = settings.instance();
        let store: Arc<dyn ObjectStore> = match settings.wal {
            WalKind::Local => Arc::new(
                LocalStore::open(settings.data_dir.join("objects"))
                    .context("opening the local WAL directory")?,
            ),
            WalKind::Azure => Arc::new(
                AzureBlobStore::connect(&AzureBlobSettings {
                    connection_string: settings
                        .storage_connection_string
                        .as_ref()
                        .map(|s| s.0.clone()),
                    account_url: settings.storage_account_url.clone(),
                    container: settings.wal_container.clone(),
                    // Provisioned deployments (Entra ID) manage the container themselves.
                    create_container: settings
                        .wal_create_container
                        .unwrap_or(settings.storage_connection_string.is_some()),
                    client_id: settings.azure_client_id.clone(),
                })
                .await
                .context("connecting to the Blob Storage WAL")?,
            ),
        };
        let ledger: Arc<dyn Ledger> = match settings.ledger {
            LedgerKind::Local => Arc::new(
                LocalLedger::open(&settings.data_dir.join("ledger.db"))
                    .context("opening the embedded ledger")?,
            ),
            LedgerKind::Redis => Arc::new(
                RedisLedger::connect(&RedisSettings::from_settings(settings))
                    .context("setting up the Redis ledger")?,
            ),
            LedgerKind::Postgres => Arc::new(
                PostgresLedger::connect(&PostgresSettings::from_settings(settings)?)
                    .context("setting up the PostgreSQL ledger")?,
            ),
        };
        let queue: Arc<dyn Queue> = match settings.queue {
            QueueKind::Local => Arc::new(
                LocalQueue::open(
                    &settings.data_dir.join("queue.db"),
                    LocalQueueOptions {
                        lock_duration: settings.lock_duration(),
                        max_delivery_count: settings.max_delivery_count,
                        ..Default::default()
                    },
                )
                .context("opening the embedded queue")?,
            ),
            QueueKind::Servicebus => Arc::new(
                ServiceBusQueue::connect(&ServiceBusSettings {
                    connection_string: settings
                        .servicebus_connection_string
                        .as_ref()
                        .map(|s| s.0.clone()),
                    namespace: settings.servicebus_namespace.clone(),
                    queue: settings.servicebus_queue.clone(),
                    client_id: settings.azure_client_id.clone(),
                    transport: match settings.servicebus_transport {
                        ServicebusTransport::Amqp => Transport::Amqp,
                        ServicebusTransport::Websockets => Transport::WebSockets,
                    },
                    custom_endpoint: settings.servicebus_custom_endpoint.clone(),
                    ca_file: settings.servicebus_ca_file.clone(),
                    send_timeout: std::time::Duration::from_secs_f64(
                        settings.servicebus_send_timeout_secs,
                    ),
                    ..Default::default()
                })
                .await
                .context("connecting to Service Bus")?,
            ),
        };
        Ok(Services::from_parts(
            settings, instance, store, ledger, queue,
        ))
    }

    pub fn from_parts(
        settings: &Settings,
        instance: String,
        store: Arc<dyn ObjectStore>,
        ledger: Arc<dyn Ledger>,
        queue: Arc<dyn Queue>,
    ) -> Services {
        let gc = GroupCommit {
            max_records: settings.wal_batch_max_records,
            flushers: settings.wal_flushers,
            ..GroupCommit::default()
        };
        // Every flow sees the ports through the decorators that trace and time them.
        let ledger: Arc<dyn Ledger> = Arc::new(InstrumentedLedger(ledger));
        let queue: Arc<dyn Queue> = Arc::new(InstrumentedQueue(queue));
        let waiting = Arc::new(Waiting::default());
        Services {
            resend: Resend::start(queue.clone(), waiting.clone(), resend::CAPACITY),
            waiting,
            settings: settings.clone(),
            wal: Log::start(store.clone(), WAL_PREFIX, &instance, gc.clone()),
            journal: Journal::new(Log::start(
                store.clone(),
                JOURNAL_PREFIX,
                &instance,
                gc.clone(),
            )),
            rejected: Log::start(store, REJECTED_PREFIX, &instance, gc),
            instance,
            ledger,
            queue,
        }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            base: std::time::Duration::from_secs_f64(self.settings.backoff_base_secs),
            max: std::time::Duration::from_secs_f64(self.settings.backoff_max_secs),
            max_retries: self.settings.max_retries,
        }
    }

    pub fn processor(&self) -> anyhow::Result<Processor> {
        Ok(Processor {
            queue: self.queue.clone(),
            ledger: self.ledger.clone(),
            journal: self.journal.clone(),
            downstream: Arc::new(
                HttpDownstream::new(
                    self.settings.downstream_url.clone(),
                    self.settings.downstream_timeout(),
                )
                .context("building the downstream HTTP client")?,
            ),
            policy: self.retry_policy(),
            owner: self.instance.clone(),
            claim_names: Default::default(),
            lock_duration: self.settings.lock_duration(),
            downstream_timeout: self.settings.downstream_timeout(),
            journal_index: Default::default(),
            resend: self.resend.clone(),
            waiting: self.waiting.clone(),
            ledger_down: Default::default(),
            journal_read_hold: crate::processor::JOURNAL_READ_HOLD,
        })
    }

    pub fn intake(&self) -> Intake {
        Intake {
            wal: self.wal.clone(),
            journal: self.journal.clone(),
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            resend: Some(self.resend.clone()),
            ledger_lost: Default::default(),
        }
    }

    pub fn replayer(&self) -> Replayer {
        Replayer {
            wal: self.wal.clone(),
            journal: self.journal.clone(),
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            quiet: self.settings.lock_duration() + self.settings.downstream_timeout(),
        }
    }

    pub fn reconciler(&self) -> Reconciler {
        Reconciler {
            wal: self.wal.clone(),
            journal: self.journal.clone(),
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            instance: self.instance.clone(),
            in_flight: self.settings.lock_duration() + self.settings.downstream_timeout(),
        }
    }

    pub fn dependencies(&self) -> Dependencies {
        Dependencies::new(self.wal.clone(), self.ledger.clone(), self.queue.clone())
    }

    /// The dependency watcher; it re-drives on a return only when given the
    /// reconciler (a process that runs the processor).
    pub fn recovery_watch(&self, with_reconciler: bool) -> recovery::Watch {
        let s = &self.settings;
        recovery::Watch {
            wal: self.wal.clone(),
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            reconciler: with_reconciler.then(|| Arc::new(self.reconciler())),
            rebuilder: Arc::new(self.reconciler()),
            waiting: self.waiting.clone(),
            every: Settings::secs(s.recovery_probe_secs),
            lookback: Settings::secs(s.reconcile_lookback_secs),
            pending_after: (s.lock_duration() + s.downstream_timeout())
                .min(Settings::secs(s.reconcile_pending_after_secs)),
        }
    }

    /// What the HTTP layer works with.
    pub fn api_state(&self, auth: Auth) -> ApiState {
        ApiState::new(
            self.settings.clone(),
            auth,
            self.intake(),
            self.replayer(),
            self.rejected.clone(),
            self.dependencies(),
        )
    }

    /// Logs where each port points; never a secret.
    pub fn describe(&self) {
        tracing::info!(wal = %self.wal.describe(), ledger = %self.ledger.describe(), queue = %self.queue.describe(), "backends");
    }
}
