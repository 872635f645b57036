//! The client address of a request: what the limits per source address,
//! the vouching of an address and the `remote_addr` of records key on. It
//! is the TCP peer, unless the peer is a trusted proxy
//! (`RTPD_TRUSTED_PROXIES`, such as the Container Apps ingress): then the
//! address that proxy received the request from, from `X-Forwarded-For`.
//!
//! Each proxy appends the address it received the request from, so only
//! the entries added by trusted proxies can be believed: the client wrote
//! everything left of them. The walk goes from the right, past trusted
//! proxies, to the first address that is not one. An entry may carry a
//! port (`192.0.2.1:5678`, `[2001:db8::1]:443`, as Application Gateway
//! writes them); it is dropped. An entry that is not an address (`unknown`,
//! an empty one, garbage) ends the walk: the request is the proxy's, as if
//! the header were missing — never the client's choice.
//!
//! With `RTPD_TRUSTED_PROXY_HOPS` set (1 behind Container Apps' Envoy), the
//! client is the entry that many from the right, trusted or not: another
//! app inside the trusted range whose request passes through the proxy is
//! then named by the address the proxy appended, not by what it wrote
//! itself (the walk past trusted entries would skip its own address).
//!
//! Addresses are returned canonical: an IPv4-mapped IPv6 address is the
//! IPv4 address it maps. An untrusted peer that sends `X-Forwarded-For`
//! while proxies are listed is counted
//! (`rtpd_forwarded_for_ignored_total`): the proxy's address may have
//! moved out of the list.

use crate::config::TrustedProxies;
use actix_web::http::header::HeaderMap;
use std::net::{IpAddr, SocketAddr};

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The client address of a request from `peer` with `headers`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies, hops: u32) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    // Every occurrence of the header, in order, is one comma-separated list.
    let values: Vec<_> = headers.get_all(X_FORWARDED_FOR).collect();
    let mut entries = values
        .iter()
        .rev()
        .flat_map(|v| v.as_bytes().rsplit(|b| *b == b','));
    if hops > 0 {
        // The entry the outermost of `hops` proxies appended.
        return entries
            .nth(hops as usize - 1)
            .and_then(parse_entry)
            .unwrap_or(peer);
    }
    let mut leftmost = None;
    for entry in entries {
        let Some(ip) = parse_entry(entry) else {
            tracing::debug!(
                %peer,
                entry = %String::from_utf8_lossy(entry),
                "X-Forwarded-For entry is not an address: the proxy's address is the client's"
            );
            return peer;
        };
        if !trusted.contains(ip) {
            return ip;
        }
        leftmost = Some(ip);
    }
    // Only proxies (or no header): the one furthest from us.
    leftmost.unwrap_or(peer)
}

