//! At most one computation per key at a time; later callers await the running one. The work runs
//! as its own task, so it finishes (and its result is cached by the caller's code) even when every
//! caller that was waiting for it has gone away.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

type Calls<K, V> = Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>;

pub struct SingleFlight<K, V: Clone> {
    calls: Calls<K, V>,
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        SingleFlight {
            calls: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Run `make()` unless a call for `key` is already running; returns the result and whether
    /// this caller joined another's call.
    pub async fn run<F, Fut>(&self, key: K, make: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (shared, joined) = {
            let mut calls = self.calls.lock().expect("single-flight lock");
            match calls.get(&key) {
                Some(running) => (running.clone(), true),
                None => {
                    let shared = self.spawn(key.clone(), make());
                    calls.insert(key, shared.clone());
                    (shared, false)
                }
            }
        };
        (shared.await, joined)
    }

    fn spawn<Fut>(&self, key: K, work: Fut) -> Shared<BoxFuture<'static, V>>
    where
        Fut: Future<Output = V> + Send + 'static,
    {
        let forget = ForgetOnDrop {
            calls: self.calls.clone(),
            key: Some(key),
        };
        let task = tokio::spawn(async move {
            let _forget = forget;
            work.await
        });
        async move {
            match task.await {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        .boxed()
        .shared()
    }
}

impl<K, V> Default for SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

/// Removes the key when the work ends, even by panic, so a failed call is retried next time.
struct ForgetOnDrop<K: Hash + Eq, V> {
    calls: Calls<K, V>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for ForgetOnDrop<K, V> {
    fn drop(&mut self) {
        if let (Some(key), Ok(mut calls)) = (self.key.take(), self.calls.lock()) {
            calls.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::{oneshot, watch};

    /// Work that runs until `open` is sent `true`.
    fn held(gate: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights = SingleFlight::<&str, usize>::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let (open, gate) = watch::channel(false);
        let calls = (0..10).map(|_| {
            let (runs, work) = (runs.clone(), held(&gate));
            flights.run("k", || async move {
                work.await;
                runs.fetch_add(1, Ordering::SeqCst) + 100
            })
        });
        let mut all = std::pin::pin!(futures_util::future::join_all(calls));
        // One poll starts every call; the work is held, so all ten are in flight at once.
        assert!(all.as_mut().now_or_never().is_none());
        open.send(true).unwrap();
        let results = all.await;
        assert!(results.iter().all(|(v, _)| *v == 100), "{results:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(results.iter().filter(|(_, joined)| *joined).count(), 9);
        // Finished calls are forgotten: the next call runs again.
        let (v, j) = flights.run("k", || async { 7 }).await;
        assert_eq!((v, j), (7, false));
    }

    #[tokio::test]
    async fn work_survives_callers_going_away() {
        let flights = SingleFlight::<u8, u8>::new();
        let (open, gate) = watch::channel(false);
        let (finished, heard) = oneshot::channel();
        let work = held(&gate);
        let mut call = Box::pin(flights.run(1, || async move {
            work.await;
            let _ = finished.send(());
            1
        }));
        // Started, then the only caller leaves before the work ends.
        assert!(call.as_mut().now_or_never().is_none());
        drop(call);
        open.send(true).unwrap();
        // The deadline only turns a hang (work that stopped with its caller) into a failure.
        let heard = tokio::time::timeout(std::time::Duration::from_secs(20), heard).await;
        assert!(
            matches!(heard, Ok(Ok(()))),
            "the work did not run to its end without a caller"
        );
    }
}
