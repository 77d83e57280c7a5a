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
//!
//! An idle relay holds no buffer. The relay is one hand-polled future: a
//! read borrows the worker thread's buffer only while it runs, and what is
//! read is written on in the same poll; only bytes a destination does not
//! take at once are copied into a spill of their own, freed once written
//! (and while one waits, that direction reads no more). One timer serves
//! every deadline and is reset only when the nearest one moves earlier or
//! passes, so a busy relay touches the timer wheel no more than an idle one.

use std::cell::RefCell;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::splice::{self, SpliceError, Spliced};
use crate::shutdown::{Stop, StopCause};

/// How long each side has to finish a close the gateway started.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Bytes read at a time, into the worker thread's buffer. Also the most a
/// stalled direction spills (beyond what hyper read with the handshake,
/// [`Relay::read_before`]): a peer that stops reading holds at most this
/// much of the gateway's memory until the idle timeout cuts it.
const READ_SIZE: usize = 16 * 1024;

/// Reads one direction makes in a turn before the relay lets other tasks run.
const READS_PER_TURN: usize = 16;

/// Between two plain TCP sockets, a frame whose payload has more than this
/// left is passed on by splice(2), at most [`SPLICE_SIZE`] a time; smaller
/// ones are cheaper to copy.
const SPLICE_FROM: u64 = READ_SIZE as u64;

/// Bytes spliced at a time: a read's size, so that what a stalled
/// destination does not take (read back into the spill) stays within what
/// a copied read would leave there. A bigger pipe measured no cheaper.
const SPLICE_SIZE: u64 = READ_SIZE as u64;

/// Limits on one relayed connection.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// In milliseconds (four bytes each: every WebSocket keeps these).
    idle_timeout_ms: u32,
    max_lifetime_ms: u32,
    /// Splice bulk payload between plain TCP sockets (`[websocket] splice`).
    pub splice: bool,
}

impl RelayLimits {
    /// Limits of at most 30 days each (config validation's bound; longer
    /// ones are cut to 49 days).
    pub fn new(idle_timeout: Duration, max_lifetime: Duration, splice: bool) -> RelayLimits {
        let ms = |limit: Duration| u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
        RelayLimits { idle_timeout_ms: ms(idle_timeout), max_lifetime_ms: ms(max_lifetime), splice }
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.into())
    }

    pub fn max_lifetime(&self) -> Duration {
        Duration::from_millis(self.max_lifetime_ms.into())
    }
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

impl From<StopCause> for CloseReason {
    fn from(cause: StopCause) -> CloseReason {
        match cause {
            StopCause::Shutdown => CloseReason::Shutdown,
            StopCause::Removed => CloseReason::Removed,
            StopCause::ServerUnhealthy => CloseReason::ServerUnhealthy,
        }
    }
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
    /// From the relay's start to its end.
    pub lasted: Duration,
    pub client_to_server: u64,
    pub server_to_client: u64,
    /// Of both directions' bytes, those spliced (never in user space).
    pub spliced: u64,
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

/// A stream the relay moves bytes between, and the plain TCP socket under
/// it when there is one with nothing buffered above it: frame payload
/// between two such (with `splice` on) moves by splice(2), not through
/// user space.
pub trait Socket: AsyncRead + AsyncWrite + Unpin {
    /// The socket, when reads and writes of this stream are reads and
    /// writes of it, nothing buffered or transformed in between.
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Socket for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// A moment of a relay's life, in whole milliseconds since it started,
/// rounded up (a deadline counted from it is never early), plus one so
/// that `Option<Moment>` takes four bytes: every relay keeps several, and
/// four bytes are enough, since a relay ends within its maximum lifetime
/// (at most 30 days) and [`CLOSE_GRACE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Moment(NonZeroU32);

/// The relay's start, which its [`Moment`]s count from.
#[derive(Debug, Clone, Copy)]
struct Clock {
    started: Instant,
}

impl Clock {
    /// The moment it is now.
    fn now(self) -> Moment {
        self.moment(Instant::now())
    }

    /// `at` as a moment (the start, if before it).
    fn moment(self, at: Instant) -> Moment {
        let ms = at.saturating_duration_since(self.started).as_nanos().div_ceil(1_000_000);
        let ms = u32::try_from(ms).unwrap_or(u32::MAX - 1);
        Moment(NonZeroU32::MIN.saturating_add(ms))
    }

