//! The relay: after a WebSocket upgrade, bytes flow both ways untouched until
//! either side closes, or the gateway ends the connection.
//!
//! The relay never inspects, unmasks or re-frames payload. It does read each
//! frame's 2-14 byte header to know where the next frame starts, so that when
//! the gateway itself must end a connection (idle timeout, maximum lifetime,
//! its server turned unhealthy, shutdown drain) it can send each side a
//! proper Close frame *between* two frames — masked toward the server, as a
//! client would — instead of cutting TCP. A side that does not finish the
//! close within [`CLOSE_GRACE`] is cut.
//!
//! A side that closes its write half (EOF) has that half-close passed on, and
//! the other direction keeps flowing until it closes too.
//!
//! A server connection that fails (a reset, a read error) ends the relay
//! with a Close 1011 "backend connection lost" to the client, if its stream
//! is between frames.
//!
//! Every write is bounded: a peer that takes no bytes for the idle timeout
//! (it stopped reading) ends the relay, and a stop signal is noticed while a
//! write waits, so a stuck peer never holds the relay, its capacity slot
//! and its two sockets past the idle timeout or the drain.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// How long each side has to finish a close the gateway started.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Bytes read at a time, per direction.
const BUFFER: usize = 8 * 1024;

/// Limits on one relayed connection.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
}

/// Why the gateway ends a WebSocket, and the Close frame it sends for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    IdleTimeout,
    MaxLifetime,
    ServerUnhealthy,
    Shutdown,
    /// A reload removed the server or the listener.
    Removed,
    /// The server's connection failed (reset, error): the client is told,
    /// between frames, before its side is closed.
    ServerLost,
}

impl CloseReason {
    /// 1001 Going Away, with a reason naming the cause.
    pub fn code_and_text(self) -> (u16, &'static str) {
        match self {
            CloseReason::IdleTimeout => (1001, "idle timeout"),
            CloseReason::MaxLifetime => (1001, "maximum lifetime reached"),
            CloseReason::ServerUnhealthy => (1001, "server unhealthy"),
            CloseReason::Shutdown => (1001, "gateway shutting down"),
            CloseReason::Removed => (1001, "removed by a config reload"),
            CloseReason::ServerLost => (1011, "backend connection lost"),
        }
    }
}

/// How a relay ended, and what it carried.
#[derive(Debug)]
pub struct RelayEnd {
    pub cause: EndCause,
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Who ended a relayed WebSocket.
#[derive(Debug)]
pub enum EndCause {
    /// The client sent the first Close frame (or, without one, the first EOF).
    Client,
    /// The server did.
    Server,
    /// The gateway closed it (with Close frames) for this reason.
    Gateway(CloseReason),
    /// A socket failed.
    Error(io::Error),
}

impl EndCause {
    /// A short name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            EndCause::Client => "client",
            EndCause::Server => "server",
            EndCause::Gateway(CloseReason::IdleTimeout) => "idle",
            EndCause::Gateway(CloseReason::MaxLifetime) => "lifetime",
            EndCause::Gateway(CloseReason::ServerUnhealthy) => "unhealthy",
            EndCause::Gateway(CloseReason::Shutdown) => "drain",
            EndCause::Gateway(CloseReason::Removed) => "removed",
            EndCause::Gateway(CloseReason::ServerLost) => "error",
            EndCause::Error(_) => "error",
        }
    }
}

/// Which side of the relay.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// Where a byte stream is in its frames: the relay passes bytes through
/// unparsed and only follows frame headers, so a Close it makes goes
/// between two frames. Public for the fuzz targets (`fuzz/`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frames {
    /// Bytes of the current frame still to pass (header done).
    remaining: u64,
    /// A header seen in part.
    header: [u8; 14],
    have: usize,
    /// A Close frame's header went by.
    saw_close: bool,
}

