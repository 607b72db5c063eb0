//! Pure: shard placement by rendezvous (highest-random-weight) hashing. Each shard
//! goes to the member whose weight for it is highest, so a member that joins takes
//! only the shards it now wins, and one that leaves gives up only its own: no shard
//! moves between members that stay. A rebalance moves live shards a few at a time
//! (`max_moves`), while shards whose owner is gone are placed at once.

use fleetline_wire::shard::fnv1a64;

/// A member's weight for a shard: FNV-1a of the member id and the shard, mixed so
/// that close ids and shard numbers spread evenly.
fn weight(member: &str, shard: u16) -> u64 {
    let mut key = Vec::with_capacity(member.len() + 3);
    key.extend_from_slice(member.as_bytes());
    key.push(0);
    key.extend_from_slice(&shard.to_le_bytes());
    // SplitMix64's finalizer.
    let mut z = fnv1a64(&key);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The member that should own `shard` (ties, vanishingly rare, go to the smaller id).
pub fn owner<'m>(shard: u16, members: &[&'m str]) -> Option<&'m str> {
    members.iter().copied().max_by(|a, b| weight(a, shard).cmp(&weight(b, shard)).then_with(|| b.cmp(a)))
}

/// Where every shard of a keyspace of `shard_count` should be.
pub fn target<'m>(shard_count: u16, members: &[&'m str]) -> Vec<Option<&'m str>> {
    (0..shard_count).map(|s| owner(s, members)).collect()
}

/// One ownership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// Shard.
    pub shard: u16,
    /// Its owner now (`None`: no live owner).
    pub from: Option<String>,
    /// Its owner after the move.
    pub to: String,
}

/// The moves of one round from `current` (index = shard, value = owner) towards
/// the target over `members`: every shard without a live owner at once, and at
/// most `max_moves` shards that still have a live owner, lowest shard first (the
/// next round takes the next ones).
pub fn plan(current: &[Option<String>], members: &[&str], max_moves: usize) -> Vec<Move> {
    let mut orphans = Vec::new();
    let mut rebalance = Vec::new();
    for (shard, owner_now) in current.iter().enumerate() {
        let shard = shard as u16;
        let Some(to) = owner(shard, members) else { continue };
        let live = owner_now.as_deref().filter(|o| members.contains(o));
        if live == Some(to) {
            continue;
        }
        let m = Move { shard, from: owner_now.clone(), to: to.to_string() };
        if live.is_none() { orphans.push(m) } else { rebalance.push(m) }
    }
    rebalance.truncate(max_moves);
    orphans.extend(rebalance);
    orphans
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARDS: u16 = 64;

    fn owned(t: &[Option<&str>]) -> Vec<Option<String>> {
        t.iter().map(|o| o.map(str::to_string)).collect()
    }

    #[test]
    fn every_shard_has_one_owner_and_the_load_is_spread() {
        let members = ["cloud-0", "cloud-1", "cloud-2"];
        let t = target(SHARDS, &members);
        assert!(t.iter().all(Option::is_some));
        for m in members {
            let n = t.iter().filter(|o| **o == Some(m)).count();
            assert!((12..=32).contains(&n), "{m} owns {n} of {SHARDS}");
        }
        // The same answer every time, on every node.
        assert_eq!(t, target(SHARDS, &["cloud-2", "cloud-0", "cloud-1"]));
        assert_eq!(target(SHARDS, &[]), vec![None; SHARDS as usize]);
    }

    #[test]
    fn a_join_or_a_leave_moves_only_the_shards_it_must() {
        let three = target(SHARDS, &["a", "b", "c"]);
        let four = target(SHARDS, &["a", "b", "c", "d"]);
        for (before, after) in three.iter().zip(&four) {
            assert!(before == after || *after == Some("d"), "a shard moved between members that stayed");
        }
        assert!(four.contains(&Some("d")), "the new member takes some");
        let two = target(SHARDS, &["a", "c"]);
        for (before, after) in three.iter().zip(&two) {
            assert!(before == after || *before == Some("b"), "only the leaver's shards move");
        }
    }

    #[test]
    fn orphans_are_placed_at_once_live_shards_a_few_per_round() {
        let members = ["a", "b", "c"];
        // Everything on "a", and "gone" held shard 0.
        let mut current = vec![Some("a".to_string()); SHARDS as usize];
        current[0] = Some("gone".into());
        current[1] = None;
        let moves = plan(&current, &members, 4);
        let orphans: Vec<_> = moves.iter().filter(|m| m.shard < 2).collect();
        assert_eq!(orphans.len(), 2, "{moves:?}");
        assert_eq!(moves.len(), 2 + 4);
        // Round after round the cluster reaches the target and then stays.
        let mut rounds = 0;
        loop {
            let moves = plan(&current, &members, 4);
            if moves.is_empty() {
                break;
            }
            for m in moves {
                current[usize::from(m.shard)] = Some(m.to);
            }
            rounds += 1;
            assert!(rounds < 20);
        }
        assert_eq!(current, owned(&target(SHARDS, &members)));
    }
}