    /// When `moment` is.
    fn at(self, moment: Moment) -> Instant {
        self.started + Duration::from_millis(u64::from(moment.0.get() - 1))
    }
}

/// Where a byte stream is in its frames: the relay passes bytes through
/// unparsed and only follows frame headers, so a Close it makes goes
/// between two frames. Public for the fuzz targets (`fuzz/`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frames {
    /// Bytes of the current frame still to pass (header done).
    remaining: u64,
    /// A header seen in part (its first `have` bytes; at most 14).
    header: [u8; 14],
    have: u8,
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
            self.header[usize::from(self.have)] = data[0];
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
            let header_len: u8 = 2 + extended + if masked { 4 } else { 0 };
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
    /// Of `bytes`, those spliced.
    spliced: u64,
    /// Bytes read but not yet taken by the destination (and the gateway's
    /// Close frame, queued behind them). Allocated only while a write is
    /// stalled, and freed once written (boxed: a pointer's width in every
    /// idle relay).
    spill: Option<Box<Spill>>,
    /// Since when the destination takes none of the bytes waiting for it.
    stalled_since: Option<Moment>,
    /// Bytes went to the destination since its last flush.
    unflushed: bool,
    /// The source sent EOF at this moment; it is being passed on.
    eof: Option<Moment>,
    /// The source's EOF was passed on (or the grace to pass it on ran out).
    ended: bool,
    /// The gateway's Close went to the destination; later bytes are dropped.
    closed: bool,
}

/// Bytes waiting for a stalled destination.
struct Spill {
    data: Vec<u8>,
    at: usize,
}

/// Why a direction stopped moving bytes for good.
enum Failure {
    Read(io::Error),
    Write(io::Error),
}

/// How a direction's turn ended.
#[derive(PartialEq, Eq)]
enum Turn {
    /// Everything waits on a socket, whose wake-up is registered.
    Waiting,
    /// The turn's share of reads is spent with bytes still coming: the
    /// relay must be polled again.
    Busy,
}

/// What a direction's turn goes by.
#[derive(Clone, Copy)]
struct TurnSettings {
    /// Splicing is on.
    splice: bool,
    /// The destination's peer has sent its EOF, and the other direction
    /// has passed it on.
    destination_done: bool,
    clock: Clock,
}

/// A read borrows the worker thread's buffer for as long as it runs; no
/// connection owns one.
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_SIZE].into_boxed_slice());
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buffer) => f(&mut buffer),
        // Never nested in practice; a buffer of its own if it ever is.
        Err(_) => f(&mut vec![0; READ_SIZE]),
    })
}

impl Direction {
    /// The source sent EOF (whether or not it was passed on yet).
    fn saw_eof(&self) -> bool {
        self.eof.is_some() || self.ended
    }

    /// Queues `data` behind whatever waits for the destination.
    fn queue(&mut self, data: &[u8]) {
        match &mut self.spill {
            Some(spill) => spill.data.extend_from_slice(data),
            None => self.spill = Some(Box::new(Spill { data: data.to_vec(), at: 0 })),
        }
    }

