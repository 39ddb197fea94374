//! The host's TCP and UDP sockets as the kernel lists them through netlink `sock_diag`
//! (`NETLINK_SOCK_DIAG`, `INET_DIAG` requests for IPv4 and IPv6): each socket's inode and,
//! for TCP, the bytes it has moved (`tcp_info` `bytes_acked` and `bytes_received`, Linux
//! 4.1+, asked for with `INET_DIAG_INFO`).
//!
//! One [`dump`] is one snapshot of the network namespace the agent runs in; the sampler takes
//! one per pass and attributes the sockets to processes by inode ([`crate::nettally`]). The
//! messages are built and parsed by `netlink-packet-sock-diag`, and travel on a
//! `netlink-sys` socket; what this module adds is the request set, the receive loop (bounded
//! in time by a receive timeout and in size by [`MAX_SOCKETS`]) and reading the two counters
//! out of `tcp_info`, whose length changes with the kernel version (the fields are read by
//! their fixed offsets, so a kernel with a shorter or longer struct still reports them).

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// What the dump says about one socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockFigures {
    /// A TCP socket (else UDP).
    pub tcp: bool,
    /// Bytes sent and acknowledged by the peer (`tcpi_bytes_acked`, in which the kernel
    /// counts a connection's SYN and FIN as a byte each; 0 for UDP).
    pub sent: u64,
    /// Bytes received (`tcpi_bytes_received`; 0 for UDP).
    pub received: u64,
}

/// The sockets of one dump, by inode (sockets without one, such as TIME_WAIT or a
/// connection not yet accepted, are left out: no process holds them).
pub type SockTable = HashMap<u64, SockFigures>;

/// The most sockets one dump records; the rest of a larger dump is not read, so a pass costs
/// at most this much memory whatever the host holds.
pub const MAX_SOCKETS: usize = 1 << 20;

/// How long the dump waits for the kernel's next message before it gives up.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// Offsets of `tcpi_bytes_acked` and `tcpi_bytes_received` in `struct tcp_info`
/// (`include/uapi/linux/tcp.h`: 8 one-byte fields, 24 `u32`, then `pacing_rate` and
/// `max_pacing_rate` as `u64`).
const BYTES_ACKED_AT: usize = 120;
const BYTES_RECEIVED_AT: usize = 128;

/// `bytes_acked` and `bytes_received` of a `tcp_info` blob (native endian, as the kernel
/// writes it); `None` when it is too short to hold them (a kernel before 4.1).
pub fn tcp_bytes(info: &[u8]) -> Option<(u64, u64)> {
    let field = |at: usize| -> Option<u64> {
        let b: [u8; 8] = info.get(at..at + 8)?.try_into().ok()?;
        Some(u64::from_ne_bytes(b))
    };
    Some((field(BYTES_ACKED_AT)?, field(BYTES_RECEIVED_AT)?))
}

/// How a run of messages ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More messages are to come.
    More,
    /// The dump's `NLMSG_DONE`.
    Done,
}

/// Add the sockets of one received datagram (one or more netlink messages) to `table`.
/// An `NLMSG_ERROR` is returned as that errno; a message that does not parse is skipped
/// (the rest of the datagram is still read).
pub fn parse_datagram(mut buf: &[u8], tcp: bool, table: &mut SockTable) -> io::Result<Step> {
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("netlink message of {len} bytes in {} bytes", buf.len()),
            ));
        }
        let (msg, rest) = buf.split_at(len);
        // Messages are padded to 4 bytes.
        buf = rest.get(len.next_multiple_of(4) - len..).unwrap_or(&[]);
        match NetlinkMessage::<SockDiagMessage>::deserialize(msg).map(|m| m.payload) {
            Ok(NetlinkPayload::Done(_)) => return Ok(Step::Done),
            Ok(NetlinkPayload::Error(e)) => {
                return Err(match e.code {
                    Some(c) => io::Error::from_raw_os_error(-c.get()),
                    None => io::Error::other("unexpected netlink acknowledgement"),
                });
            }
            Ok(NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))) => {
                let inode = u64::from(r.header.inode);
                if inode == 0 || table.len() >= MAX_SOCKETS {
                    continue;
                }
                let (sent, received) = r
                    .nlas
                    .iter()
                    .find_map(|n| match n {
                        nlas::Nla::TcpInfo(info) => tcp_bytes(info),
                        _ => None,
                    })
                    .unwrap_or((0, 0));
                table.insert(
                    inode,
                    SockFigures {
                        tcp,
                        sent,
                        received,
                    },
                );
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "a sock_diag message that does not parse"),
        }
    }
    Ok(Step::More)
}

