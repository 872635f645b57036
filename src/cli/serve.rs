//! `rtpd serve | api | processor`: the parts of the service against the
//! configured backends, until SIGTERM/Ctrl-C.

use crate::app::Application;
use crate::auth::Auth;
use crate::config::{AuthMode, Settings};
use crate::services::Services;
use crate::{processor, reconcile, recovery};
use anyhow::Context;
use std::{sync::Arc, time::Duration};
use tokio::{sync::watch, task::JoinSet};

#[derive(Debug, clap::Args)]
pub struct Opts {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    Api,
    Processor,
    Both,
    /// The Kafka intake alone (with the health server, like the processor).
    KafkaIntake,
}

impl Parts {
    /// Whether the Kafka intake runs: alone, or beside the API when
    /// `RTPD_KAFKA_TOPICS` is set.
    fn kafka(self, settings: &Settings) -> bool {
        self == Parts::KafkaIntake || (self.api() && settings.kafka_enabled())
    }

    fn api(self) -> bool {
        matches!(self, Parts::Api | Parts::Both)
    }
    fn processor(self) -> bool {
        matches!(self, Parts::Processor | Parts::Both)
    }
}

/// How long in-flight work may take to finish after a stop signal.
const GRACE: Duration = Duration::from_secs(20);

pub async fn run(parts: Parts, settings: Settings) -> anyhow::Result<()> {
    if parts == Parts::KafkaIntake && !settings.kafka_enabled() {
        anyhow::bail!(
            "invalid configuration: RTPD_KAFKA_TOPICS: rtpd kafka-intake needs the topics to consume (and RTPD_KAFKA_BOOTSTRAP_SERVERS)"
        );
    }
    if settings.auth == AuthMode::None {
        tracing::warn!("RTPD_AUTH=none: the API accepts unauthenticated requests");
    }
    let auth = if parts.api() {
        Auth::from_settings(&settings)?
    } else {
        // The processor's health server: /metrics and /status are for operators.
        let auth = Auth::operators(&settings)?;
        if auth.is_enabled()
            && !settings.public_metrics
            && settings.admin_tokens.is_none()
            && settings.admin_tokens_file.is_none()
        {
            tracing::warn!(
                "no RTPD_ADMIN_TOKENS or RTPD_ADMIN_TOKENS_FILE: /metrics and /status answer 401 to everyone"
            );
        }
        auth
    };
    run_with(parts, settings, auth, None).await
}

/// How often at most the ledger gauges are read between scrapes (more often
/// when `OTEL_METRIC_EXPORT_INTERVAL` is shorter).
const LEDGER_GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the parts; `ready` hears the API's port once it is bound.
pub async fn run_with(
    parts: Parts,
    settings: Settings,
    auth: Auth,
    ready: Option<tokio::sync::oneshot::Sender<u16>>,
) -> anyhow::Result<()> {
    let services = Arc::new(Services::build(&settings).await?);
    services.describe();
    services.rebuild_ledger_at_start().await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks: JoinSet<anyhow::Result<&'static str>> = JoinSet::new();
    let mut api_handle = None;

    // Rotated credential files apply without a restart (polled, and on SIGHUP).
    let credentials = auth
        .watch(
            Settings::secs(settings.credentials_poll_secs),
            stop_rx.clone(),
        )
        .context("installing the SIGHUP handler")?;
    tasks.spawn(async move {
        credentials.await;
        Ok("credential watcher")
    });

    // Ledger gauges (state counts, oldest pending age) for the OTLP export.
    // Only then: a Prometheus scrape reads the ledger itself, and with
    // neither nobody would read what this task polls.
    if crate::metrics::exported_over_otlp() {
        let (ledger, stop) = (services.ledger.clone(), stop_rx.clone());
        tasks.spawn(async move {
            let every = crate::telemetry::otlp::metric_export_interval().min(LEDGER_GAUGES_EVERY);
            crate::metrics::watch_ledger(ledger, every, stop).await;
            Ok("ledger gauges")
        });
    }

    if parts.kafka(&settings) {
        #[cfg(feature = "kafka")]
        {
            let (intake, journal, stop) =
                (services.intake(), services.journal.clone(), stop_rx.clone());
            let settings = settings.clone();
            tasks.spawn(async move {
                crate::kafka::run(intake, journal, &settings, stop).await?;
                Ok("kafka intake")
            });
        }
    }
    // Where the console finds the reconciler's last pass (when it runs here).
    let mut observed = None;
    if parts.api() || matches!(parts, Parts::Processor | Parts::KafkaIntake) {
        let app = if parts.api() {
            let state = services.api_state(auth);
            observed = state.console.as_ref().map(|c| c.console.observed.clone());
            Application::build(state)?
        } else {
            Application::build_health_only(services.api_state(auth))?
        };
        tracing::info!(addr = %settings.http_addr, port = app.port(), "API listening");
        if let Some(tx) = ready {
            let _ = tx.send(app.port());
        }
        api_handle = Some(app.handle());
        tasks.spawn(async move {
            app.run_until_stopped().await.context("API server")?;
            Ok("api")
        });
    }
    // Notices a dependency returning; a process with the processor re-drives at once.
    let watch = services.recovery_watch(parts.processor());
    let stop = stop_rx.clone();
    tasks.spawn(async move {
        recovery::watch_dependencies(watch, stop).await;
        Ok("recovery watcher")
    });
    if parts.processor() {
        let p = Arc::new(services.processor()?);
        let concurrency = settings.processor_concurrency;
        tracing::info!(
            concurrency,
            downstream = %crate::downstream::shown_url(&settings.downstream_url),
            "processor started"
        );
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            processor::run(p, concurrency, stop, GRACE).await?;
            Ok("processor")
        });
        let reconciler = Arc::new(services.reconciler());
        let stop = stop_rx.clone();
        let periodic = reconcile::Periodic {
            interval: Settings::secs(settings.reconcile_interval_secs),
            lookback: Settings::secs(settings.reconcile_lookback_secs),
            pending_after: Settings::secs(settings.reconcile_pending_after_secs),
            rate_per_sec: 500,
        };
        let published = observed
            .as_ref()
            .map(|o| o.reconciler.clone())
            .unwrap_or_default();
        tasks.spawn(async move {
            reconcile::run_periodically_publishing(reconciler, periodic, stop, published).await;
            Ok("reconciler")
        });
    }

    let early = tokio::select! {
        _ = super::shutdown_signal() => None,
        r = tasks.join_next() => r,
    };
    if let Some(r) = &early {
        match r {
            Ok(Ok(part)) => tracing::error!(part, "stopped unexpectedly"),
            Ok(Err(e)) => tracing::error!(error = ?e, "a part failed"),
            Err(e) => tracing::error!(error = %e, "a part panicked"),
        }
    } else {
        tracing::info!("stop signal received; shutting down");
    }
    let _ = stop_tx.send(true);
    if let Some(h) = api_handle {
        h.stop(true).await;
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = ?e, "part ended with an error during shutdown");
        }
    }
    tracing::info!("stopped");
    match early {
        Some(Ok(Err(e))) => Err(e),
        Some(_) => anyhow::bail!("a part of the service stopped unexpectedly"),
        None => Ok(()),
    }
}