    /// Moves bytes from `from` to `to` until both wait on their sockets or
    /// the turn's share of reads is spent: what waits for `to` first, then
    /// reads (into the thread's buffer) written on at once, the rest
    /// spilled. EOF is passed on as a half-close; bytes after the gateway's
    /// Close went that way are dropped (counted, not written).
    ///
    /// With `turn.splice`, a frame payload longer than one read is spliced
    /// between the two when both are plain TCP sockets.
    fn pump<R: Socket, W: Socket>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        turn: TurnSettings,
        last_activity: &mut Moment,
    ) -> Result<Turn, Failure> {
        let TurnSettings { splice, destination_done, clock } = turn;
        for _ in 0..READS_PER_TURN {
            if let Some(spill) = &mut self.spill {
                while spill.at < spill.data.len() {
                    match Pin::new(&mut *to).poll_write(cx, &spill.data[spill.at..]) {
                        Poll::Ready(Ok(0)) => return Err(Failure::Write(io::ErrorKind::WriteZero.into())),
                        Poll::Ready(Ok(n)) => {
                            spill.at += n;
                            self.stalled_since = None;
                            self.unflushed = true;
                        }
                        Poll::Ready(Err(e)) => return Err(Failure::Write(e)),
                        Poll::Pending => {
                            self.stalled_since.get_or_insert_with(|| clock.now());
                            return Ok(Turn::Waiting);
                        }
                    }
                }
                self.spill = None;
            }
            if self.ended {
                return Ok(Turn::Waiting);
            }
            if self.eof.is_some() {
                // A plain socket whose own EOF the other direction has
                // already passed on needs no shutdown: with both directions
                // over, the relay ends in this same poll and closes it, which
                // sends the same FIN after what is queued (its EOF was read,
                // so nothing is left unread and no reset goes out).
                let closes_anyway = destination_done && to.tcp().is_some();
                // Errors passing the EOF on are the peer's business; the
                // other direction goes on either way.
                if !closes_anyway && Pin::new(&mut *to).poll_shutdown(cx).is_pending() {
                    return Ok(Turn::Waiting);
                }
                self.ended = true;
                return Ok(Turn::Waiting);
            }
            if splice
                && !self.closed
                && self.frames.remaining > SPLICE_FROM
                && let (Some(source), Some(destination)) = (from.tcp(), to.tcp())
            {
                let len = self.frames.remaining.min(SPLICE_SIZE) as usize;
                match splice::splice(source.as_fd(), destination.as_fd(), len) {
                    Some(Ok(Spliced::Moved { moved, left })) => {
                        self.frames.remaining -= moved as u64;
                        self.bytes += moved as u64;
                        self.spliced += moved as u64;
                        *last_activity = clock.now();
                        if !left.is_empty() {
                            self.spill = Some(Box::new(Spill { data: left, at: 0 }));
                            self.stalled_since = Some(*last_activity);
                        }
                        continue;
                    }
                    Some(Ok(Spliced::Eof)) => {
                        self.eof = Some(clock.now());
                        continue;
                    }
                    Some(Err(SpliceError::Read(e))) => return Err(Failure::Read(e)),
                    Some(Err(SpliceError::Write(e))) => return Err(Failure::Write(e)),
                    // Nothing to splice now: the read below registers the
                    // wake-up (or takes what came meanwhile). No pipe: copy.
                    Some(Ok(Spliced::Nothing)) | None => {}
                }
            }
            let read = with_scratch(|buffer| {
                let mut buffer = ReadBuf::new(buffer);
                match Pin::new(&mut *from).poll_read(cx, &mut buffer) {
                    Poll::Pending => return Ok(None),
                    Poll::Ready(Err(e)) => return Err(Failure::Read(e)),
                    Poll::Ready(Ok(())) => {}
                }
                let data = buffer.filled();
                self.bytes += data.len() as u64;
                if data.is_empty() || self.closed {
                    return Ok(Some(data.len()));
                }
                self.frames.feed(data);
                let mut at = 0;
                while at < data.len() {
                    match Pin::new(&mut *to).poll_write(cx, &data[at..]) {
                        Poll::Ready(Ok(0)) => return Err(Failure::Write(io::ErrorKind::WriteZero.into())),
                        Poll::Ready(Ok(n)) => at += n,
                        Poll::Ready(Err(e)) => return Err(Failure::Write(e)),
                        Poll::Pending => {
                            self.queue(&data[at..]);
                            self.stalled_since = Some(clock.now());
                            break;
                        }
                    }
                }
                self.unflushed = true;
                Ok(Some(data.len()))
            })?;
            match read {
                None => return self.flush(cx, to),
                Some(0) => self.eof = Some(clock.now()),
                Some(_) => *last_activity = clock.now(),
            }
        }
        Ok(Turn::Busy)
    }

    /// Flushes what went to `to` once nothing waits for it.
    fn flush<W: AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, to: &mut W) -> Result<Turn, Failure> {
        if self.unflushed && self.spill.is_none() {
            match Pin::new(&mut *to).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Err(Failure::Write(e)),
                Poll::Pending => {}
            }
        }
        Ok(Turn::Waiting)
    }
}