impl Frames {
    /// Follows `data` through frame headers and payloads.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() as u64);
                self.remaining -= take;
                data = &data[take as usize..];
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have < 2 {
                continue;
            }
            let (len7, masked) = (self.header[1] & 0x7f, self.header[1] & 0x80 != 0);
            let extended = match len7 {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let header_len = 2 + extended + if masked { 4 } else { 0 };
            if self.have < header_len {
                continue;
            }
            self.saw_close |= self.header[0] & 0x0f == 0x8;
            self.remaining = match extended {
                0 => u64::from(len7),
                2 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                _ => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or_default()),
            };
            self.have = 0;
        }
    }

    /// True between two frames.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.have == 0
    }

    /// Whether a Close frame's header went by.
    pub fn saw_close(&self) -> bool {
        self.saw_close
    }
}

/// One direction of the relay.
#[derive(Default)]
struct Direction {
    frames: Frames,
    bytes: u64,
    /// The source sent EOF (and it was passed on).
    ended: bool,
    /// The gateway's Close went to the destination; later bytes are dropped.
    closed: bool,
}

impl Direction {
    /// Passes one read on to `to`: EOF becomes a half-close, bytes are
    /// followed through their frames and written (unless the gateway's Close
    /// already went that way). Writing is bounded by `ending`.
    async fn pass_on<W: AsyncWrite + Unpin, F: Future<Output = CloseReason>>(
        &mut self,
        read: io::Result<usize>,
        buf: &[u8],
        to: &mut W,
        last_activity: &mut Instant,
        ending: &mut Ending<'_, F>,
    ) -> io::Result<()> {
        match read? {
            0 => {
                self.ended = true;
                let _ = tokio::time::timeout(CLOSE_GRACE, to.shutdown()).await;
            }
            n => {
                *last_activity = Instant::now();
                self.bytes += n as u64;
                if !self.closed {
                    self.frames.feed(&buf[..n]);
                    ending.write(to, &buf[..n]).await?;
                }
            }
        }
        Ok(())
    }
}

/// How the gateway ends a relay: its stop signal, and once it fired (or a
/// limit was reached) the reason and since when.
struct Ending<'s, F> {
    stop: std::pin::Pin<&'s mut F>,
    closing: Option<(CloseReason, Instant)>,
    /// The gateway began closing before either peer had.
    gateway_first: bool,
    /// No peer has begun closing yet.
    peers_quiet: bool,
    idle_timeout: Duration,
}

impl<F: Future<Output = CloseReason>> Ending<'_, F> {
    /// The gateway begins closing, for `reason`.
    fn begin(&mut self, reason: CloseReason) {
        self.gateway_first = self.peers_quiet;
        self.closing = Some((reason, Instant::now()));
    }

    /// Writes all of `data` to `to`. A peer that takes none of it for the
    /// idle timeout (or, once closing, for what is left of the grace) is
    /// given up on (`TimedOut`); a stop signal arriving meanwhile is
    /// noted, and shortens the wait to the grace.
    async fn write<W: AsyncWrite + Unpin>(&mut self, to: &mut W, data: &[u8]) -> io::Result<()> {
        let write = to.write_all(data);
        tokio::pin!(write);
        let mut deadline = match self.closing {
            Some((_, since)) => since + CLOSE_GRACE,
            None => Instant::now() + self.idle_timeout,
        };
        loop {
            tokio::select! {
                written = &mut write => return written,
                reason = self.stop.as_mut(), if self.closing.is_none() => {
                    self.begin(reason);
                    deadline = deadline.min(Instant::now() + CLOSE_GRACE);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"));
                }
            }
        }
    }
}

/// How a relay ends on a failed write: a peer that stopped reading ends it
/// for the gateway's reason (the idle timeout, unless it was already
/// closing for another), anything else as `cause` says.
fn stuck_or(
    cause: impl Fn(Option<io::Error>) -> EndCause,
    error: io::Error,
    closing: Option<(CloseReason, Instant)>,
) -> EndCause {
    match (error.kind(), closing) {
        (io::ErrorKind::TimedOut, Some((reason, _))) => EndCause::Gateway(reason),
        (io::ErrorKind::TimedOut, None) => EndCause::Gateway(CloseReason::IdleTimeout),
        _ => cause(Some(error)),
    }
}

