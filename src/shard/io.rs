//! Socket reads with a deadline and an interrupt, and a shard-local notify.
//!
//! A read that loses to its deadline or to an interrupt (shutdown, or the
//! other half of a WebSocket closing) is cancelled explicitly with monoio's
//! `Canceller` and then awaited, so the kernel operation is finished and the
//! buffer is back in our hands before we return: dropping an in-flight
//! io_uring future would not cancel it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::pin;
use std::task::{Poll, Waker};
use std::time::Instant;

use monoio::buf::IoBufMut;
use monoio::io::{CancelableAsyncReadRent, Canceller};

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// At least one byte was appended.
    Data,
    /// The peer closed its side.
    Eof,
    /// The deadline passed first.
    TimedOut,
    /// The interrupt fired first.
    Interrupted,
    /// An I/O error.
    Failed,
}

/// Read size once a request or frame is known to be arriving.
pub const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Buffer an idle connection parks in the kernel while it waits for bytes:
/// small, because with io_uring the buffer is pinned for the whole wait and
/// an appliance holds tens of thousands of idle keep-alive connections.
pub const IDLE_READ_BYTES: usize = 1024;

/// Appends what the socket has to `buf`, at most `want` bytes (so that a
/// body read never takes the next pipelined request's bytes), unless
/// `deadline` passes or `interrupt` completes first.
pub async fn read_more<R, I>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    want: usize,
    deadline: Instant,
    interrupt: I,
) -> ReadOutcome
where
    R: CancelableAsyncReadRent,
    I: Future<Output = ()>,
{
    let want = want.max(1);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
    let len = buf.len();
    let slice = std::mem::take(buf).slice_mut(len..len + want);
    let canceller = Canceller::new();
    let mut read = pin!(reader.cancelable_read(slice, canceller.handle()));
    let timer = monoio::time::sleep(deadline.saturating_duration_since(Instant::now()));
    enum Won<T> {
        Read(T),
        Timer,
        Interrupt,
    }
    let won = monoio::select! {
        r = &mut read => Won::Read(r),
        _ = timer => Won::Timer,
        _ = interrupt => Won::Interrupt,
    };
    let (lost_to, (result, slice)) = match won {
        Won::Read(r) => (None, r),
        Won::Timer => {
            canceller.cancel();
            (Some(ReadOutcome::TimedOut), read.await)
        }
        Won::Interrupt => {
            canceller.cancel();
            (Some(ReadOutcome::Interrupted), read.await)
        }
    };
    *buf = slice.into_inner();
    match result {
        // Data that raced the cancellation is still data.
        Ok(n) if n > 0 => ReadOutcome::Data,
        Ok(_) => lost_to.unwrap_or(ReadOutcome::Eof),
        Err(_) => lost_to.unwrap_or(ReadOutcome::Failed),
    }
}

/// Writes all of `buf` unless `deadline` passes first (a peer that stopped
/// reading). Returns the buffer and whether everything was written.
pub async fn write_all_by<W>(writer: &mut W, buf: Vec<u8>, deadline: Instant) -> (bool, Vec<u8>)
where
    W: monoio::io::CancelableAsyncWriteRent,
{
    use monoio::io::CancelableAsyncWriteRentExt;
    let canceller = Canceller::new();
    let mut write = pin!(CancelableAsyncWriteRentExt::write_all(writer, buf, canceller.handle()));
    let timer = monoio::time::sleep(deadline.saturating_duration_since(Instant::now()));
    let finished = monoio::select! {
        r = &mut write => Some(r),
        _ = timer => None,
    };
    match finished {
        Some((result, buf)) => (result.is_ok(), buf),
        None => {
            canceller.cancel();
            let (_, buf) = write.await;
            (false, buf)
        }
    }
}

/// A wake-up flag for one task on this shard: `notify` sets it, `wait`
/// returns once it is set (and clears it). Not `Send`; nothing crosses threads.
#[derive(Default)]
pub struct LocalNotify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