/// How the relay's polling ends.
enum Finish {
    /// The relay is over, for this cause.
    Done(EndCause),
    /// The server's connection failed between two frames toward the
    /// client: the client gets a Close 1011 first.
    ServerLost(io::Error),
}

/// A relay's whole state, polled as one future: both sockets, both
/// directions, the stop signal, and one timer reset only when the nearest
/// deadline moves earlier (or passes).
///
/// Every idle WebSocket keeps one, inside its session task, so its size is
/// memory per connection: with this relay (224 bytes in a release build)
/// the task's state is 480 bytes, which tokio's task cell holds in 640
/// bytes; past 536 the cell takes 768 (cells are rounded to 128 bytes,
/// with 104 of their own).
pub struct Relay<C, S> {
    client: C,
    server: S,
    up: Direction,
    down: Direction,
    clock: Clock,
    limits: RelayLimits,
    last_activity: Moment,
    /// Who sent the first Close frame, else the first EOF.
    first: Option<Side>,
    /// The gateway is closing since then, for `closing_reason`.
    closing_since: Option<Moment>,
    closing_reason: CloseReason,
    /// The stop signal fired: close for `stop_reason` at this moment.
    stop_at: Option<Moment>,
    stop_reason: CloseReason,
    /// The gateway began closing before either peer had.
    gateway_first: bool,
}

impl<C: Socket, S: Socket> Relay<C, S> {
    /// Since when the gateway is closing, and why.
    fn closing(&self) -> Option<(CloseReason, Instant)> {
        self.closing_since.map(|since| (self.closing_reason, self.clock.at(since)))
    }

    /// When the stop signal says to close, and why.
    fn stop_at(&self) -> Option<(CloseReason, Instant)> {
        self.stop_at.map(|at| (self.stop_reason, self.clock.at(at)))
    }

    fn note_first(&mut self) {
        if self.first.is_none() {
            if self.up.frames.saw_close || (self.up.saw_eof() && !self.down.frames.saw_close) {
                self.first = Some(Side::Client);
            } else if self.down.frames.saw_close || self.down.saw_eof() {
                self.first = Some(Side::Server);
            }
        }
    }

    /// The gateway begins closing, for `reason`.
    fn begin(&mut self, reason: CloseReason) {
        self.note_first();
        self.gateway_first = self.first.is_none();
        self.closing_since = Some(self.clock.now());
        self.closing_reason = reason;
    }

    /// Who ended it: a peer that started closing before the gateway did
    /// keeps the credit.
    fn cause(&self, error: Option<io::Error>) -> EndCause {
        let peer = self.first.filter(|_| self.closing().is_none() || !self.gateway_first);
        match (peer, self.closing(), error) {
            (Some(Side::Client), _, _) => EndCause::Client,
            (Some(Side::Server), _, _) => EndCause::Server,
            (None, Some((reason, _)), _) => EndCause::Gateway(reason),
            (None, None, Some(error)) => EndCause::Error(error),
            (None, None, None) => EndCause::Server,
        }
    }

    /// Queues the gateway's Close on each side whose stream is between
    /// frames — unless that side already got a Close from its peer, which
    /// must not be followed by a second one. True if one was queued.
    fn deliver_closes(&mut self) -> bool {
        let Some((reason, _)) = self.closing() else { return false };
        let mut queued = false;
        for (direction, masked) in [(&mut self.up, true), (&mut self.down, false)] {
            if !direction.closed && direction.frames.at_boundary() {
                direction.closed = true;
                if !direction.frames.saw_close && !direction.saw_eof() {
                    direction.queue(&close_frame(reason, masked));
                    queued = true;
                }
            }
        }
        queued
    }

    /// When the relay reaches its maximum lifetime.
    fn end_of_life(&self) -> Instant {
        self.clock.started + self.limits.max_lifetime()
    }

    /// When the relay is idle for its idle timeout, if nothing moves.
    fn idle_at(&self) -> Instant {
        self.clock.at(self.last_activity) + self.limits.idle_timeout()
    }

