//! Which live replica serves which tenant: rendezvous (highest random weight) hashing.
//!
//! Every replica sees the same membership: the ids in `tokenwarden:replicas` whose last
//! heartbeat is younger than `replica.heartbeat_ttl_secs` ([`crate::replica`]). A tenant
//! belongs to the replica whose `weight(replica, tenant)` is highest, so each replica decides
//! alone and all agree, and when a replica joins or leaves only the tenants it wins or held
//! move (about 1/N of the fleet), spread over the others rather than to one. A replica reads,
//! tracks, schedules and probes only its own tenants; the per-provider lock and the
//! reservation stay the safety net while two replicas briefly disagree (a heartbeat that has
//! just expired for one of them and not yet for the other).
//!
//! The weight is a fixed function (FNV-1a over `replica`, a 0xff separator and `tenant`, then
//! the SplitMix64 finaliser), so replicas of different versions agree during a rolling
//! upgrade. With `replica.share_fleet = false` every replica serves every tenant (the locks
//! alone keep them apart).

use std::sync::{Arc, RwLock};

/// The weight of `tenant` for `replica`: stable across processes, platforms and versions.
pub fn weight(replica: &str, tenant: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in replica
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(tenant.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64 finaliser: spreads FNV's weak low bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The owner of `tenant` among `replicas` (`None` when there is none).
pub fn owner<'a>(tenant: &str, replicas: &'a [String]) -> Option<&'a str> {
    replicas
        .iter()
        .max_by_key(|r| (weight(r, tenant), r.as_str()))
        .map(String::as_str)
}

/// The live replicas as this one last read them, and whether to share at all.
#[derive(Debug, Default)]
struct View {
    replicas: Vec<String>,
    generation: u64,
    share: bool,
}

/// This replica's view of the membership, shared by the heartbeat task (writer) and the
/// registry follower (reader).
#[derive(Debug, Clone)]
pub struct Membership {
    me: Arc<str>,
    view: Arc<RwLock<View>>,
}

impl Membership {
    pub fn new(me: &str, share: bool) -> Membership {
        Membership {
            me: Arc::from(me),
            view: Arc::new(RwLock::new(View {
                replicas: vec![me.to_string()],
                generation: 0,
                share,
            })),
        }
    }

    /// Records the live replicas (this one is always among them); bumps the generation
    /// when the set changed.
    pub fn update(&self, mut live: Vec<String>, share: bool) -> bool {
        if !live.iter().any(|r| **r == *self.me) {
            live.push(self.me.to_string());
        }
        live.sort();
        live.dedup();
        let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
        if v.replicas == live && v.share == share {
            return false;
        }
        v.replicas = live;
        v.share = share;
        v.generation += 1;
        true
    }

    /// Bumped whenever the membership changed.
    pub fn generation(&self) -> u64 {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    pub fn live(&self) -> Vec<String> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .replicas
            .clone()
    }

    /// Whether this replica serves `tenant`.
    pub fn owns(&self, tenant: &str) -> bool {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        !v.share || owner(tenant, &v.replicas).is_none_or(|o| *o == *self.me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("pod-{i}")).collect()
    }

    #[test]
    fn weights_are_fixed_values() {
        // A change here breaks rolling upgrades: replicas of two versions would disagree.
        assert_eq!(weight("pod-0", "acme"), weight("pod-0", "acme"));
        assert_ne!(weight("pod-0", "acme"), weight("pod-1", "acme"));
        assert_eq!(weight("a", "b"), 0x552d_4556_57d9_1379);
        assert_eq!(weight("pod-0", "acme"), 0x18e7_64a4_c2e0_8f11);
    }

    #[test]
    fn shares_are_fair_and_only_a_leavers_tenants_move() {
        let three = replicas(3);
        let tenants: Vec<String> = (0..30_000).map(|i| format!("tenant-{i}")).collect();
        let mut counts = [0usize; 3];
        for t in &tenants {
            let o = owner(t, &three).expect("an owner");
            let i = three.iter().position(|r| r == o).expect("a member");
            counts[i] += 1;
        }
        for c in counts {
            assert!((9_000..=11_000).contains(&c), "unfair share: {counts:?}");
        }
        let two: Vec<String> = three[..2].to_vec();
        let mut moved = 0;
        for t in &tenants {
            let before = owner(t, &three).expect("owner");
            let after = owner(t, &two).expect("owner");
            if before != after {
                assert_eq!(before, "pod-2", "{t} moved although its owner stayed");
                moved += 1;
            }
        }
        assert_eq!(moved, counts[2]);
    }

    #[test]
    fn membership_always_includes_itself_and_counts_changes() {
        let m = Membership::new("pod-1", true);
        assert!(m.owns("anything"));
        assert!(m.update(vec!["pod-0".into()], true));
        assert_eq!(m.live(), vec!["pod-0".to_string(), "pod-1".to_string()]);
        assert!(!m.update(vec!["pod-1".into(), "pod-0".into()], true));
        assert_eq!(m.generation(), 1);
        let mine = (0..100).filter(|i| m.owns(&format!("t{i}"))).count();
        assert!((20..=80).contains(&mine), "{mine}");
        let all = Membership::new("pod-1", false);
        all.update(vec!["pod-0".into()], false);
        assert!((0..100).all(|i| all.owns(&format!("t{i}"))));
    }
}
