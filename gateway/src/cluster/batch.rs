//! Coalescing of concurrent Redis calls. Callers queue an item and wait for its own result; one
//! task takes whatever is queued (up to a count and a weight) and makes a single call for all of
//! it, with at most `in_flight` calls outstanding. A lone item goes out at once, so a quiet node
//! pays no added latency; under load the items that queue while a call is outstanding leave
//! together in the next one, so the number of Redis commands per message falls as the rate rises
//! (the same group commit the store's writer does).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

/// How large a batch may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_items: usize,
    /// Upper bound of the items' summed weight (bytes, keys…); an item heavier than this on its
    /// own still goes, alone.
    pub max_weight: usize,
    /// Batches outstanding at once. With 1, batches run one after another in queue order.
    pub in_flight: usize,
}

type Queued<I, O> = (I, Option<oneshot::Sender<O>>);

/// A queue into one batching task. Dropping every handle (or cancelling `stop`) ends the task;
/// callers still waiting then get `None`.
pub(crate) struct Batcher<I, O> {
    queue: mpsc::UnboundedSender<Queued<I, O>>,
    queued: Arc<AtomicUsize>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the task. `run` gets the items of one batch and returns one output per item, in
    /// order; an item without an output gets `None`.
    pub(crate) fn spawn<F, Fut>(
        limits: Limits,
        weight: fn(&I) -> usize,
        run: F,
        stop: CancellationToken,
    ) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (queue, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(drain(rx, queued.clone(), limits, weight, run, stop));
        Batcher { queue, queued }
    }

    /// Queues `item` and waits for its output; `None` when the task has stopped or `run` gave
    /// no output for it.
    pub(crate) async fn call(&self, item: I) -> Option<O> {
        let (tx, rx) = oneshot::channel();
        self.enqueue((item, Some(tx))).ok()?;
        rx.await.ok()
    }

    /// Queues `item` without waiting for its output. Refused (`false`) when more than `bound`
    /// items are waiting or the task has stopped.
    pub(crate) fn post(&self, item: I, bound: usize) -> bool {
        self.queued.load(Ordering::Relaxed) < bound && self.enqueue((item, None)).is_ok()
    }

    fn enqueue(&self, entry: Queued<I, O>) -> Result<(), ()> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.queue.send(entry).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        })
    }
}