    /// The nearest moment something must happen.
    fn deadline(&self) -> Instant {
        let mut deadline = match self.closing() {
            Some((_, since)) => since + CLOSE_GRACE,
            None => {
                let deadline = self.idle_at().min(self.end_of_life());
                self.stop_at().map_or(deadline, |(_, at)| deadline.min(at))
            }
        };
        for direction in [&self.up, &self.down] {
            if let Some(since) = direction.stalled_since {
                deadline = deadline.min(self.clock.at(since) + self.limits.idle_timeout());
            }
            if let (Some(since), false) = (direction.eof, direction.ended) {
                deadline = deadline.min(self.clock.at(since) + CLOSE_GRACE);
            }
        }
        deadline
    }

    /// What a passed deadline means: the end, or a change of state.
    fn on_deadline(&mut self, now: Instant) -> Option<Finish> {
        if let Some((_, since)) = self.closing()
            && now >= since + CLOSE_GRACE
        {
            // The grace is over: cut what is left.
            return Some(Finish::Done(self.cause(None)));
        }
        let stalled =
            |d: &Direction| d.stalled_since.is_some_and(|s| now >= self.clock.at(s) + self.limits.idle_timeout());
        if stalled(&self.up) || stalled(&self.down) {
            // A peer that took no bytes for the idle timeout stopped reading
            // (while closing, the grace above bounds the wait as well).
            let reason = self.closing().map_or(CloseReason::IdleTimeout, |(reason, _)| reason);
            return Some(Finish::Done(EndCause::Gateway(reason)));
        }
        let clock = self.clock;
        for direction in [&mut self.up, &mut self.down] {
            if direction.eof.is_some_and(|since| now >= clock.at(since) + CLOSE_GRACE) {
                direction.ended = true;
            }
        }
        if self.closing().is_none() {
            if let Some((reason, at)) = self.stop_at()
                && now >= at
            {
                self.begin(reason);
            } else if now >= self.end_of_life() {
                self.begin(CloseReason::MaxLifetime);
            } else if now >= self.idle_at() {
                self.begin(CloseReason::IdleTimeout);
            }
        }
        None
    }

