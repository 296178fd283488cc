//! Spans: the record exporters take, how HTTP and PostgreSQL exchanges become spans, W3C trace
//! context, ids and clocks.
pub mod context;
pub mod http;
pub mod model;
pub mod postgres;

/// An address as span attributes write it (`192.0.2.1`, `2001:db8::1`). IPv4 is written by
/// hand: `Display` through `core::fmt` was a sixth of the instructions of turning a request
/// into its span (callgrind, `pipeline::replay_cost`).
pub fn ip_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::ip_text;

    #[test]
    fn writes_addresses_like_display() {
        for ip in [
            IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 99, 100, 255)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()),
        ] {
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    proptest! {
        #[test]
        fn every_ipv4_address_matches_display(bits: u32) {
            let ip = IpAddr::V4(Ipv4Addr::from(bits));
            prop_assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
