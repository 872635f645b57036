//! Standalone Service Bus test broker, for the Python conformance suite and
//! manual runs. Prints `listening on 127.0.0.1:PORT` once ready.
//!
//! With `--control`, reads one command per line on standard input and answers
//! each with one line (`ok ...` or `error ...`):
//!
//! ```text
//! create-queue NAME
//! reject-transfers COUNT CONDITION      e.g. reject-transfers 2 com.microsoft:server-busy
//! fail-management COUNT STATUS          e.g. fail-management 1 503
//! clear-faults                          drop injected faults not used up yet
//! hold-transfers COUNT                  take the next sends and never answer them
//! deliver-at-drain COUNT                hold messages until the next drains, send them just before the answer
//! ignore-drains COUNT                   never answer the next drains
//! refuse-attaches COUNT CONDITION       refuse the next attaches to a queue with CONDITION
//! ignore-attaches COUNT                 never answer the next attaches to a queue
//! detach all|sender|receiver|management|cbs
//! drop-connections
//! revoke-tokens                         forget every token, as if all had expired
//! connections                           answers `ok N`: connections accepted so far
//! counts QUEUE                          answers `ok ACTIVE DEAD_LETTERED`
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sb_test_broker::{BrokerConfig, BrokerHandle, LinkKind, Rights, SasRule};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(about = "AMQP 1.0 test broker behaving like Azure Service Bus")]
struct Opts {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 5672)]
    port: u16,
    /// Queue to create at start (repeatable).
    #[arg(long = "queue")]
    queues: Vec<String>,
    /// Create unknown queues on first use (Service Bus refuses them: `amqp:not-found`).
    #[arg(long)]
    auto_create_queues: bool,
    #[arg(long, default_value_t = 30)]
    lock_duration_secs: u64,
    #[arg(long, default_value_t = 10)]
    max_delivery_count: u32,
    #[arg(long, default_value_t = 600)]
    duplicate_window_secs: u64,
    /// Key of RootManageSharedAccessKey; turns on token checks (signature,
    /// expiry, audience, rights) for every link.
    #[arg(long)]
    sas_key: Option<String>,
    /// Another policy, `NAME:KEY:RIGHTS` with rights from send,listen,manage
    /// (repeatable), e.g. `sender:k1:send`.
    #[arg(long = "sas-rule")]
    sas_rules: Vec<String>,
    /// Token audiences must name this host.
    #[arg(long)]
    namespace: Option<String>,
    /// TLS on connect with a generated test CA; a cleartext AMQP header is refused.
    #[arg(long)]
    tls: bool,
    /// With --tls: write the test CA's certificate (PEM) here.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Serve AMQP over WebSockets on `/$servicebus/websocket`.
    #[arg(long)]
    websockets: bool,
    #[arg(long, default_value_t = 65_536)]
    max_frame_size: u32,
    #[arg(long, default_value_t = 120.0)]
    idle_time_out_secs: f64,
    /// Force-detach links idle this long (Service Bus: 600).
    #[arg(long, default_value_t = 600.0)]
    link_idle_timeout_secs: f64,
    /// Close connections without links after this long (Service Bus: 60).
    #[arg(long, default_value_t = 60.0)]
    connection_idle_timeout_secs: f64,
    #[arg(long, default_value_t = 256 * 1024)]
    max_message_size: u64,
    /// Added to the times the broker reports (lock expiry, enqueue time).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    clock_offset_ms: i64,
    /// Hold every frame the broker writes this long (a long round trip).
    #[arg(long, default_value_t = 0)]
    write_delay_ms: u64,
    /// Read control commands on standard input (see the binary's doc).
    #[arg(long)]
    control: bool,
}