    /// Ends on a failed direction: `lost` when it was the server's read.
    fn failed(&mut self, failure: Failure, server_read: bool) -> Finish {
        let error = match failure {
            Failure::Read(error) | Failure::Write(error) => error,
        };
        let down = &self.down;
        if server_read && !down.closed && !down.frames.saw_close && down.frames.at_boundary() {
            return Finish::ServerLost(error);
        }
        Finish::Done(self.cause(Some(error)))
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>, stop: &Stop, mut timer: Pin<&mut Sleep>) -> Poll<Finish> {
        loop {
            if self.closing().is_none()
                && let Poll::Ready((cause, at)) = stop.poll_fired(cx)
            {
                // Polled again each turn: another source may fire earlier.
                let at = Instant::from_std(at);
                if at <= Instant::now() {
                    self.begin(cause.into());
                } else {
                    self.stop_at = Some(self.clock.moment(at));
                    self.stop_reason = cause.into();
                }
            }
            self.deliver_closes();
            let splice = self.limits.splice;
            let (clock, activity) = (self.clock, &mut self.last_activity);
            let turn = TurnSettings { splice, destination_done: self.down.ended, clock };
            let up = self.up.pump(cx, &mut self.client, &mut self.server, turn, activity);
            let up = match up {
                Ok(turn) => turn,
                Err(failure) => return Poll::Ready(self.failed(failure, false)),
            };
            let activity = &mut self.last_activity;
            let turn = TurnSettings { splice, destination_done: self.up.ended, clock };
            let down = self.down.pump(cx, &mut self.server, &mut self.client, turn, activity);
            let down = match down {
                Ok(turn) => turn,
                Err(failure) => {
                    let server_read = matches!(failure, Failure::Read(_));
                    return Poll::Ready(self.failed(failure, server_read));
                }
            };
            self.note_first();
            if self.up.ended && self.down.ended {
                return Poll::Ready(Finish::Done(self.cause(None)));
            }
            if self.deliver_closes() {
                // A Close was queued after the turn: write it now.
                continue;
            }
            let deadline = self.deadline();
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                if let Some(finish) = self.on_deadline(Instant::now()) {
                    return Poll::Ready(finish);
                }
                timer.as_mut().reset(self.deadline());
                continue;
            }
            if up == Turn::Busy || down == Turn::Busy {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
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

impl<C: Socket, S: Socket> Relay<C, S> {
    /// A relay between `client` and `server`, starting now.
    pub fn new(client: C, server: S, limits: RelayLimits) -> Relay<C, S> {
        let clock = Clock { started: Instant::now() };
        Relay {
            client,
            server,
            up: Direction::default(),
            down: Direction::default(),
            clock,
            limits,
            last_activity: clock.now(),
            first: None,
            closing_since: None,
            closing_reason: CloseReason::Shutdown,
            stop_at: None,
            stop_reason: CloseReason::Shutdown,
            gateway_first: false,
        }
    }

    /// Bytes each side sent that were read before the relay began (with
    /// the handshake): they are passed on first, as if the relay had read
    /// them.
    pub fn read_before(&mut self, from_client: &[u8], from_server: &[u8]) {
        for (direction, data) in [(&mut self.up, from_client), (&mut self.down, from_server)] {
            if !data.is_empty() {
                direction.bytes += data.len() as u64;
                direction.frames.feed(data);
                direction.queue(data);
            }
        }
    }

    /// Relays until both sides close, a socket fails, or the gateway ends
    /// it: idle for `idle_timeout`, `max_lifetime` reached, or `stop` fired
    /// (at the moment it names, with its cause).
    ///
    /// It borrows the relay: the caller's task holds it once, rather than
    /// this future holding a second copy of both sockets' state.
    pub async fn run(&mut self, stop: &Stop) -> RelayEnd {
        let finish = {
            let timer = tokio::time::sleep_until(self.deadline());
            tokio::pin!(timer);
            std::future::poll_fn(|cx| self.poll_relay(cx, stop, timer.as_mut())).await
        };
        let cause = match finish {
            Finish::Done(cause) => cause,
            Finish::ServerLost(error) => {
                // Boxed: rare, and its timers would otherwise take room in
                // every relay's state.
                Box::pin(self.tell_client_server_lost()).await;
                self.cause(Some(error))
            }
        };
        RelayEnd {
            cause,
            lasted: self.clock.started.elapsed(),
            client_to_server: self.up.bytes,
            server_to_client: self.down.bytes,
            spliced: self.up.spliced + self.down.spliced,
        }
    }

    /// Sends the client a Close 1011 (the server's connection failed
    /// between two frames), within [`CLOSE_GRACE`].
    async fn tell_client_server_lost(&mut self) {
        let frame = close_frame(CloseReason::ServerLost, false);
        let _ = tokio::time::timeout(CLOSE_GRACE, self.client.write_all(&frame)).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, self.client.flush()).await;
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

    /// A binary frame whose payload is a pattern (so a byte out of place or
    /// lost shows).
    fn patterned(payload_len: usize, masked: bool, seed: u8) -> Vec<u8> {
        let mut f = frame(payload_len, masked);
        let start = f.len() - payload_len;
        for (i, b) in f[start..].iter_mut().enumerate() {
            *b = (i % 251) as u8 ^ seed;
        }
        f
    }

    /// A connected pair of TCP sockets on 127.0.0.1: (connecting, accepted).
    /// With `small`, the connecting side's send buffer and the accepted
    /// side's receive buffer are a few KiB, so writes toward the accepted
    /// side stall while it does not read.
    async fn tcp_pair(small: bool) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        use tokio::net::TcpSocket;
        let listening = TcpSocket::new_v4().unwrap();
        let connecting = TcpSocket::new_v4().unwrap();
        if small {
            listening.set_recv_buffer_size(4096).unwrap();
            connecting.set_send_buffer_size(4096).unwrap();
        }
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(1).unwrap();
        let connect = connecting.connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// A relay between two real socket pairs, splicing: the client's and the
    /// server's peers, and the running relay.
    async fn spliced_relay(
        stop: Arc<Stop>,
    ) -> (tokio::net::TcpStream, tokio::net::TcpStream, tokio::task::JoinHandle<RelayEnd>) {
        let (client_peer, gateway_client) = tcp_pair(false).await;
        let (gateway_server, server_peer) = tcp_pair(true).await;
        let limits = RelayLimits::new(Duration::from_secs(10), Duration::from_secs(60), true);
        let mut relay = Relay::new(gateway_client, gateway_server, limits);
        (client_peer, server_peer, tokio::spawn(async move { relay.run(&stop).await }))
    }

    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    /// Reads `n` bytes (or fails the test after 10 s).
    async fn read_n(from: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(Duration::from_secs(10), from.read_exact(&mut got)).await.unwrap().unwrap();
        got
    }

    /// Reads to the end (or fails the test after 10 s).
    async fn read_all(from: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), from.read_to_end(&mut got)).await.unwrap().unwrap();
        got
    }

    #[tokio::test]
    async fn bulk_payload_between_plain_sockets_is_spliced_and_arrives_intact() {
        let (mut client, mut server, relaying) = spliced_relay(Arc::new(Stop::default())).await;
        let first_up = patterned(10, true, 1);
        client.write_all(&first_up).await.unwrap();
        assert_eq!(read_n(&mut server, first_up.len()).await, first_up);
        let first_down = patterned(20, false, 2);
        server.write_all(&first_down).await.unwrap();
        assert_eq!(read_n(&mut client, first_down.len()).await, first_down);

        let up = [patterned(3 << 20, true, 3), patterned(200_000, true, 4), patterned(5, true, 5)].concat();
        let down = [patterned(2 << 20, false, 6), patterned(100, false, 7), patterned(70_000, false, 8)].concat();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let send_up = async {
            client_write.write_all(&up).await.unwrap();
            client_write.shutdown().await.unwrap();
        };
        let send_down = async {
            server_write.write_all(&down).await.unwrap();
            server_write.shutdown().await.unwrap();
        };
        // The server's peer reads nothing for a while: its socket's buffers
        // fill, and what a splice moved but could not write waits in a spill.
        let receive_up = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut got = Vec::new();
            server_read.read_to_end(&mut got).await.unwrap();
            got
        };
        let receive_down = async {
            let mut got = Vec::new();
            client_read.read_to_end(&mut got).await.unwrap();
            got
        };
        let limit = Duration::from_secs(20);
        let (_, _, got_up, got_down) =
            tokio::time::timeout(limit, async { tokio::join!(send_up, send_down, receive_up, receive_down) })
                .await
                .unwrap();
        assert!(got_up == up, "the client's bytes reach the server in order ({} of {})", got_up.len(), up.len());
        assert!(
            got_down == down,
            "the server's bytes reach the client in order ({} of {})",
            got_down.len(),
            down.len()
        );
        let end = relaying.await.unwrap();
        let total = (first_up.len() + up.len() + first_down.len() + down.len()) as u64;
        assert_eq!(end.client_to_server + end.server_to_client, total);
        // Each large frame's first read is copied, and so is its last
        // `SPLICE_FROM` or less: the rest is spliced.
        let copied = total - end.spliced;
        assert!(copied < 4 * 2 * READ_SIZE as u64 + 1000, "{copied} of {total} bytes copied, {} spliced", end.spliced);
    }