/// The request for every socket of `protocol` in `family`, with `tcp_info` for TCP.
fn request(family: u8, protocol: u8) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: if protocol == IPPROTO_TCP {
                ExtensionFlags::INFO
            } else {
                ExtensionFlags::empty()
            },
            states: StateFlags::all(),
            socket_id: if family == AF_INET6 {
                SocketId::new_v6()
            } else {
                SocketId::new_v4()
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// Dump the TCP and UDP sockets (IPv4 and IPv6) of the agent's network namespace: one
/// request each, on one netlink socket. Blocking (at most [`RECV_TIMEOUT`] per message):
/// run it off the async workers. A protocol the kernel has no diag module for (`udp_diag`
/// is often not loaded) is left out; failing to open the socket or a TCP dump is an error.
pub fn dump() -> io::Result<SockTable> {
    let sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.connect(&SocketAddr::new(0, 0))?;
    rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(RECV_TIMEOUT),
    )?;
    let mut table = SockTable::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (family, protocol) in [
        (AF_INET, IPPROTO_TCP),
        (AF_INET6, IPPROTO_TCP),
        (AF_INET, IPPROTO_UDP),
        (AF_INET6, IPPROTO_UDP),
    ] {
        let tcp = protocol == IPPROTO_TCP;
        sock.send(&request(family, protocol), 0)?;
        let got = loop {
            let n = sock.recv(&mut &mut buf[..], 0)?;
            match parse_datagram(&buf[..n.min(buf.len())], tcp, &mut table) {
                Ok(Step::More) if n > 0 => {}
                Ok(_) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        match got {
            Ok(()) => {}
            // The kernel refused it (NLMSG_ERROR): no diag module for UDP, or IPv6 is off.
            // No such sockets to report. Anything else ends the dump.
            Err(e) if e.raw_os_error().is_some() && (!tcp || family == AF_INET6) => {
                tracing::debug!(error = %e, family, protocol, "sock_diag dump refused");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_sock_diag::inet::{InetResponse, InetResponseHeader};

    fn info(acked: u64, received: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        if len >= 136 {
            v[120..128].copy_from_slice(&acked.to_ne_bytes());
            v[128..136].copy_from_slice(&received.to_ne_bytes());
        }
        v
    }

    fn response(inode: u32, tcp_info: Option<Vec<u8>>) -> Vec<u8> {
        let mut r = InetResponse {
            header: InetResponseHeader {
                family: AF_INET,
                state: 1,
                timer: None,
                socket_id: SocketId::new_v4(),
                recv_queue: 0,
                send_queue: 0,
                uid: 0,
                inode,
            },
            nlas: Default::default(),
        };
        if let Some(i) = tcp_info {
            r.nlas.push(nlas::Nla::TcpInfo(i));
        }
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            SockDiagMessage::InetResponse(Box::new(r)).into(),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn control(kind: u16, code: i32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&20u32.to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(&code.to_ne_bytes());
        v
    }

    #[test]
    fn tcp_info_counters_by_offset() {
        assert_eq!(tcp_bytes(&info(7, 9, 136)), Some((7, 9)));
        // A newer kernel's longer struct, and an older one's that stops before the fields.
        assert_eq!(tcp_bytes(&info(u64::MAX, 1, 280)), Some((u64::MAX, 1)));
        assert_eq!(tcp_bytes(&info(7, 9, 135)), None);
        assert_eq!(tcp_bytes(&[]), None);
    }

    #[test]
    fn datagrams_of_several_messages() {
        let mut dgram = response(11, Some(info(100, 200, 232)));
        dgram.extend(response(0, Some(info(5, 5, 232)))); // no inode: nobody holds it
        dgram.extend(response(12, Some(info(1, 2, 100)))); // tcp_info too short: 0, 0
        dgram.extend(response(13, None));
        let mut t = SockTable::new();
        assert_eq!(parse_datagram(&dgram, true, &mut t).unwrap(), Step::More);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[&11],
            SockFigures {
                tcp: true,
                sent: 100,
                received: 200
            }
        );
        assert_eq!((t[&12].sent, t[&13].received), (0, 0));
        // UDP: counted as a socket, no bytes.
        let mut u = SockTable::new();
        let mut dgram = response(21, None);
        dgram.extend(control(3, 0)); // NLMSG_DONE
        dgram.extend(response(22, None)); // after DONE: not read
        assert_eq!(parse_datagram(&dgram, false, &mut u).unwrap(), Step::Done);
        assert_eq!(u.keys().copied().collect::<Vec<_>>(), vec![21]);
        assert!(!u[&21].tcp);
    }

    #[test]
    fn errors_and_garbage() {
        let mut t = SockTable::new();
        let e = parse_datagram(&control(2, -libc::ENOENT), false, &mut t).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // A length beyond the datagram, a length below a header.
        let mut bad = response(1, None);
        bad.truncate(bad.len() - 1);
        assert!(parse_datagram(&bad, true, &mut t).is_err());
        let mut short = response(1, None);
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_datagram(&short, true, &mut t).is_err());
        // A message of another kind is skipped; a tail shorter than a header is ignored.
        let mut other = control(1, 0); // NLMSG_NOOP
        other.extend(response(5, None));
        other.extend([0u8; 7]);
        assert_eq!(parse_datagram(&other, true, &mut t).unwrap(), Step::More);
        assert!(t.contains_key(&5));
        assert!(parse_datagram(&[], true, &mut t).is_ok());
    }

    /// A real dump sees a listening socket and a connection of this process, with the
    /// bytes that went over the connection.
    #[test]
    fn dump_sees_this_process_sockets() {
        use std::io::{Read, Write};
        use std::os::linux::fs::MetadataExt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut a, _) = l.accept().expect("accept");
        c.write_all(&[1u8; 10_000]).expect("write");
        let mut got = vec![0u8; 10_000];
        a.read_exact(&mut got).expect("read");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let ino = |fd: i32| {
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .expect("fd")
                .st_ino()
        };
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let t = dump().expect("sock_diag dump");
            let lt = t.get(&ino(l.as_raw_fd())).copied();
            let ct = t.get(&ino(c.as_raw_fd())).copied();
            let at = t.get(&ino(a.as_raw_fd())).copied();
            assert!(lt.is_some_and(|f| f.tcp), "listener {lt:?}");
            // bytes_acked counts the client's SYN as one byte.
            if ct.is_some_and(|f| f.sent == 10_001) && at.is_some_and(|f| f.received == 10_000) {
                // UDP only where the kernel has udp_diag.
                if let Some(uf) = t.get(&ino(u.as_raw_fd())) {
                    assert!(!uf.tcp);
                }
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "client {ct:?}, accepted {at:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
