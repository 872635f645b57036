//! Schema migrations: embedded in the binary, numbered, applied in order,
//! each at most once. `rtpd_schema_migrations` records what was applied; the
//! whole run is one transaction under an advisory lock, so processes that
//! start together (API and processor) neither race nor half-apply, and a
//! second run changes nothing.
//!
//! A migration is never edited once released: a change is a new file.

use tokio_postgres::Client;

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "retry_budget_and_deadline",
        sql: include_str!("migrations/0002_retry_budget_and_deadline.sql"),
    },
    Migration {
        version: 3,
        name: "replay_withdrawn",
        sql: include_str!("migrations/0003_replay_withdrawn.sql"),
    },
];

/// The version this build brings the schema to.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Serializes migration runs of every rtpd on one database ("rtpd" in ASCII).
const LOCK_KEY: i64 = 0x7274_7064;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Versions applied by this run, in order.
    pub applied: Vec<i32>,
    /// The schema version after the run.
    pub version: i32,
}

/// Applies every migration not applied yet, in one transaction.
pub async fn migrate(client: &mut Client) -> Result<Applied, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS rtpd_schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM rtpd_schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO rtpd_schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        applied.push(m.version);
    }
    tx.commit().await?;
    let version = done.iter().chain(&applied).copied().max().unwrap_or(0);
    if version > latest() {
        tracing::warn!(
            version,
            known = latest(),
            "the ledger schema is newer than this rtpd build knows"
        );
    }
    Ok(Applied { applied, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_numbered_in_order_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty());
        }
    }
}
