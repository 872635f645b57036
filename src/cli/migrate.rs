//! `rtpd migrate`: bring the PostgreSQL ledger's schema up to date and exit
//! (the service also does it at start; this runs it alone, e.g. as a
//! deployment step with a more privileged role).

use crate::config::{LedgerKind, Settings};
use crate::ledger::postgres::{self, PostgresSettings, schema};
use anyhow::{Context, bail};

#[derive(Debug, clap::Args)]
pub struct Opts {}

pub async fn run(_opts: Opts) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    if settings.ledger != LedgerKind::Postgres {
        bail!(
            "RTPD_LEDGER is {:?}: only the postgres ledger has a schema to migrate",
            settings.ledger
        );
    }
    let done = postgres::migrate(&PostgresSettings::from_settings(&settings)?)
        .await
        .context("migrating the PostgreSQL ledger")?;
    if done.applied.is_empty() {
        println!(
            "ledger schema at version {} (this build: {}); nothing to apply",
            done.version,
            schema::latest()
        );
    } else {
        println!(
            "ledger schema at version {}; applied {:?}",
            done.version, done.applied
        );
    }
    Ok(())
}
