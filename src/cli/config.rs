//! `rtpd config`: the effective configuration, secrets redacted.

use crate::config::{ENV_NAMES, Settings};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Print only the names of the environment variables rtpd reads
    #[arg(long)]
    pub env_names: bool,
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    if opts.env_names {
        for n in ENV_NAMES {
            println!("{n}");
        }
        return Ok(());
    }
    let s = Settings::load()?;
    print!("{}", s.to_redacted_toml());
    Ok(())
}
