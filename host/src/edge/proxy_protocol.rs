//! The PROXY protocol (HAProxy's, versions 1 and 2), for a listener behind
//! an L4 load balancer: the balancer opens each connection with a header
//! naming the client's address, which the gateway then uses as the client's
//! (forwarding headers, plugins, the access log, the crash-loop breaker).
//!
//! With `proxy_protocol = true` every connection must start with a valid
//! header, read before TLS and within `header_read_timeout_s`; anything else
//! is closed without an answer, so a client that reaches the listener
//! directly cannot claim an address. The header is read exactly (never a
//! byte of what follows) and parsed by the `ppp` crate.

use std::net::SocketAddr;

use ppp::HeaderResult;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature's first six bytes (the full signature is 12).
const V2_START: &[u8; 6] = b"\r\n\r\n\0\r";
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The longest v2 address block and TLVs the gateway reads.
const V2_MAX_LEN: usize = 4096;

/// Reads the header at the start of `stream` and returns the client's
/// address: the header's source for a proxied TCP connection, `peer` for a
/// `LOCAL` one (the balancer's own health check) or an unknown protocol.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S, peer: SocketAddr) -> Result<SocketAddr, String> {
    let mut header = vec![0u8; 6];
    stream.read_exact(&mut header).await.map_err(|e| format!("reading the PROXY header: {e}"))?;
    if header == b"PROXY " {
        // Version 1: a text line; read up to its LF, one byte at a time so
        // nothing after it is consumed.
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX {
                return Err("PROXY v1 header longer than 107 bytes".into());
            }
            header.push(stream.read_u8().await.map_err(|e| format!("reading the PROXY header: {e}"))?);
        }
    } else if header.as_slice() == V2_START {
        header.resize(16, 0);
        stream.read_exact(&mut header[6..]).await.map_err(|e| format!("reading the PROXY header: {e}"))?;
        let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
        if len > V2_MAX_LEN {
            return Err(format!("PROXY v2 header of {len} bytes"));
        }
        header.resize(16 + len, 0);
        stream.read_exact(&mut header[16..]).await.map_err(|e| format!("reading the PROXY header: {e}"))?;
    } else {
        return Err("the connection does not start with a PROXY protocol header".into());
    }
    client_address(&header, peer)
}

/// The client's address in a complete `header`.
fn client_address(header: &[u8], peer: SocketAddr) -> Result<SocketAddr, String> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(v1)) => Ok(match v1.addresses {
            ppp::v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
            ppp::v1::Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
            ppp::v1::Addresses::Unknown => peer,
        }),
        HeaderResult::V2(Ok(v2))
            if v2.command == ppp::v2::Command::Proxy && v2.protocol == ppp::v2::Protocol::Datagram =>
        {
            Err("a PROXY v2 header for a datagram, on a TCP connection".into())
        }
        HeaderResult::V2(Ok(v2)) => Ok(match (v2.command, v2.addresses) {
            (ppp::v2::Command::Local, _) => peer,
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                SocketAddr::from((a.source_address, a.source_port))
            }
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                SocketAddr::from((a.source_address, a.source_port))
            }
            (ppp::v2::Command::Proxy, _) => peer,
        }),
        HeaderResult::V1(Err(error)) => Err(format!("invalid PROXY v1 header: {error}")),
        HeaderResult::V2(Err(error)) => Err(format!("invalid PROXY v2 header: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.2:40000".parse().unwrap()
    }

    async fn read(bytes: &[u8]) -> (Result<SocketAddr, String>, Vec<u8>) {
        let mut stream = bytes;
        let address = read_header(&mut stream, peer()).await;
        (address, stream.to_vec())
    }

    fn v2(command: ppp::v2::Command, source: &str) -> Vec<u8> {
        let source: SocketAddr = source.parse().unwrap();
        let destination: SocketAddr =
            if source.is_ipv4() { "192.0.2.1:443" } else { "[2001:db8::1]:443" }.parse().unwrap();
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | command,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .write_tlv(ppp::v2::Type::NoOp, b"pad")
        .unwrap()
        .build()
        .unwrap()
    }

    #[tokio::test]
    async fn both_versions_give_the_source_and_leave_the_rest_unread() {
        let mut input = v2(ppp::v2::Command::Proxy, "203.0.113.7:5555");
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(read(&input).await, (Ok("203.0.113.7:5555".parse().unwrap()), b"GET / HTTP/1.1\r\n".to_vec()));
        let mut input = v2(ppp::v2::Command::Proxy, "[2001:db8::7]:5555");
        input.push(0x16);
        assert_eq!(read(&input).await, (Ok("[2001:db8::7]:5555".parse().unwrap()), vec![0x16]));
        let input = b"PROXY TCP4 198.51.100.9 192.0.2.1 6000 80\r\nGET";
        assert_eq!(read(input).await, (Ok("198.51.100.9:6000".parse().unwrap()), b"GET".to_vec()));
        let input = b"PROXY UNKNOWN\r\nx";
        assert_eq!(read(input).await, (Ok(peer()), b"x".to_vec()));
    }

    #[tokio::test]
    async fn a_local_header_is_the_balancer_itself() {
        let input = v2(ppp::v2::Command::Local, "203.0.113.7:5555");
        assert_eq!(read(&input).await.0, Ok(peer()));
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 not-an-address 192.0.2.1 6000 80\r\n",
            b"PROXY TCP4 198.51.100.9 192.0.2.1 6000 80",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c",
            b"\x16\x03\x01\x02\x00\x01",
            b"PRO",
        ] {
            assert!(read(bad).await.0.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let datagram = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Datagram,
            ("203.0.113.7:5555".parse::<SocketAddr>().unwrap(), "192.0.2.1:443".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap();
        assert!(read(&datagram).await.0.unwrap_err().contains("datagram"));
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        assert!(read(&long).await.0.unwrap_err().contains("longer than 107"));
        let mut huge = v2(ppp::v2::Command::Proxy, "203.0.113.7:5555")[..14].to_vec();
        huge.extend_from_slice(&[0xff, 0xff]);
        assert!(read(&huge).await.0.unwrap_err().contains("65535 bytes"));
    }
}
