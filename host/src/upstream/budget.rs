//! Upstream sockets counted as they open and close: every connection the
//! gateway opens to a backend (pooled, idle or busy; WebSocket; probe) holds
//! a place in the process's budget, and in its pool's when the pool sets
//! `max_connections`. Past either, no socket is opened: the caller gets a
//! local shortage (503 `out-of-resources`, the server's health untouched)
//! instead of the process running out of descriptors, or one client's
//! HTTP/2 streams taking every connection a backend accepts.
//!
//! Idle connections kept for reuse hold places too, so a budget knows who
//! keeps them ([`Reclaim`]): a new socket that finds its budget full has
//! the oldest idle connection under it closed and takes its place, rather
//! than a burst to one pool leaving another pool, or WebSockets, short for
//! as long as its connections idle.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// How long a socket waits for the place of an idle connection it had
/// closed: the connection's task gives it back as soon as it runs.
const RECLAIM_WAIT: Duration = Duration::from_secs(1);

/// Idle connections closed for one new socket at most (others may take a
/// freed place first).
const RECLAIM_TRIES: usize = 3;

/// Keeps sockets open while they idle (a pool's connections kept for
/// reuse), and closes one on demand.
pub trait Reclaim: Send + Sync {
    /// When the oldest idle socket kept began idling, if any is kept.
    fn oldest_idle(&self) -> Option<Instant>;
    /// Closes the oldest idle socket; false if none was kept. Its place
    /// comes back once the socket has closed.
    fn close_oldest(&self) -> bool;
}

/// Sockets open under one limit.
#[derive(Debug)]
pub struct SocketBudget {
    /// What the limit belongs to, for the error: "the process" or "pool `x`".
    owner: String,
    open: AtomicUsize,
    /// Changed by a reload that changes the pool's `max_connections`.
    limit: AtomicUsize,
    /// Whoever keeps idle sockets that hold places here.
    keepers: Mutex<Vec<Weak<dyn Reclaim>>>,
    /// Sockets waiting for a place to come back, told by `released`.
    waiting: AtomicUsize,
    released: Notify,
}

impl SocketBudget {
    pub fn new(owner: impl Into<String>, limit: usize) -> Arc<SocketBudget> {
        Arc::new(SocketBudget {
            owner: owner.into(),
            open: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            keepers: Mutex::default(),
            waiting: AtomicUsize::new(0),
            released: Notify::new(),
        })
    }

    fn keepers(&self) -> std::sync::MutexGuard<'_, Vec<Weak<dyn Reclaim>>> {
        // Nothing panics while holding the lock.
        self.keepers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `keeper`'s idle sockets hold places here: they are closed, oldest
    /// first, when a new socket finds no place (until `keeper` is gone).
    pub fn kept_by(&self, keeper: Weak<dyn Reclaim>) {
        let mut keepers = self.keepers();
        keepers.retain(|keeper| keeper.strong_count() > 0);
        keepers.push(keeper);
    }

    /// Closes the oldest idle socket holding a place here; false if none.
    fn close_oldest_idle(&self) -> bool {
        let keepers: Vec<Arc<dyn Reclaim>> = self.keepers().iter().filter_map(Weak::upgrade).collect();
        let mut by_age: Vec<(Instant, &Arc<dyn Reclaim>)> =
            keepers.iter().filter_map(|keeper| Some((keeper.oldest_idle()?, keeper))).collect();
        by_age.sort_by_key(|(at, _)| *at);
        // A list emptied meanwhile (checked out, swept) passes to the next.
        by_age.iter().any(|(_, keeper)| keeper.close_oldest())
    }

    /// Sockets open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// A new limit; places already held stay held (past a lowered limit,
    /// new connections wait for enough of them to close).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }

    fn take(self: &Arc<Self>) -> Result<Held, OverBudget> {
        let limit = self.limit();
        if self.open.fetch_add(1, Ordering::AcqRel) < limit {
            return Ok(Held(self.clone()));
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
        Err(OverBudget {
            message: format!("{} has {limit} upstream connections open, its limit", self.owner),
            full: self.clone(),
        })
    }
}

/// One place in a budget, given back on drop.
#[derive(Debug)]
struct Held(Arc<SocketBudget>);

impl Drop for Held {
    fn drop(&mut self) {
        // SeqCst with `Waiting`: a socket that counted itself waiting before
        // this place came back is told, or its next `take` finds the place.
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.released.notify_waiters();
        }
    }
}

/// Counts a socket waiting for a place in a budget while it lives.
struct Waiting<'a>(&'a SocketBudget);

