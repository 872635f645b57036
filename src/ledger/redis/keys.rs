//! Where a transaction lives in Redis: the shard of an id and the key names.
//!
//! Every key of one shard shares the hash tag `{<prefix>:s<N>}`, so a script
//! that moves one transaction between states touches a single hash slot and
//! stays atomic on a cluster. Sixteen shards spread the per-state counts and
//! indexes over sixteen slots (no global hot key) while `counts()` and
//! `list()` stay a fixed sixteen calls. The prefix is inside the tag so two
//! deployments sharing a cluster land on different slots.
//!
//! The shard function is part of the stored format: changing `SHARDS` or the
//! hash strands every existing record (rebuild the ledger from the WAL).

use crate::transaction::State;

pub const SHARDS: u32 = 16;

/// FNV-1a (32 bit) of the id, modulo [`SHARDS`]: stable across builds and
/// platforms, unlike `std`'s randomised hasher.
pub fn shard_of(id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SHARDS
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// A prefix may not contain braces: they would move the hash tag.
    pub fn new(prefix: &str) -> Result<Keys, String> {
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(format!(
                "RTPD_REDIS_KEY_PREFIX must be non-empty and free of braces, got {prefix:?}"
            ));
        }
        Ok(Keys {
            prefix: prefix.to_owned(),
        })
    }

    fn tag(&self, shard: u32) -> String {
        format!("{{{}:s{shard}}}", self.prefix)
    }

    pub fn tx(&self, id: &str) -> String {
        format!("{}:tx:{id}", self.tag(shard_of(id)))
    }

    /// Per-state counters of one shard: a hash `state -> n`.
    pub fn counts(&self, shard: u32) -> String {
        format!("{}:counts", self.tag(shard))
    }

    /// Ids of one shard in one state (or any state, `None`), scored by
    /// `updated_at` in microseconds.
    pub fn index(&self, shard: u32, state: Option<State>) -> String {
        match state {
            Some(s) => format!("{}:idx:{}", self.tag(shard), s.as_str()),
            None => format!("{}:idx:all", self.tag(shard)),
        }
    }

    /// The keys every script of one shard is given, in the order the scripts
    /// expect: counts, the all-states index, the five state indexes in
    /// `State::ALL` order.
    pub fn shard_keys(&self, shard: u32) -> Vec<String> {
        let mut keys = Vec::with_capacity(8);
        keys.push(self.counts(shard));
        keys.push(self.index(shard, None));
        keys.extend(State::ALL.iter().map(|s| self.index(shard, Some(*s))));
        keys
    }

    /// The shard's intact mark ([`crate::ledger::Ledger::intact`]): written
    /// after a rebuild, gone when Redis loses the shard's slot.
    pub fn intact(&self, shard: u32) -> String {
        format!("{}:intact", self.tag(shard))
    }

    /// The WAL records of the shard's ids refused while it had no intact
    /// mark (lost with the shard's data, like everything else).
    pub fn lost_refused(&self, shard: u32) -> String {
        format!("{}:lost_refused", self.tag(shard))
    }

    /// The shard's rebuild in progress (its token).
    pub fn rebuild(&self, shard: u32) -> String {
        format!("{}:rebuild", self.tag(shard))
    }

    /// A named lease (one key, its own slot).
    pub fn lease(&self, name: &str) -> String {
        format!("{{{}:ops}}:lease:{name}", self.prefix)
    }

    /// A named checkpoint value (one key, its own slot).
    pub fn checkpoint(&self, name: &str) -> String {
        format!("{{{}:ops}}:checkpoint:{name}", self.prefix)
    }

    /// [`Keys::shard_keys`] of the id's shard followed by the id's record key.
    pub fn transition_keys(&self, id: &str) -> Vec<String> {
        let mut keys = self.shard_keys(shard_of(id));
        keys.push(self.tx(id));
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = key[open..].find('}').unwrap() + open;
        &key[open + 1..close]
    }

    #[test]
    fn shard_is_stable_and_spread() {
        // Pinned: these values are part of the stored format.
        assert_eq!(shard_of("tx-1"), shard_of("tx-1"));
        assert_eq!(shard_of(""), 0x811c_9dc5 % SHARDS);
        let mut seen = [0u32; SHARDS as usize];
        for i in 0..1600 {
            seen[shard_of(&format!("tx-{i}")) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn every_key_of_a_transition_shares_one_hash_tag() {
        let k = Keys::new("rtpd").unwrap();
        let keys = k.transition_keys("abc:1");
        assert_eq!(keys.len(), 8);
        let tag = slot_tag(&keys[0]);
        assert!(keys.iter().all(|key| slot_tag(key) == tag), "{keys:?}");
        assert_eq!(keys[7], format!("{{rtpd:s{}}}:tx:abc:1", shard_of("abc:1")));
        assert!(Keys::new("a{b").is_err());
        assert!(Keys::new("").is_err());
    }
}