/// A Close frame: unmasked toward the client, masked toward the server.
fn close_frame(reason: CloseReason, masked: bool) -> Vec<u8> {
    let (code, text) = reason.code_and_text();
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(text.as_bytes());
    let mut frame = vec![0x88, payload.len() as u8 | if masked { 0x80 } else { 0 }];
    if masked {
        let mask = RandomState::new().hash_one(text).to_le_bytes();
        frame.extend_from_slice(&mask[..4]);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        frame.extend_from_slice(&payload);
    }
    frame
}

/// Relays between `client` and `server` until both close, a socket fails, or
/// the gateway ends it: idle for `idle_timeout`, `max_lifetime` reached, or
/// `stop` resolving with its reason.
pub async fn relay<C, S>(client: C, server: S, limits: RelayLimits, stop: impl Future<Output = CloseReason>) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut server_rd, mut server_wr) = tokio::io::split(server);
    let mut up = Direction::default(); // client → server
    let mut down = Direction::default(); // server → client
    let (mut up_buf, mut down_buf) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    let started = Instant::now();
    let mut last_activity = started;
    // Who sent the first Close frame, else the first EOF.
    let mut first: Option<Side> = None;
    tokio::pin!(stop);
    let mut ending =
        Ending { stop, closing: None, gateway_first: false, peers_quiet: true, idle_timeout: limits.idle_timeout };
    let end = |cause: EndCause, up: &Direction, down: &Direction| RelayEnd {
        cause,
        client_to_server: up.bytes,
        server_to_client: down.bytes,
    };

    loop {
        if first.is_none() {
            if up.frames.saw_close || (up.ended && !down.frames.saw_close) {
                first = Some(Side::Client);
            } else if down.frames.saw_close || down.ended {
                first = Some(Side::Server);
            }
        }
        ending.peers_quiet = first.is_none();
        let (closing, gateway_first) = (ending.closing, ending.gateway_first);
        // Who ended it: a peer that started closing before the gateway did
        // keeps the credit.
        let cause = |error: Option<io::Error>| {
            let peer = first.filter(|_| closing.is_none() || !gateway_first);
            match (peer, closing, error) {
                (Some(Side::Client), _, _) => EndCause::Client,
                (Some(Side::Server), _, _) => EndCause::Server,
                (None, Some((reason, _)), _) => EndCause::Gateway(reason),
                (None, None, Some(error)) => EndCause::Error(error),
                (None, None, None) => EndCause::Server,
            }
        };
        if up.ended && down.ended {
            return end(cause(None), &up, &down);
        }
        // Deliver the gateway's Close on each side as soon as its stream is
        // between frames — unless that side already got a Close from its
        // peer, which must not be followed by a second one.
        if let Some((reason, _)) = closing {
            if !up.closed && up.frames.at_boundary() {
                up.closed = true;
                if !up.frames.saw_close {
                    let _ = ending.write(&mut server_wr, &close_frame(reason, true)).await;
                }
            }
            if !down.closed && down.frames.at_boundary() {
                down.closed = true;
                if !down.frames.saw_close {
                    let _ = ending.write(&mut client_wr, &close_frame(reason, false)).await;
                }
            }
        }
        let deadline = match closing {
            Some((_, since)) => since + CLOSE_GRACE,
            None => (last_activity + limits.idle_timeout).min(started + limits.max_lifetime),
        };
        tokio::select! {
            read = client_rd.read(&mut up_buf), if !up.ended => {
                if let Err(e) = up.pass_on(read, &up_buf, &mut server_wr, &mut last_activity, &mut ending).await {
                    return end(stuck_or(cause, e, ending.closing), &up, &down);
                }
            }
            read = server_rd.read(&mut down_buf), if !down.ended => {
                let lost = read.is_err();
                if let Err(e) = down.pass_on(read, &down_buf, &mut client_wr, &mut last_activity, &mut ending).await {
                    // The server's side failed (not the client's write): the
                    // client gets a Close 1011 if its stream is between frames.
                    if lost && !down.closed && !down.frames.saw_close && down.frames.at_boundary() {
                        let frame = close_frame(CloseReason::ServerLost, false);
                        let _ = tokio::time::timeout(CLOSE_GRACE, client_wr.write_all(&frame)).await;
                    }
                    return end(stuck_or(cause, e, ending.closing), &up, &down);
                }
            }
            reason = ending.stop.as_mut(), if closing.is_none() => ending.begin(reason),
            _ = tokio::time::sleep_until(deadline) => match closing {
                // The grace is over: cut what is left.
                Some(_) => return end(cause(None), &up, &down),
                None if Instant::now() >= started + limits.max_lifetime => ending.begin(CloseReason::MaxLifetime),
                None if Instant::now() >= last_activity + limits.idle_timeout => ending.begin(CloseReason::IdleTimeout),
                None => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => f.push(payload_len as u8 | mask_bit),
            126..=65535 => {
                f.push(126 | mask_bit);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(127 | mask_bit);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0xab, payload_len));
        f
    }

    #[test]
    fn frame_boundaries_are_found_across_any_split() {
        let stream: Vec<u8> = [frame(5, true), frame(300, false), frame(70_000, true), frame(0, false)].concat();
        // Byte by byte: exactly one boundary after each of the four frames.
        let mut frames = Frames::default();
        let mut boundaries = 0;
        for byte in stream.chunks(1) {
            frames.feed(byte);
            boundaries += usize::from(frames.at_boundary());
        }
        assert_eq!(boundaries, 4);
        // Any read size ends between frames at the end of the stream.
        for chunk in [2, 3, 7, 13, 4096] {
            let mut frames = Frames::default();
            for piece in stream.chunks(chunk) {
                frames.feed(piece);
            }
            assert!(frames.at_boundary(), "split into {chunk}-byte reads");
        }
        let mut frames = Frames::default();
        frames.feed(&stream[..10]);
        assert!(!frames.at_boundary(), "inside the second frame");
    }

    proptest::proptest! {
        /// For any valid frame stream cut into reads of any sizes, the
        /// tracker says "between frames" exactly at the frame boundaries:
        /// a gateway Close is never put inside a frame.
        #[test]
        fn the_tracker_finds_exactly_the_boundaries_for_any_split(
            frames in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        0usize..=125,
                        proptest::sample::select(vec![126usize, 127, 65_535, 65_536, 70_000]),
                    ],
                    proptest::bool::ANY,
                ),
                1..8,
            ),
            cuts in proptest::collection::vec(1usize..5000, 1..40),
        ) {
            let mut stream = Vec::new();
            let mut boundaries = std::collections::BTreeSet::from([0usize]);
            for (len, masked) in &frames {
                stream.extend(frame(*len, *masked));
                boundaries.insert(stream.len());
            }
            let mut tracker = Frames::default();
            let (mut at, mut cut) = (0usize, 0usize);
            while at < stream.len() {
                let take = cuts[cut % cuts.len()].min(stream.len() - at);
                cut += 1;
                tracker.feed(&stream[at..at + take]);
                at += take;
                proptest::prop_assert_eq!(tracker.at_boundary(), boundaries.contains(&at), "after {} bytes", at);
            }
        }
    }

    #[test]
    fn close_frames_are_valid_and_masked_toward_the_server() {
        let to_client = close_frame(CloseReason::IdleTimeout, false);
        assert_eq!(&to_client[..4], &[0x88, 14, 0x03, 0xe9]);
        assert_eq!(&to_client[4..], b"idle timeout");
        let to_server = close_frame(CloseReason::Shutdown, true);
        assert_eq!(to_server[0], 0x88);
        assert_eq!(to_server[1] & 0x80, 0x80);
        let mask = &to_server[2..6];
        let payload: Vec<u8> = to_server[6..].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        assert_eq!(&payload[..2], &1001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"gateway shutting down");
    }
}