impl<'a> Waiting<'a> {
    fn on(budget: &'a SocketBudget) -> Waiting<'a> {
        budget.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(budget)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// No place left: a shortage of this host's, not the server's doing.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OverBudget {
    message: String,
    /// The budget that had no place.
    full: Arc<SocketBudget>,
}

/// Whether `error`'s chain holds an [`OverBudget`].
pub fn is_over_budget(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<OverBudget>() {
            return true;
        }
        next = error.source();
    }
    false
}

/// The budgets a pool's connections count in: the process's and, if the
/// pool has `max_connections`, its own.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub process: Arc<SocketBudget>,
    pub pool: Option<Arc<SocketBudget>>,
}

impl Budgets {
    /// A place in every budget, or none.
    pub fn take(&self) -> Result<Slot, OverBudget> {
        let pool = self.pool.as_ref().map(SocketBudget::take).transpose()?;
        Ok(Slot { _process: self.process.take()?, _pool: pool })
    }

    /// A place in every budget; where one is full, its oldest idle
    /// connection (of a plain pool: `https` pools' idle connections are
    /// hyper-util's, not reclaimable) is closed to make room, and the freed
    /// place waited for. A few times at most: another socket may take the
    /// freed place first, and every waiter is woken by each one freed, so
    /// under contention a few more idle connections close than strictly
    /// needed. Refused when no reclaimable idle connection is left.
    pub async fn take_reclaiming(&self) -> Result<Slot, OverBudget> {
        let mut refused = match self.take() {
            Ok(slot) => return Ok(slot),
            Err(over) => over,
        };
        for _ in 0..RECLAIM_TRIES {
            let full = refused.full.clone();
            let _waiting = Waiting::on(&full);
            let released = full.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            // A place may have come back before this socket counted itself
            // waiting (no one told it): try again before closing anything.
            match self.take() {
                Ok(slot) => return Ok(slot),
                Err(over) => refused = over,
            }
            if !Arc::ptr_eq(&refused.full, &full) {
                continue;
            }
            if !full.close_oldest_idle() || tokio::time::timeout(RECLAIM_WAIT, released).await.is_err() {
                return Err(refused);
            }
            match self.take() {
                Ok(slot) => return Ok(slot),
                Err(over) => refused = over,
            }
        }
        Err(refused)
    }

    /// `keeper`'s idle sockets hold places in these budgets.
    pub fn kept_by(&self, keeper: Weak<dyn Reclaim>) {
        self.process.kept_by(keeper.clone());
        if let Some(pool) = &self.pool {
            pool.kept_by(keeper);
        }
    }
}

/// A socket's places, held while it is open.
#[derive(Debug)]
pub struct Slot {
    _process: Held,
    _pool: Option<Held>,
}

/// A socket that holds its [`Slot`] until it is dropped.
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    _slot: Slot,
}

impl<T> Counted<T> {
    pub fn new(inner: T, slot: Slot) -> Counted<T> {
        Counted { inner, _slot: slot }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: Connection> Connection for Counted<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connector (for the pooled client) whose every socket is [`Counted`]:
/// past a budget it fails with [`OverBudget`] before connecting at all.
#[derive(Debug, Clone)]
pub struct CountingConnector<C> {
    inner: C,
    budgets: Budgets,
}

impl<C> CountingConnector<C> {
    pub fn new(inner: C, budgets: Budgets) -> CountingConnector<C> {
        CountingConnector { inner, budgets }
    }
}

impl<C> tower_service::Service<Uri> for CountingConnector<C>
where
    C: tower_service::Service<Uri>,
    C::Response: Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Counted<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let budgets = self.budgets.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let slot = budgets.take_reclaiming().await?;
            Ok(Counted::new(connecting.await.map_err(Into::into)?, slot))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_place_is_taken_in_every_budget_and_given_back_on_drop() {
        let process = SocketBudget::new("the process", 3);
        let pool = Budgets { process: process.clone(), pool: Some(SocketBudget::new("pool `a`", 2)) };
        let other = Budgets { process: process.clone(), pool: None };
        let open = || (process.open(), pool.pool.as_ref().unwrap().open());
        let first = pool.take().unwrap();
        let second = pool.take().unwrap();
        assert_eq!(pool.take().unwrap_err().to_string(), "pool `a` has 2 upstream connections open, its limit");
        assert_eq!(open(), (2, 2));
        drop(first);
        let elsewhere = [other.take().unwrap(), other.take().unwrap()];
        // The pool has room, the process has none: the pool's place goes back.
        let refused = pool.take().unwrap_err();
        assert!(refused.to_string().starts_with("the process has 3"), "{refused}");
        assert_eq!(open(), (3, 1));
        drop((second, elsewhere));
        assert_eq!(open(), (0, 0));
        let boxed: BoxError = Box::new(refused);
        assert!(is_over_budget(boxed.as_ref()));
    }
}
