//! The standalone broker binary as its users drive it (the Python
//! conformance suite, the fault campaign, `scripts/bench.sh`): it announces
//! its address, accepts connections there, answers the control protocol on
//! standard input, and exits when standard input closes.
//!
//! Building this test also builds the binary with the test build's features,
//! so `scripts/test.sh` needs no separate `cargo build` for it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_binary_announces_its_address_and_answers_the_control_protocol() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sb-test-broker"))
        .args(["--port", "0", "--queue", "q", "--control"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sb-test-broker");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut next = move || {
        line.clear();
        stdout
            .read_line(&mut line)
            .expect("read the broker's answer");
        line.trim_end().to_owned()
    };

    let first = next();
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line {first:?}"));
    let conn = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
        .expect("the announced address accepts connections");

    let mut ask = move |cmd: &str| {
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        next()
    };
    assert_eq!(ask("counts q"), "ok 0 0");
    assert_eq!(ask("create-queue r"), "ok");
    assert_eq!(ask("counts r"), "ok 0 0");
    let connections = ask("connections");
    let n: u64 = connections
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("connections answered {connections:?}"));
    assert!(n <= 1, "one TCP connection was made, the broker counts {n}");
    let refused = ask("frobnicate 3");
    assert!(
        refused.starts_with("error unknown command"),
        "an unknown command answered {refused:?}"
    );
    assert_eq!(ask("detach nothing"), "error unknown link kind nothing");
    drop(conn);

    drop(ask); // closes the broker's standard input
    let status = child.wait().expect("wait for the broker");
    assert!(status.success(), "closing stdin ends the broker: {status}");
}

#[test]
fn a_malformed_policy_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_sb-test-broker"))
        .args(["--port", "0", "--sas-rule", "no-key-here"])
        .stdin(Stdio::null())
        .output()
        .expect("run sb-test-broker");
    assert!(
        !out.status.success(),
        "a policy without a key started the broker"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "it announced an address anyway"
    );
}
