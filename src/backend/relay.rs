//! A call's chunk relay: how a runtime that serves many calls at once (the
//! embedded engine thread, the MLX worker's reader) hands one call's chunks
//! to that call's stream.
//!
//! The producer never blocks on a relay: it serves every call, so one client
//! that reads slowly must not hold the others back. Instead the relay says
//! when it holds `capacity` chunks, and the producer stops generating for
//! that call (the engine skips the sequence, the MLX worker pauses the
//! request) until the client has read half of them, when the relay calls the
//! producer's `on_room` hook. What a call queues is therefore bounded by
//! `capacity` plus what the producer emits before it looks, not by the
//! length of the answer; and a slow client slows its own generation only.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use futures_util::Stream;

use super::{BackendError, Chunk};

/// Chunks a call may have queued before its generation waits for the
/// client: a chunk is a token's text or so, and 32 keep a client that reads
/// in bursts fed without holding an answer's worth.
pub const RELAY_CAPACITY: usize = 32;

pub(crate) type Item = Result<Chunk, BackendError>;

type Hook = Box<dyn Fn() + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    on_room: Hook,
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    /// The stream's waker while it waits for a chunk.
    reader: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
    /// The producer saw the relay full and waits for `on_room`.
    producer_waiting: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// A relay holding up to `capacity` chunks before it reports itself full;
/// `on_room` runs (on the reader's side, no lock held) when a full relay has
/// drained to half, and when its stream is dropped while the producer waits.
pub(crate) fn relay(
    capacity: usize,
    on_room: impl Fn() + Send + Sync + 'static,
) -> (RelaySender, RelayStream) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        capacity,
        on_room: Box::new(on_room),
    });
    (RelaySender(shared.clone()), RelayStream(shared))
}

/// The client went away.
#[derive(Debug)]
pub(crate) struct Closed;

/// The producer's end.
pub(crate) struct RelaySender(Arc<Shared>);

impl RelaySender {
    /// Queues a chunk, full or not: a producer sends what it already
    /// generated, and stops generating when [`RelaySender::has_room`] says so.
    pub(crate) fn send(&self, item: Item) -> Result<(), Closed> {
        let mut state = self.0.lock();
        if state.receiver_gone {
            return Err(Closed);
        }
        state.items.push_back(item);
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }

    /// Whether the call may generate more now. When it may not, the
    /// producer is owed an `on_room` call.
    pub(crate) fn has_room(&self) -> bool {
        let mut state = self.0.lock();
        let room = state.items.len() < self.0.capacity;
        state.producer_waiting |= !room;
        room
    }

    /// Whether the client went away.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.lock().receiver_gone
    }
}

impl Drop for RelaySender {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.sender_gone = true;
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// The call's end: chunks in order, ending when the producer drops its end.
pub(crate) struct RelayStream(Arc<Shared>);

impl Stream for RelayStream {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let shared = &self.0;
        let mut state = shared.lock();
        let Some(item) = state.items.pop_front() else {
            if state.sender_gone {
                return Poll::Ready(None);
            }
            state.reader = Some(cx.waker().clone());
            return Poll::Pending;
        };
        let room = state.producer_waiting && state.items.len() <= shared.capacity / 2;
        if room {
            state.producer_waiting = false;
        }
        drop(state);
        if room {
            (shared.on_room)();
        }
        Poll::Ready(Some(item))
    }

    /// At least the chunks queued now: how far the client is behind.
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.0.lock().items.len(), None)
    }
}

impl Drop for RelayStream {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receiver_gone = true;
        state.items.clear();
        let waiting = std::mem::take(&mut state.producer_waiting);
        drop(state);
        // A waiting producer learns the call is over and frees its place.
        if waiting {
            (self.0.on_room)();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::{FutureExt, StreamExt};

    use super::*;

    fn text(n: usize) -> Chunk {
        Chunk::Text(n.to_string())
    }

    fn next(stream: &mut RelayStream) -> Option<Option<Chunk>> {
        let next = stream.next().now_or_never()?;
        Some(next.map(|item| item.expect("a text chunk")))
    }

    fn counted(capacity: usize) -> (RelaySender, RelayStream, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let (sender, stream) = relay(capacity, {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
            }
        });
        (sender, stream, calls)
    }

    #[test]
    fn a_full_relay_asks_the_producer_to_wait_and_calls_it_back_at_half() {
        let (sender, mut stream, calls) = counted(4);
        for n in 0..4 {
            assert!(sender.has_room());
            sender.send(Ok(text(n))).unwrap();
        }
        assert!(!sender.has_room());
        assert_eq!(stream.size_hint(), (4, None));
        assert_eq!(next(&mut stream), Some(Some(text(0))));
        assert_eq!(calls.load(Ordering::SeqCst), 0, "3 left is over half");
        assert_eq!(next(&mut stream), Some(Some(text(1))));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "2 left is half");
        assert!(sender.has_room());
        assert_eq!(next(&mut stream), Some(Some(text(2))));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "called once per wait");
    }

    #[test]
    fn chunks_arrive_in_order_and_the_stream_ends_with_the_sender() {
        let (sender, stream, _) = counted(2);
        for n in 0..5 {
            sender.send(Ok(text(n))).unwrap();
        }
        drop(sender);
        let items: Vec<Item> = stream.collect().now_or_never().unwrap();
        let items: Vec<Chunk> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(items, (0..5).map(text).collect::<Vec<_>>());
    }

    struct Woken(std::sync::atomic::AtomicBool);

    impl futures_util::task::ArcWake for Woken {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waiting_reader_is_woken_by_a_chunk_and_by_the_end() {
        let (sender, mut stream, _) = counted(2);
        for last in [false, true] {
            let woken = Arc::new(Woken(Default::default()));
            let waker = futures_util::task::waker(woken.clone());
            let mut cx = Context::from_waker(&waker);
            assert!(Pin::new(&mut stream).poll_next(&mut cx).is_pending());
            if last {
                drop(sender);
                assert!(woken.0.load(Ordering::SeqCst));
                let polled = Pin::new(&mut stream).poll_next(&mut cx);
                assert!(matches!(polled, Poll::Ready(None)));
                return;
            }
            sender.send(Ok(text(7))).unwrap();
            assert!(woken.0.load(Ordering::SeqCst));
            let polled = Pin::new(&mut stream).poll_next(&mut cx);
            assert!(matches!(polled, Poll::Ready(Some(Ok(chunk))) if chunk == text(7)));
        }
    }

    #[test]
    fn a_dropped_stream_closes_the_relay_and_releases_a_waiting_producer() {
        let (sender, stream, calls) = counted(1);
        sender.send(Ok(text(0))).unwrap();
        assert!(!sender.has_room());
        drop(stream);
        assert!(sender.is_closed());
        assert!(sender.send(Ok(text(1))).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