    #[tokio::test]
    async fn each_side_gets_every_byte_and_then_its_end_whichever_closes_first() {
        for server_first in [true, false] {
            let (client, gateway_client) = tcp_pair(false).await;
            // Small buffers toward the server: what the client sends last
            // is still queued in the gateway's socket when the relay ends.
            let (gateway_server, server) = tcp_pair(true).await;
            let limits = RelayLimits::new(Duration::from_secs(10), Duration::from_secs(60), false);
            let mut relay = Relay::new(gateway_client, gateway_server, limits);
            let stop = Stop::default();
            let relaying = tokio::spawn(async move { relay.run(&stop).await });
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let up = patterned(1 << 20, true, 1);
            let down = patterned(300, false, 2);
            let to_end = Duration::from_secs(10);
            if server_first {
                server_write.write_all(&down).await.unwrap();
                server_write.shutdown().await.unwrap();
                let got = read_all(&mut client_read).await;
                assert!(got == down, "server first: the client gets the server's bytes, then its end");
                // The server reads late: when the relay ends, the last
                // bytes are still queued in the gateway's socket.
                let reading = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    read_all(&mut server_read).await
                });
                client_write.write_all(&up).await.unwrap();
                client_write.shutdown().await.unwrap();
                let got = tokio::time::timeout(to_end, reading).await.unwrap().unwrap();
                assert!(got == up, "server first: {} of {} bytes, then a clean end", got.len(), up.len());
            } else {
                client_write.write_all(&up[..1000]).await.unwrap();
                client_write.shutdown().await.unwrap();
                let got = read_all(&mut server_read).await;
                assert!(got == up[..1000], "client first: the server gets the client's bytes, then its end");
                server_write.write_all(&down).await.unwrap();
                server_write.shutdown().await.unwrap();
                let got = read_all(&mut client_read).await;
                assert!(got == down, "client first: the client still gets the server's bytes, then its end");
            }
            let end = tokio::time::timeout(to_end, relaying).await.unwrap().unwrap();
            assert_eq!(end.client_to_server, if server_first { up.len() } else { 1000 } as u64);
            assert_eq!(end.server_to_client, down.len() as u64);
        }
    }

    #[tokio::test]
    async fn bytes_read_before_the_relay_began_pass_on_before_any_splice() {
        let (mut client, gateway_client) = tcp_pair(false).await;
        let (gateway_server, server) = tcp_pair(false).await;
        let frame = patterned(300_000, false, 5);
        // The server's first 20,000 bytes were read with its 101; the rest
        // already waits in the socket when the relay begins.
        let (mut server_read, mut server_write) = server.into_split();
        let rest = frame[20_000..].to_vec();
        let sending = tokio::spawn(async move {
            server_write.write_all(&rest).await.unwrap();
            server_write
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let limits = RelayLimits::new(Duration::from_secs(10), Duration::from_secs(60), true);
        let mut relay = Relay::new(gateway_client, gateway_server, limits);
        relay.read_before(b"", &frame[..20_000]);
        let stop = Stop::default();
        let relaying = tokio::spawn(async move { relay.run(&stop).await });
        assert!(read_n(&mut client, frame.len()).await == frame, "the frame arrives whole and in order");
        drop((client, sending.await.unwrap()));
        let _ = server_read.read_to_end(&mut Vec::new()).await;
        let end = tokio::time::timeout(Duration::from_secs(10), relaying).await.unwrap().unwrap();
        assert_eq!(end.server_to_client, frame.len() as u64);
        assert!(end.spliced > 200_000, "the rest was spliced: {}", end.spliced);
    }

    #[tokio::test]
    async fn a_gateway_close_lands_after_the_frame_being_spliced() {
        let stop = Arc::new(Stop::default());
        let stops = crate::shutdown::StopList::new(StopCause::Shutdown);
        stops.add(&stop);
        let (mut client, mut server, relaying) = spliced_relay(stop).await;
        let first = patterned(10, true, 1);
        client.write_all(&first).await.unwrap();
        assert_eq!(read_n(&mut server, first.len()).await, first);
        // Half of a large frame, then the stop, then the other half.
        let bulk = patterned(1 << 20, true, 9);
        client.write_all(&bulk[..bulk.len() / 2]).await.unwrap();
        assert_eq!(read_n(&mut server, bulk.len() / 4).await, bulk[..bulk.len() / 4]);
        stops.fire(Duration::ZERO);
        client.write_all(&bulk[bulk.len() / 2..]).await.unwrap();
        assert_eq!(read_n(&mut server, bulk.len() - bulk.len() / 4).await, bulk[bulk.len() / 4..]);
        // Right after the frame: the gateway's Close, masked, 1001.
        let close = read_n(&mut server, 2).await;
        assert_eq!(close, [0x88, 0x80 | 23]);
        let rest = read_n(&mut server, 4 + 23).await;
        let payload: Vec<u8> = rest[4..].iter().enumerate().map(|(i, b)| b ^ rest[i % 4]).collect();
        assert_eq!(&payload[..2], &1001u16.to_be_bytes());
        // The client got its own Close.
        let to_client = read_n(&mut client, 2).await;
        assert_eq!(to_client, [0x88, 23]);
        drop((client, server));
        let end = tokio::time::timeout(Duration::from_secs(10), relaying).await.unwrap().unwrap();
        assert!(matches!(end.cause, EndCause::Gateway(CloseReason::Shutdown)), "{:?}", end.cause);
        assert!(end.spliced > (1 << 19), "the frame was spliced: {} bytes", end.spliced);
    }
}
