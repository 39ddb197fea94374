//! The protocol between the agent and the output keeper: one unix `SOCK_SEQPACKET` socket,
//! `STATE/output/keeper.sock` (0600, root's, in the 0750 state directory; the keeper also
//! refuses any peer whose uid is not its own).
//!
//! Every message is one datagram: a 4-byte little-endian header length, a JSON header
//! ([`Request`] or [`Reply`]), then raw payload bytes (the output of a command). File
//! descriptors travel as `SCM_RIGHTS` on the datagram that names them. The agent sends one
//! request at a time and reads its replies before the next; [`Request::Release`] has no reply.
//!
//! Both sides hold every pipe's read end: the keeper reads it, the agent keeps a duplicate
//! so that a keeper that dies (or is told to stop) breaks no writer. When the agent meets a
//! new keeper it hands over what it holds ([`Request::Adopt`]); after an agent restart it
//! takes duplicates of what the keeper holds ([`Request::Held`]). A pipe is named by its
//! inode, the same in every process that holds it.
//!
//! [`PROTOCOL`] is sent in the hello: a new agent talks to a keeper started by an older one
//! (that is what keeps daemons' output flowing across an upgrade), so a change to these
//! messages must stay readable by both sides.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use super::rotate::Limits;

/// The protocol version in [`Request::Hello`] and [`Reply::Hello`].
pub const PROTOCOL: u32 = 1;
/// Largest payload of one datagram; longer output comes in several [`Reply::Output`]s.
pub const MAX_PAYLOAD: usize = 60 * 1024;
/// Largest datagram (header and payload).
pub const MAX_MSG: usize = 64 * 1024 + MAX_PAYLOAD;
/// Most descriptors attached to one datagram.
pub const MAX_FDS: usize = 32;

/// A pipe read end handed from one side to the other (its descriptor travels beside it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldPipe {
    /// The pipe's inode.
    pub pipe: u64,
    pub stem: String,
    pub stream: super::record::Stream,
}

/// Agent to keeper.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Request {
    /// First message of a connection: the settings the keeper applies from now on.
    Hello {
        protocol: u32,
        limits: Limits,
        /// Bytes of a command's output kept for its result (`store.max_output_bytes`).
        tail_bytes: usize,
    },
    /// A command is about to run: write `header` to the output file of `stem`, and answer
    /// [`Reply::Opened`] with the write ends of two new pipes (stdout, stderr) attached, then
    /// duplicates of their read ends (for the agent to hold).
    /// With `tail`, the last `tail_bytes` the command writes are kept for
    /// [`Request::Collect`] until [`Request::Release`] (or until this connection closes).
    Open {
        stem: String,
        header: String,
        tail: bool,
    },
    /// Read what the capture's pipes hold right now (never waiting for more, never for
    /// their end), then answer its kept output.
    Collect { id: u64 },
    /// The agent no longer needs the capture's output (no reply).
    Release { id: u64 },
    /// Read these pipes too (their read ends attached, in order); pipes already read are
    /// ignored. No reply.
    Adopt { pipes: Vec<HeldPipe> },
    /// Answer [`Reply::Holding`]s with duplicates of every pipe read end the keeper holds.
    Held,
    /// Counters, for the agent's health and the tests.
    Status,
}

/// Keeper to agent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        protocol: u32,
        pid: u32,
    },
    Opened {
        id: u64,
        /// The inodes of the stdout and stderr pipes.
        pipes: [u64; 2],
    },
    /// A part of the keeper's pipes (their read ends attached, in order).
    Holding {
        pipes: Vec<HeldPipe>,
        more: bool,
    },
    /// A part of a capture's kept output (the payload); `total` is every byte the capture
    /// carried, `more` says another part follows.
    Output {
        id: u64,
        total: u64,
        more: bool,
    },
    Status {
        pid: u32,
        streams: usize,
        files: usize,
        captures: usize,
        connections: usize,
    },
    Error {
        message: String,
    },
}

/// Send one message with `fds` attached.
pub fn send<T: serde::Serialize>(
    sock: BorrowedFd<'_>,
    header: &T,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let head = serde_json::to_vec(header).map_err(io::Error::other)?;
    let mut msg = Vec::with_capacity(4 + head.len() + payload.len());
    msg.extend_from_slice(&(head.len() as u32).to_le_bytes());
    msg.extend_from_slice(&head);
    msg.extend_from_slice(payload);
    if msg.len() > MAX_MSG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message too large",
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[io::IoSlice::new(&msg)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if n != msg.len() {
        return Err(io::Error::other("short send"));
    }
    Ok(())
}

/// One received message.
pub struct Received<T> {
    pub header: T,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Receive one message; `Ok(None)` at the end of the connection. With `nonblocking`,
/// `WouldBlock` says nothing is waiting.
pub fn recv<T: serde::de::DeserializeOwned>(
    sock: BorrowedFd<'_>,
    nonblocking: bool,
) -> io::Result<Option<Received<T>>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if nonblocking {
        flags |= RecvFlags::DONTWAIT;
    }
    let got = rustix::net::recvmsg(
        sock,
        &mut [io::IoSliceMut::new(&mut buf)],
        &mut control,
        flags,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if got.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if got
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message truncated",
        ));
    }
    let data = &buf[..got.bytes];
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed message");
    let len_bytes: [u8; 4] = data
        .get(..4)
        .ok_or_else(bad)?
        .try_into()
        .map_err(|_| bad())?;
    let hlen = u32::from_le_bytes(len_bytes) as usize;
    let head = data.get(4..4 + hlen).ok_or_else(bad)?;
    let header =
        serde_json::from_slice(head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(Received {
        header,
        payload: data[4 + hlen..].to_vec(),
        fds,
    }))
}

/// A connected pair of sockets (tests).
#[cfg(test)]
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Borrow a list of owned descriptors.
pub fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn messages_carry_payloads_and_descriptors() {
        let (a, b) = pair().unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        send(
            a.as_fd(),
            &Reply::Opened {
                id: 7,
                pipes: [1, 2],
            },
            b"payload",
            &[w.as_fd()],
        )
        .unwrap();
        drop(w);
        let got: Received<Reply> = recv(b.as_fd(), false).unwrap().unwrap();
        assert_eq!(
            got.header,
            Reply::Opened {
                id: 7,
                pipes: [1, 2]
            }
        );
        assert_eq!(got.payload, b"payload");
        assert_eq!(got.fds.len(), 1);
        // The received descriptor is the pipe's write end.
        let mut wf = std::fs::File::from(got.fds.into_iter().next().unwrap());
        wf.write_all(b"through").unwrap();
        drop(wf);
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "through");
        // Nothing waiting, then the end of the connection.
        let e = recv::<Reply>(b.as_fd(), true).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert!(recv::<Reply>(b.as_fd(), false).unwrap().is_none());
    }

    #[test]
    fn oversized_and_malformed_messages_are_refused() {
        let (a, b) = pair().unwrap();
        let big = vec![0u8; MAX_MSG];
        assert!(send(a.as_fd(), &Request::Status, &big, &[]).is_err());
        rustix::net::send(&a, b"\x05\x00\x00\x00{", SendFlags::empty()).unwrap();
        let e = recv::<Request>(b.as_fd(), false).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
