//! Read caches that stay exact across processes: a map whose entries are valid only while the
//! [`Epochs`] stamp of the domains it depends on is unchanged.
//!
//! Protocol (see [`crate::epoch`] for why it is exact):
//! 1. [`EpochCache::get`] takes the stamp *first*. If it differs from the one the map was
//!    filled under, the map is emptied. A hit is returned only if younger than the maximum age.
//! 2. On a miss the caller reads the database and offers the result with
//!    [`EpochCache::insert`] and the [`Ticket`] from step 1; it is kept only if the map is still
//!    on that ticket's stamp (a change committed during the read has moved it on, or will).
//!
//! The maximum age bounds how long a value can outlive a change whose stamp write failed; the
//! size cap bounds memory (a full map is emptied). Values are dropped, and
//! secrets among them zeroized by their own types, when evicted or flushed.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::epoch::{Domain, Epochs, Stamp};

/// Proof that a lookup missed, carrying the stamp taken before the database read.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(Option<Stamp>);

/// A lookup: the cached value, or a ticket to offer the value read from the database.
pub enum Lookup<V> {
    /// A value valid under the current stamp.
    Hit(V),
    /// Read the database, then [`EpochCache::insert`] with this ticket.
    Miss(Ticket),
}

struct State<K, V> {
    stamp: Option<Stamp>,
    map: HashMap<K, (V, Instant)>,
}

/// An epoch-validated map. `V` is cloned on a hit: keep it cheap (an `Arc`).
pub struct EpochCache<K, V> {
    epochs: Epochs,
    domains: &'static [Domain],
    max_age: Duration,
    cap: usize,
    state: Mutex<State<K, V>>,
}

impl<K: Eq + Hash, V: Clone> EpochCache<K, V> {
    /// A cache of at most `cap` entries, each valid while `domains` are unchanged and for at
    /// most `max_age`.
    pub fn new(epochs: Epochs, domains: &'static [Domain], cap: usize, max_age: Duration) -> Self {
        Self { epochs, domains, max_age, cap, state: Mutex::new(State { stamp: None, map: HashMap::new() }) }
    }