/// Whether a request from `peer` carries `X-Forwarded-For` that is not
/// believed although proxies are listed (counted once per request by the
/// guard: the proxy's address may have moved out of the list).
pub fn forwarded_by_untrusted(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> bool {
    !trusted.is_empty() && !trusted.contains(peer) && headers.contains_key(X_FORWARDED_FOR)
}

/// An address, with or without a port.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(s: &str) -> TrustedProxies {
        s.parse().unwrap()
    }

    fn forwarded(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                HeaderName::from_static(X_FORWARDED_FOR),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        headers
    }

    fn client(peer: &str, proxies: &str, values: &[&[u8]]) -> IpAddr {
        client_ip(ip(peer), &forwarded(values), &trusted(proxies), 0)
    }

    #[test]
    fn with_hops_the_entry_the_outermost_proxy_appended_is_the_client() {
        let proxies = trusted("10.0.0.0/8");
        let one = |values: &[&[u8]]| client_ip(ip("10.0.0.1"), &forwarded(values), &proxies, 1);
        // Another app inside the trusted range, through the proxy: named by
        // the address the proxy appended (the walk skipped it).
        assert_eq!(one(&[b"198.51.100.7, 10.5.5.5"]), ip("10.5.5.5"));
        assert_eq!(
            client("10.0.0.1", "10.0.0.0/8", &[b"198.51.100.7, 10.5.5.5"]),
            ip("198.51.100.7")
        );
        assert_eq!(one(&[b"203.0.113.66", b"198.51.100.7"]), ip("198.51.100.7"));
        // Too few entries, or not an address: the proxy's own.
        assert_eq!(one(&[]), ip("10.0.0.1"));
        assert_eq!(one(&[b"unknown"]), ip("10.0.0.1"));
        let two = client_ip(
            ip("10.0.0.1"),
            &forwarded(&[b"203.0.113.66, 198.51.100.7, 10.9.9.9"]),
            &proxies,
            2,
        );
        assert_eq!(two, ip("198.51.100.7"));
        // An untrusted peer is the client, hops or not.
        assert_eq!(
            client_ip(ip("192.0.2.1"), &forwarded(&[b"198.51.100.7"]), &proxies, 1),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn mapped_addresses_come_back_as_ipv4() {
        assert_eq!(client("::ffff:192.0.2.1", "", &[]), ip("192.0.2.1"));
        assert_eq!(
            client("::ffff:10.0.0.1", "10.0.0.0/8", &[b"::ffff:198.51.100.7"]),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        assert_eq!(client("192.0.2.1", "", &[b"198.51.100.7"]), ip("192.0.2.1"));
        assert_eq!(
            client("192.0.2.1", "10.0.0.0/8", &[b"198.51.100.7"]),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn a_trusted_peer_forwards_the_rightmost_untrusted_address() {
        let proxies = "10.0.0.0/8";
        assert_eq!(
            client("10.0.0.1", proxies, &[b"198.51.100.7"]),
            ip("198.51.100.7")
        );
        // The client wrote "203.0.113.66"; the proxy appended the real one.
        assert_eq!(
            client("10.0.0.1", proxies, &[b"203.0.113.66, 198.51.100.7"]),
            ip("198.51.100.7")
        );
        // Trusted proxies in the chain are skipped.
        assert_eq!(
            client(
                "10.0.0.1",
                proxies,
                &[b"203.0.113.66,198.51.100.7, 10.1.2.3"]
            ),
            ip("198.51.100.7")
        );
        // Several header lines are one list, in order.
        assert_eq!(
            client(
                "10.0.0.1",
                proxies,
                &[b"203.0.113.66", b"198.51.100.7, 10.1.2.3"]
            ),
            ip("198.51.100.7")
        );
        // Garbage the client wrote left of the real address is never read.
        assert_eq!(
            client("10.0.0.1", proxies, &[b"not an address,, 198.51.100.7"]),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn only_proxies_forwarded_means_the_leftmost_and_none_the_peer() {
        let proxies = "10.0.0.0/8";
        assert_eq!(
            client("10.0.0.1", proxies, &[b"10.9.9.9, 10.1.2.3"]),
            ip("10.9.9.9")
        );
        assert_eq!(client("10.0.0.1", proxies, &[]), ip("10.0.0.1"));
    }

    #[test]
    fn ipv6_peers_entries_and_ports() {
        let proxies = "fd00::/8, 10.0.0.0/8";
        assert_eq!(
            client("fd00::1", proxies, &[b"2001:db8::7"]),
            ip("2001:db8::7")
        );
        assert_eq!(
            client("fd00::1", proxies, &[b"[2001:db8::7]:443, fd00::2"]),
            ip("2001:db8::7")
        );
        assert_eq!(
            client("10.0.0.1", proxies, &[b"198.51.100.7:5678"]),
            ip("198.51.100.7")
        );
        // An IPv4 proxy seen by a dual-stack listener.
        assert_eq!(
            client("::ffff:10.0.0.1", proxies, &[b"198.51.100.7"]),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn garbage_where_the_client_should_be_means_the_peer() {
        let proxies = "10.0.0.0/8";
        for garbage in [
            &b"unknown"[..],
            b"198.51.100.7, unknown",
            b"198.51.100.7,",
            b"",
            b"fe80::1%eth0",
            b"[2001:db8::7]",
            b"198.51.100.7 10.1.2.3",
            b"\xff\xfe",
        ] {
            assert_eq!(
                client("10.0.0.1", proxies, &[garbage]),
                ip("10.0.0.1"),
                "{}",
                String::from_utf8_lossy(garbage)
            );
        }
    }
}