fn rule(spec: &str) -> Result<SasRule, String> {
    let mut parts = spec.splitn(3, ':');
    let (Some(name), Some(key), Some(rights)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("--sas-rule {spec:?}: expected NAME:KEY:RIGHTS"));
    };
    let has = |r: &str| rights.split(',').any(|x| x.trim().eq_ignore_ascii_case(r));
    Ok(SasRule {
        name: name.into(),
        key: key.into(),
        rights: Rights {
            send: has("send"),
            listen: has("listen"),
            manage: has("manage"),
        },
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn command(broker: &BrokerHandle, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| -> Result<usize, String> {
        words
            .get(i)
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("expected a number in {line:?}"))
    };
    match words.as_slice() {
        ["create-queue", name] => {
            broker.create_queue(name);
            Ok(String::new())
        }
        ["reject-transfers", _, condition] => {
            broker.reject_next_transfers(number(1)?, condition);
            Ok(String::new())
        }
        ["clear-faults"] => {
            broker.clear_faults();
            Ok(String::new())
        }
        ["hold-transfers", _] => {
            broker.hold_next_transfers(number(1)?);
            Ok(String::new())
        }
        ["deliver-at-drain", _] => {
            broker.deliver_at_next_drains(number(1)?);
            Ok(String::new())
        }
        ["ignore-drains", _] => {
            broker.ignore_next_drains(number(1)?);
            Ok(String::new())
        }
        ["ignore-attaches", _] => {
            broker.ignore_next_attaches(number(1)?);
            Ok(String::new())
        }
        ["refuse-attaches", _, condition] => {
            broker.refuse_next_attaches(number(1)?, condition);
            Ok(String::new())
        }
        ["fail-management", _, _] => {
            let status = i32::try_from(number(2)?).map_err(|e| e.to_string())?;
            broker.fail_next_management(number(1)?, status);
            Ok(String::new())
        }
        ["detach", kind] => {
            let kind = match *kind {
                "all" => None,
                "sender" => Some(LinkKind::Sender),
                "receiver" => Some(LinkKind::Receiver),
                "management" => Some(LinkKind::Management),
                "cbs" => Some(LinkKind::Cbs),
                other => return Err(format!("unknown link kind {other}")),
            };
            broker.force_detach(kind);
            Ok(String::new())
        }
        ["drop-connections"] => {
            broker.drop_connections();
            Ok(String::new())
        }
        ["connections"] => Ok(format!(" {}", broker.connections())),
        ["revoke-tokens"] => {
            broker.revoke_tokens();
            Ok(String::new())
        }
        ["counts", queue] => {
            let (active, dead) = broker.counts(queue);
            Ok(format!(" {active} {dead}"))
        }
        _ => Err(format!("unknown command {line:?}")),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let opts = Opts::parse();
    let sas_rules = opts
        .sas_rules
        .iter()
        .map(|r| rule(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    let config = BrokerConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], opts.port)),
        queues: opts.queues,
        auto_create_queues: opts.auto_create_queues,
        lock_duration: Duration::from_secs(opts.lock_duration_secs),
        max_delivery_count: opts.max_delivery_count,
        duplicate_window: Duration::from_secs(opts.duplicate_window_secs),
        sas_key: opts.sas_key,
        sas_rules,
        namespace: opts.namespace,
        tls: opts.tls,
        websockets: opts.websockets,
        max_frame_size: opts.max_frame_size,
        idle_time_out: secs(opts.idle_time_out_secs),
        link_idle_timeout: secs(opts.link_idle_timeout_secs),
        connection_idle_timeout: secs(opts.connection_idle_timeout_secs),
        max_message_size: opts.max_message_size,
        clock_offset_ms: opts.clock_offset_ms,
        write_delay: std::time::Duration::from_millis(opts.write_delay_ms),
    };
    let broker = sb_test_broker::start(config).await?;
    if let (Some(path), Some(pem)) = (&opts.ca_file, broker.ca_pem()) {
        std::fs::write(path, pem)?;
    }
    println!("listening on {}", broker.addr());
    if opts.control {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            tokio::select! {
                line = lines.next_line() => match line? {
                    Some(line) if line.trim().is_empty() => {}
                    Some(line) => match command(&broker, line.trim()) {
                        Ok(extra) => println!("ok{extra}"),
                        Err(e) => println!("error {e}"),
                    },
                    None => break,
                },
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    } else {
        tokio::signal::ctrl_c().await?;
    }
    broker.shutdown();
    Ok(())
}
