//! Single flight: concurrent identical requests to ECR make one.
//!
//! A node that starts 30 pods of one image sends 30 identical manifest GETs at once, and every
//! one of them would go to ECR, where manifest GETs count against the account's `BatchGetImage`
//! quota that every node shares. [`SingleFlight::run`] lets the first caller for a key do the work
//! while the others wait for its answer. A caller that goes away (the client hung up) does not
//! strand the others: one of them runs its own work instead (tokio's `OnceCell` guarantees that),
//! and the key is forgotten as soon as an answer exists, so nothing is cached here: remembering
//! answers is [`super::cache`]'s job.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OnceCell;

/// Calls in flight, by key. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SingleFlight<K, V> {
    in_flight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

/// Whose work an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flight {
    /// This caller's own work.
    Led,
    /// Another caller's, which this one waited for.
    Joined,
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// Runs `work` for `key`, unless a call for the same key is in flight: then waits for that
    /// call's answer instead. Every caller gets a clone of the one answer.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> (V, Flight)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut map = self.lock();
            Arc::clone(map.entry(key.clone()).or_default())
        };
        let mut ran = false;
        let answer = cell
            .get_or_init(|| {
                ran = true;
                work()
            })
            .await
            .clone();
        if ran {
            // The answer exists: later callers must do new work, not read this one. A newer
            // flight may have replaced this one already; only this one is removed.
            let mut map = self.lock();
            if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                map.remove(&key);
            }
        }
        (answer, if ran { Flight::Led } else { Flight::Joined })
    }

    /// How many keys have a call in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<OnceCell<V>>>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    async fn slow(calls: &AtomicUsize, answer: u32) -> u32 {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        answer
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_for_one_key_make_one() {
        let sf = Arc::new(SingleFlight::<&str, u32>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..64 {
            let (sf, calls) = (Arc::clone(&sf), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                sf.run("tag", || slow(&calls, i)).await
            }));
        }
        let mut led = 0;
        let mut answers = Vec::new();
        for t in tasks {
            let (a, flight) = t.await.unwrap();
            answers.push(a);
            led += usize::from(flight == Flight::Led);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(led, 1);
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
        assert_eq!(sf.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_and_later_calls_do_their_own_work() {
        let sf = SingleFlight::<&str, u32>::default();
        let calls = AtomicUsize::new(0);
        let (a, b) = tokio::join!(
            sf.run("a", || slow(&calls, 1)),
            sf.run("b", || slow(&calls, 2))
        );
        assert_eq!((a.0, b.0), (1, 2));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The answer is not remembered: a call after the first finished asks again.
        let (c, flight) = sf.run("a", || slow(&calls, 3)).await;
        assert_eq!((c, flight), (3, Flight::Led));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_hands_the_work_to_a_waiter() {
        let sf = Arc::new(SingleFlight::<&str, u32>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let leader = {
            let (sf, calls) = (Arc::clone(&sf), Arc::clone(&calls));
            tokio::spawn(async move { sf.run("tag", || slow(&calls, 1)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = {
            let (sf, calls) = (Arc::clone(&sf), Arc::clone(&calls));
            tokio::spawn(async move { sf.run("tag", || slow(&calls, 2)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let (answer, flight) = waiter.await.unwrap();
        assert_eq!((answer, flight), (2, Flight::Led));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(sf.in_flight(), 0);
    }
}