    /// Look `key` up (step 1 of the protocol).
    pub fn get<Q>(&self, key: &Q) -> Lookup<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(stamp) = self.epochs.stamp(self.domains) else {
            // No trustworthy stamp (caching off, or the stamp file lost): serve nothing, and
            // drop what is held so no opened credential lingers in memory.
            if let Ok(mut st) = self.state.lock()
                && !st.map.is_empty()
            {
                st.map.clear();
                st.stamp = None;
            }
            return Lookup::Miss(Ticket(None));
        };
        let Ok(mut st) = self.state.lock() else { return Lookup::Miss(Ticket(None)) };
        if st.stamp != Some(stamp) {
            st.map.clear();
            st.stamp = Some(stamp);
        }
        match st.map.get(key) {
            Some((v, at)) if at.elapsed() < self.max_age => Lookup::Hit(v.clone()),
            _ => Lookup::Miss(Ticket(Some(stamp))),
        }
    }

    /// Offer a value read after `ticket` was issued (step 2).
    pub fn insert(&self, ticket: Ticket, key: K, value: V) {
        let Some(stamp) = ticket.0 else { return };
        let Ok(mut st) = self.state.lock() else { return };
        if st.stamp != Some(stamp) {
            return;
        }
        if st.map.len() >= self.cap && !st.map.contains_key(&key) {
            // Full: start over rather than keep an eviction order on the hot path. With the cap
            // well above the number of leases in active use this is rare.
            st.map.clear();
        }
        st.map.insert(key, (value, Instant::now()));
    }

    /// Both steps for a value that may be absent: the cached value, else `load`'s answer read
    /// after the stamp was taken, kept only when present (an absent key is looked up every
    /// time, so that made-up keys cannot fill the cache).
    pub async fn get_or_load<Q, E, Fut>(&self, key: &Q, load: impl FnOnce() -> Fut) -> Result<Option<V>, E>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
        Fut: std::future::Future<Output = Result<Option<V>, E>>,
    {
        let ticket = match self.get(key) {
            Lookup::Hit(v) => return Ok(Some(v)),
            Lookup::Miss(t) => t,
        };
        let loaded = load().await?;
        if let Some(v) = &loaded {
            self.insert(ticket, key.to_owned(), v.clone());
        }
        Ok(loaded)
    }

    /// Number of entries (for metrics and tests).
    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.map.len()).unwrap_or(0)
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(epochs: &Epochs) -> EpochCache<String, u32> {
        EpochCache::new(epochs.clone(), &[Domain::Leases], 2, Duration::from_secs(60))
    }

    fn miss(l: Lookup<u32>) -> Ticket {
        match l {
            Lookup::Miss(t) => t,
            Lookup::Hit(v) => panic!("unexpected hit {v}"),
        }
    }

    #[test]
    fn a_change_committed_during_the_read_keeps_the_stale_value_out() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = Epochs::open(&Epochs::path_for(&dir.path().join("v.db"))).unwrap();
        let other_process = Epochs::open(&Epochs::path_for(&dir.path().join("v.db"))).unwrap();
        let c = cache(&epochs);
        let t = miss(c.get("a"));
        c.insert(t, "a".into(), 1);
        assert!(matches!(c.get("a"), Lookup::Hit(1)));
        // Another process commits a change: the next lookup misses.
        other_process.bump(Domain::Leases);
        let t_old = miss(c.get("a"));
        // A reader that took its ticket before a change must not fill the cache after it.
        other_process.bump(Domain::Leases);
        let t_new = miss(c.get("b"));
        c.insert(t_old, "a".into(), 2);
        assert!(matches!(c.get("a"), Lookup::Miss(_)), "value read under an old stamp was kept");
        c.insert(t_new, "b".into(), 3);
        assert!(matches!(c.get("b"), Lookup::Hit(3)));
        // A change in another domain does not flush it.
        other_process.bump(Domain::Config);
        assert!(matches!(c.get("b"), Lookup::Hit(3)));
    }

    #[test]
    fn disabled_epochs_never_cache_and_a_full_map_starts_over() {
        let c = cache(&Epochs::disabled());
        let t = miss(c.get("a"));
        c.insert(t, "a".into(), 1);
        assert!(c.is_empty());

        let dir = tempfile::tempdir().unwrap();
        let c = cache(&Epochs::open(&Epochs::path_for(&dir.path().join("v.db"))).unwrap());
        for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
            let t = miss(c.get(k));
            c.insert(t, k.into(), i as u32);
        }
        assert_eq!(c.len(), 1, "the third insert into a cap-2 map starts over");
        assert!(matches!(c.get("c"), Lookup::Hit(2)));
    }

    #[test]
    fn a_lost_stamp_file_empties_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = Epochs::path_for(&dir.path().join("v.db"));
        let epochs = Epochs::open(&path).unwrap();
        let c = cache(&epochs);
        let t = miss(c.get("a"));
        c.insert(t, "a".into(), 1);
        assert!(matches!(c.get("a"), Lookup::Hit(1)));
        std::fs::remove_file(&path).unwrap();
        epochs.bump(Domain::Leases); // notices the file is gone
        assert!(matches!(c.get("a"), Lookup::Miss(_)));
        assert!(c.is_empty(), "nothing opened stays in memory once stamps cannot be trusted");
    }

    #[test]
    fn entries_expire_after_the_maximum_age() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = Epochs::open(&Epochs::path_for(&dir.path().join("v.db"))).unwrap();
        let c: EpochCache<String, u32> = EpochCache::new(epochs, &[Domain::Config], 8, Duration::ZERO);
        let t = miss(c.get("a"));
        c.insert(t, "a".into(), 1);
        assert!(matches!(c.get("a"), Lookup::Miss(_)));
    }
}
