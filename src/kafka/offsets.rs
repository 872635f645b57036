//! Which offsets may be committed: per partition, one past the longest run
//! of fetched records (in fetch order) that are all durable. A record still
//! in intake holds back every record fetched after it, however many of
//! those are done, so a crash re-reads from the first record that was not
//! durable, never from past it.

use std::collections::{HashMap, VecDeque};

/// A topic and partition.
pub type Partition = (String, i32);

/// Handed out for each fetched record; given back when it is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    partition: Partition,
    generation: u64,
    offset: i64,
}

impl Ticket {
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }
}

#[derive(Debug, Default)]
struct Track {
    /// Bumped when the partition is revoked or re-fetched from an earlier
    /// offset: tickets of an older generation no longer count.
    generation: u64,
    /// Fetched records in fetch order, and whether each is durable.
    fetched: VecDeque<(i64, bool)>,
    /// Next offset to read, past every durable record of the run.
    committable: Option<i64>,
    /// What was last handed to a commit.
    committed: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Watermarks {
    parts: HashMap<Partition, Track>,
    generations: u64,
}

impl Watermarks {
    pub fn new() -> Watermarks {
        Watermarks::default()
    }

    /// A record was fetched. An offset at or before one already fetched (a
    /// seek, a rebalance that handed the partition back) starts the
    /// partition over: what was fetched before no longer decides its commit.
    pub fn fetched(&mut self, topic: &str, partition: i32, offset: i64) -> Ticket {
        let key = (topic.to_owned(), partition);
        let next_generation = self.generations + 1;
        let track = self.parts.entry(key.clone()).or_default();
        let restart = track
            .fetched
            .back()
            .is_some_and(|(last, _)| offset <= *last)
            || track.committable.is_some_and(|c| offset < c);
        if restart || track.generation == 0 {
            self.generations = next_generation;
            track.generation = next_generation;
            track.fetched.clear();
            if restart {
                track.committable = None;
            }
        }
        track.fetched.push_back((offset, false));
        Ticket {
            partition: key,
            generation: track.generation,
            offset,
        }
    }

    /// The record is durable (or set aside on the dead-letter topic).
    /// Returns whether the ticket still counted.
    pub fn done(&mut self, ticket: &Ticket) -> bool {
        let Some(track) = self.parts.get_mut(&ticket.partition) else {
            return false;
        };
        if track.generation != ticket.generation {
            return false;
        }
        let Some(slot) = track
            .fetched
            .iter_mut()
            .find(|(o, done)| *o == ticket.offset && !done)
        else {
            return false;
        };
        slot.1 = true;
        while let Some(&(offset, true)) = track.fetched.front() {
            track.fetched.pop_front();
            track.committable = Some(offset + 1);
        }
        true
    }

    /// The partitions are no longer ours: forget them (their tickets no
    /// longer count).
    pub fn revoke(&mut self, partitions: &[Partition]) {
        for p in partitions {
            self.parts.remove(p);
        }
    }

    /// What to commit for these partitions (all when `only` is `None`),
    /// whether or not it was committed before.
    pub fn committable(&self, only: Option<&[Partition]>) -> Vec<(Partition, i64)> {
        self.parts
            .iter()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .filter_map(|(p, t)| t.committable.map(|c| (p.clone(), c)))
            .collect()
    }

    /// Per partition, where what is not durable yet begins: the
    /// committable offset, or before any record is durable, the first
    /// record fetched (the consumer lag counts from here).
    pub fn not_durable_from(&self) -> Vec<(Partition, i64)> {
        self.parts
            .iter()
            .filter_map(|(p, t)| {
                t.committable
                    .or(t.fetched.front().map(|(o, _)| *o))
                    .map(|o| (p.clone(), o))
            })
            .collect()
    }

