//! Bulk payload between two plain TCP sockets without copies through user
//! space: splice(2) from the source socket into the worker thread's pipe,
//! then from the pipe into the destination socket.
//!
//! The pipe belongs to the thread, not to a connection, so an idle relay
//! holds none (two descriptors per worker thread in all). It is empty again
//! whenever [`splice`] returns: what the destination does not take at once
//! is read back out of it and handed to the caller, who keeps it as the
//! direction's spill, as it does with a copied read the destination did not
//! take. A pipe whose content is in doubt after an error is closed, and the
//! next call makes a new one.
//!
//! splice(2) has no `MSG_NOSIGNAL`: into a socket whose peer is gone it
//! raises SIGPIPE, which a Rust program ignores from its start, so the call
//! fails with EPIPE as a write would.

use std::cell::RefCell;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::pipe::{PipeFlags, SpliceFlags};

/// What one call moved.
pub(super) enum Spliced {
    /// The source had nothing to read now.
    Nothing,
    /// The source sent EOF.
    Eof,
    /// `moved` bytes left the source. `left` holds those the destination
    /// did not take (empty when it took them all).
    Moved { moved: usize, left: Vec<u8> },
}

/// Which side failed.
pub(super) enum SpliceError {
    Read(io::Error),
    Write(io::Error),
}

/// The thread's pipe: read end, write end.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// Moves up to `len` bytes from `from` to `to` through the thread's pipe.
///
/// `None` when the thread has no pipe and cannot make one (out of
/// descriptors): the caller copies instead. Both sockets must be
/// non-blocking; readiness is the caller's: after [`Spliced::Nothing`] it
/// reads the source the usual way, which registers its wake-up.
pub(super) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> Option<Result<Spliced, SpliceError>> {
    PIPE.with(|cell| {
        // Never nested in practice; copy if it ever is.
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).ok()?;
            *slot = Some(Pipe { read, write });
        }
        let pipe = slot.as_ref()?;
        let result = pipe.pass(from, to, len);
        if matches!(result, Err(SpliceError::Write(_))) {
            // Bytes may be left in it: nobody else may read them.
            *slot = None;
        }
        Some(result)
    })
}

/// Retries a call interrupted by a signal.
fn retrying<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match call() {
            Err(Errno::INTR) => continue,
            result => return result,
        }
    }
}

impl Pipe {
    fn pass(&self, from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> Result<Spliced, SpliceError> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        // The pipe is empty, so EAGAIN here means the socket has nothing.
        let moved = match retrying(|| rustix::pipe::splice(from, None, &self.write, None, len, flags)) {
            Ok(0) => return Ok(Spliced::Eof),
            Ok(moved) => moved,
            Err(Errno::AGAIN) => return Ok(Spliced::Nothing),
            Err(errno) => return Err(SpliceError::Read(errno.into())),
        };
        let mut sent = 0;
        while sent < moved {
            match retrying(|| rustix::pipe::splice(&self.read, None, to, None, moved - sent, flags)) {
                Ok(0) => return Err(SpliceError::Write(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(Errno::AGAIN) => break,
                Err(errno) => return Err(SpliceError::Write(errno.into())),
            }
        }
        // What the destination did not take comes back out, so the pipe is
        // empty for the next connection this thread serves.
        let mut left = vec![0; moved - sent];
        let mut at = 0;
        while at < left.len() {
            match retrying(|| rustix::io::read(&self.read, &mut left[at..])) {
                Ok(0) | Err(Errno::AGAIN) => {
                    return Err(SpliceError::Write(io::Error::other("the splice pipe lost bytes")));
                }
                Ok(n) => at += n,
                Err(errno) => return Err(SpliceError::Write(errno.into())),
            }
        }
        Ok(Spliced::Moved { moved, left })
    }
}
