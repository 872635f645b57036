//! `rtpd replay ID…`: put transactions back to `pending` and re-enqueue them
//! from the WAL.

use crate::app::Services;
use crate::config::Settings;
use crate::replay::{ReplayRequest, Replayed, replay_one};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Transaction ids to replay
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Required to replay a transaction that already succeeded
    #[arg(long)]
    pub force: bool,
    /// Why (recorded in the outcome journal)
    #[arg(long)]
    pub reason: Option<String>,
    /// Who is replaying (default: $USER)
    #[arg(long)]
    pub operator: Option<String>,
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let svc = Services::build(&settings).await?;
    let req = ReplayRequest {
        force: opts.force,
        operator: opts
            .operator
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "operator".into()),
        reason: opts.reason.clone(),
    };
    let mut refused = 0;
    for id in &opts.ids {
        match replay_one(&svc, id, &req).await? {
            Replayed::Requeued { message_id, .. } => {
                println!("{id}: replayed as message {message_id}")
            }
            Replayed::Refused(r) => {
                refused += 1;
                println!(
                    "{id}: refused ({}{})",
                    r.status,
                    if r.status.is_terminal() {
                        "; use --force"
                    } else {
                        ""
                    }
                );
            }
            Replayed::NotFound => {
                refused += 1;
                println!("{id}: not found");
            }
        }
    }
    if refused > 0 {
        anyhow::bail!(
            "{refused} of {} transactions were not replayed",
            opts.ids.len()
        );
    }
    Ok(())
}
