//! rtp-durability: a durability layer for real-time payments.
//!
//! A vendor's transaction is written byte-exact to a write-ahead log ([`wal`]),
//! registered in a [`ledger`], and enqueued on a [`queue`]; the [`processor`]
//! calls the [`downstream`] payment service with an idempotency key and records
//! the outcome. [`services`] opens the adapters from the configuration and
//! hands each flow the ports it uses; the binary `rtpd` only runs them.

pub mod api;
pub mod app;
pub mod auth;
pub mod azure;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod downstream;
pub mod envelope;
pub mod intake;
pub mod journal;
pub mod kafka;
pub mod ledger;
pub mod metrics;
pub mod mock_downstream;
pub mod processor;
pub mod queue;
pub mod reconcile;
pub mod recovery;
pub mod replay;
pub mod resend;
pub mod services;
pub mod sqlite;
pub mod telemetry;
pub mod trace_context;
pub mod transaction;
pub mod validate;
pub mod wal;
