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
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights = Arc::new(SingleFlight::<&str, usize>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..10 {
            let (flights, runs) = (flights.clone(), runs.clone());
            handles.push(tokio::spawn(async move {
                flights
                    .run("k", || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 100
                    })
                    .await
            }));
        }
        let mut joined = 0;
        for h in handles {
            let (v, j) = h.await.unwrap();
            assert_eq!(v, 100);
            joined += j as usize;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 9);
        // Finished calls are forgotten: the next call runs again.
        let (v, j) = flights.run("k", || async { 7 }).await;
        assert_eq!((v, j), (7, false));
    }

    #[tokio::test]
    async fn work_survives_callers_going_away() {
        let flights = SingleFlight::<u8, u8>::new();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let call = flights.run(1, || async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            d.fetch_add(1, Ordering::SeqCst);
            1
        });
        drop(tokio::time::timeout(Duration::from_millis(1), call).await);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
