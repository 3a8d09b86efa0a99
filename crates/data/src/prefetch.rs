//! A bounded prefetch thread: batches for iterations `start, start + 1, ...` are made on
//! a background thread while the caller trains on the previous one, so CPU-side
//! augmentation overlaps the training step instead of stalling it.
//!
//! Each item is a pure function of its iteration, so what the consumer receives is the
//! same with or without the thread, and a resumed run starts the thread at its iteration.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use crate::error::{DataError, Result};

/// Items made ahead of the consumer on one background thread.
pub struct Prefetcher<T: Send + 'static> {
    next: u64,
    receiver: Option<Receiver<Message<T>>>,
    worker: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts making `make(start)`, `make(start + 1)`, ... with at most `depth` finished
    /// items waiting (at least 1).
    pub fn new<F, E>(start: u64, depth: usize, make: F) -> Self
    where
        F: Fn(u64) -> std::result::Result<T, E> + Send + 'static,
        E: std::fmt::Display,
    {
        let (sender, receiver) = sync_channel(depth.max(1));
        let worker = std::thread::Builder::new()
            .name("genseg-prefetch".into())
            .spawn(move || produce(start, &sender, make))
            .expect("spawning the prefetch thread");
        Self {
            next: start,
            receiver: Some(receiver),
            worker: Some(worker),
        }
    }

    /// The item of iteration `it`, which must be the next one in order.
    pub fn take(&mut self, it: u64) -> Result<T> {
        if it != self.next {
            return Err(DataError::Prefetch(format!(
                "prefetch: iteration {it} requested, {} is next",
                self.next
            )));
        }
        let receiver = self.receiver.as_ref().expect("receiver lives until drop");
        let (got, item) = receiver
            .recv()
            .map_err(|_| DataError::Prefetch("prefetch: the background thread stopped".into()))?;
        debug_assert_eq!(got, it);
        self.next += 1;
        item.map_err(|e| DataError::Prefetch(format!("preparing the batch of iteration {it}: {e}")))
    }
}

type Message<T> = (u64, std::result::Result<T, String>);

fn produce<T, F, E>(start: u64, sender: &SyncSender<Message<T>>, make: F)
where
    F: Fn(u64) -> std::result::Result<T, E>,
    E: std::fmt::Display,
{
    for it in start.. {
        let item = make(it).map_err(|e| e.to_string());
        let failed = item.is_err();
        let mut message = (it, item);
        // Poll rather than block, so a dropped consumer ends the thread promptly.
        loop {
            match sender.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    message = m;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        if failed {
            return;
        }
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        // Closing the channel makes the worker's next send fail, which ends it.
        drop(self.receiver.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_arrive_in_order_from_the_start_iteration() -> Result<()> {
        let mut p = Prefetcher::new(5, 2, |it| Ok::<_, String>(it * it));
        for it in 5..20 {
            assert_eq!(p.take(it)?, it * it);
        }
        assert!(p.take(3).unwrap_err().to_string().contains("20 is next"));
        Ok(())
    }

    #[test]
    fn an_error_names_its_iteration_and_dropping_stops_the_thread() {
        let mut p = Prefetcher::new(0, 1, |it| if it == 2 { Err("bad image") } else { Ok(it) });
        assert_eq!(p.take(0).unwrap(), 0);
        assert_eq!(p.take(1).unwrap(), 1);
        let err = p.take(2).unwrap_err().to_string();
        assert!(
            err.contains("iteration 2") && err.contains("bad image"),
            "{err}"
        );
        assert!(p.take(3).is_err());
        // An endless producer is stopped by the drop (the test would hang otherwise).
        let q = Prefetcher::new(0, 1, Ok::<u64, String>);
        drop(q);
    }
}