async fn drain<I, O, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Queued<I, O>>,
    queued: Arc<AtomicUsize>,
    limits: Limits,
    weight: fn(&I) -> usize,
    run: F,
    stop: CancellationToken,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<O>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.in_flight.max(1)));
    let mut carried: Option<Queued<I, O>> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(entry) => entry,
            None => tokio::select! {
                _ = stop.cancelled() => return,
                entry = rx.recv() => match entry {
                    Some(entry) => entry,
                    None => return,
                },
            },
        };
        let mut total = weight(&first.0);
        let mut items = vec![first];
        while items.len() < limits.max_items {
            let Ok(entry) = rx.try_recv() else { break };
            let w = weight(&entry.0);
            if total + w > limits.max_weight {
                carried = Some(entry);
                break;
            }
            total += w;
            items.push(entry);
        }
        queued.fetch_sub(items.len(), Ordering::Relaxed);
        let (inputs, waiters): (Vec<I>, Vec<_>) = items.into_iter().unzip();
        let call = run(inputs);
        tokio::spawn(async move {
            let outputs = call.await;
            for (waiter, output) in waiters.into_iter().zip(outputs) {
                if let Some(waiter) = waiter {
                    let _ = waiter.send(output);
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn limits(max_items: usize, max_weight: usize, in_flight: usize) -> Limits {
        Limits {
            max_items,
            max_weight,
            in_flight,
        }
    }

    /// A batcher whose calls wait for `gate` to be opened, recording each batch.
    fn gated(
        limits: Limits,
        gate: Arc<tokio::sync::Notify>,
        seen: Arc<Mutex<Vec<Vec<u32>>>>,
    ) -> Batcher<u32, u32> {
        Batcher::spawn(
            limits,
            |w| *w as usize,
            move |batch: Vec<u32>| {
                let (gate, seen) = (gate.clone(), seen.clone());
                async move {
                    seen.lock().unwrap().push(batch.clone());
                    gate.notified().await;
                    batch.iter().map(|x| x * 10).collect()
                }
            },
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn items_queued_behind_an_outstanding_call_leave_together() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::new(gated(limits(3, 100, 1), gate.clone(), seen.clone()));
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.call(1).await }
        });
        // The first call is outstanding once its batch was recorded.
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (2..=6)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        while b.queued.load(Ordering::Relaxed) < 5 {
            tokio::task::yield_now().await;
        }
        // Release each batch as it arrives until all are answered.
        let answers = async {
            let mut out = vec![first.await.unwrap()];
            for r in rest {
                out.push(r.await.unwrap());
            }
            out
        };
        let opener = async {
            loop {
                gate.notify_one();
                tokio::task::yield_now().await;
            }
        };
        let out = tokio::select! { out = answers => out, _ = opener => unreachable!() };
        assert_eq!(
            out,
            vec![Some(10), Some(20), Some(30), Some(40), Some(50), Some(60)]
        );
        let batches = seen.lock().unwrap().clone();
        assert_eq!(batches[0], vec![1]);
        // At most three items a batch, in queue order.
        assert!(batches.iter().all(|b| b.len() <= 3), "{batches:?}");
        assert_eq!(batches.concat(), vec![1, 2, 3, 4, 5, 6]);
        assert!(batches.len() <= 3, "queued items coalesce: {batches:?}");
    }

    #[tokio::test]
    async fn weight_limits_a_batch_and_a_heavy_item_goes_alone() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let b = Arc::new(Batcher::spawn(
            limits(100, 10, 1),
            |w: &u32| *w as usize,
            {
                let seen = seen.clone();
                move |batch: Vec<u32>| {
                    let seen = seen.clone();
                    let mut go = go_rx.clone();
                    async move {
                        seen.lock().unwrap().push(batch.clone());
                        let _ = go.wait_for(|g| *g).await;
                        batch
                    }
                }
            },
            CancellationToken::new(),
        ));
        let blocker = tokio::spawn({
            let b = b.clone();
            async move { b.call(1).await }
        });
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let calls: Vec<_> = [4u32, 5, 3, 20, 2]
            .into_iter()
            .map(|w| {
                let b = b.clone();
                tokio::spawn(async move { b.call(w).await })
            })
            .collect();
        while b.queued.load(Ordering::Relaxed) < 5 {
            tokio::task::yield_now().await;
        }
        go_tx.send(true).unwrap();
        assert_eq!(blocker.await.unwrap(), Some(1));
        for (call, w) in calls.into_iter().zip([4u32, 5, 3, 20, 2]) {
            assert_eq!(call.await.unwrap(), Some(w));
        }
        let batches = seen.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec![1], vec![4, 5], vec![3], vec![20], vec![2]]
        );
    }

    #[tokio::test]
    async fn posted_items_are_bounded_and_a_stopped_batcher_answers_none() {
        let stop = CancellationToken::new();
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let ran = Arc::new(AtomicUsize::new(0));
        let b: Batcher<u32, u32> = Batcher::spawn(
            limits(1, 100, 1),
            |_| 1,
            {
                let ran = ran.clone();
                move |batch: Vec<u32>| {
                    let mut go = go_rx.clone();
                    let ran = ran.clone();
                    async move {
                        let _ = go.wait_for(|g| *g).await;
                        ran.fetch_add(batch.len(), Ordering::Relaxed);
                        batch
                    }
                }
            },
            stop.clone(),
        );
        // One is taken by the (blocked) call, the others wait; past the bound a post is refused.
        assert!(b.post(1, 2));
        while b.queued.load(Ordering::Relaxed) > 0 {
            tokio::task::yield_now().await;
        }
        assert!(b.post(2, 2));
        assert!(b.post(3, 2));
        assert!(!b.post(4, 2), "a full queue refuses");
        go_tx.send(true).unwrap();
        while ran.load(Ordering::Relaxed) < 3 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        // The task is gone once the queue's receiver is dropped.
        while b.enqueue((9, None)).is_ok() {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.call(5).await, None);
        assert!(!b.post(6, 100));
    }
}