    /// Offsets that moved since the last call, marked as committed.
    pub fn to_commit(&mut self) -> Vec<(Partition, i64)> {
        let mut out = Vec::new();
        for (p, t) in self.parts.iter_mut() {
            if let Some(c) = t.committable
                && t.committed != Some(c)
            {
                t.committed = Some(c);
                out.push((p.clone(), c));
            }
        }
        out
    }

    /// A commit of these offsets failed: offer them again next time.
    pub fn commit_failed(&mut self, offsets: &[(Partition, i64)]) {
        for (p, c) in offsets {
            if let Some(t) = self.parts.get_mut(p)
                && t.committed == Some(*c)
            {
                t.committed = None;
            }
        }
    }

    /// Records fetched and not yet durable, across partitions.
    pub fn in_flight(&self) -> usize {
        self.parts
            .values()
            .map(|t| t.fetched.iter().filter(|(_, done)| !done).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("t".to_owned(), n)
    }

    #[test]
    fn a_record_in_intake_holds_back_every_later_one() {
        let mut w = Watermarks::new();
        let a = w.fetched("t", 0, 10);
        let b = w.fetched("t", 0, 11);
        let c = w.fetched("t", 0, 13); // a gap (compaction) is not a hole
        assert!(w.done(&b) && w.done(&c));
        assert!(
            w.to_commit().is_empty(),
            "10 is not durable: nothing to commit"
        );
        assert_eq!(w.in_flight(), 1);
        assert!(w.done(&a));
        assert_eq!(w.to_commit(), vec![(p(0), 14)]);
        assert!(w.to_commit().is_empty(), "committed once");
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut w = Watermarks::new();
        let a0 = w.fetched("t", 0, 0);
        let a1 = w.fetched("t", 1, 5);
        let _b0 = w.fetched("t", 0, 1);
        assert!(w.done(&a1) && w.done(&a0));
        let mut c = w.to_commit();
        c.sort();
        assert_eq!(c, vec![(p(0), 1), (p(1), 6)]);
    }

    #[test]
    fn a_revoked_partition_forgets_its_tickets_and_a_refetch_starts_over() {
        let mut w = Watermarks::new();
        let a = w.fetched("t", 0, 0);
        let b = w.fetched("t", 0, 1);
        assert!(w.done(&a));
        assert_eq!(w.to_commit(), vec![(p(0), 1)]);
        w.revoke(&[p(0)]);
        assert!(!w.done(&b), "a revoked partition's ticket does not count");
        assert_eq!(w.in_flight(), 0);
        // Handed back, read again from the committed offset.
        let b2 = w.fetched("t", 0, 1);
        assert!(!w.done(&b));
        assert!(w.done(&b2));
        assert_eq!(w.to_commit(), vec![(p(0), 2)]);
        // A seek back within the same assignment starts over too.
        let old = w.fetched("t", 0, 2);
        let again = w.fetched("t", 0, 0);
        assert_eq!(w.in_flight(), 1, "the seek forgot offset 2");
        assert!(!w.done(&old), "from before the seek");
        assert!(w.done(&again));
        assert_eq!(w.to_commit(), vec![(p(0), 1)]);
    }

    #[test]
    fn what_is_not_durable_begins_at_the_first_unfinished_record() {
        let mut w = Watermarks::new();
        let a = w.fetched("t", 0, 4);
        let _b = w.fetched("t", 0, 5);
        assert_eq!(w.not_durable_from(), vec![(p(0), 4)], "nothing durable yet");
        w.done(&a);
        assert_eq!(w.not_durable_from(), vec![(p(0), 5)]);
    }

    #[test]
    fn a_failed_commit_is_offered_again() {
        let mut w = Watermarks::new();
        let a = w.fetched("t", 0, 7);
        w.done(&a);
        let c = w.to_commit();
        assert_eq!(c, vec![(p(0), 8)]);
        w.commit_failed(&c);
        assert_eq!(w.to_commit(), vec![(p(0), 8)]);
        assert_eq!(w.committable(Some(&[p(0)])), vec![(p(0), 8)]);
        assert!(w.committable(Some(&[p(1)])).is_empty());
    }
}
