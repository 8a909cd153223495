//! The unified directory `tenant:{t}:directory:users` (SPEC 2): one entry per person, built
//! from every provider's stored `users`.
//!
//! Matching, in provider order (the tenant's `primary_provider` first, then by name; users
//! of one provider by id):
//! - the same person when a lower-case email matches;
//! - else when they share an E.164 number that exactly one user holds at each provider
//!   that has it (a shared main line or queue number never merges people);
//! - never two users of the same provider in one unified user (the second starts its own).
//!
//! Fields: the first member in provider order with a value wins (the primary provider on a
//! conflict); numbers are the union, the primary's first.
//!
//! Ids are stable: a unified user keeps the id of the previous unified user that held one
//! of its `(provider, id)` pairs, the oldest (`since`) when it merges several; a new one is
//! derived from its primary pair (`u_` + 16 hex digits of SHA-256).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::model::{is_e164, User};

/// One unified user: the JSON value of a directory field (the field is `id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnifiedUser {
    pub id: String,
    pub display_name: Option<String>,
    pub email: Option<String>,
    pub phone_numbers: Vec<String>,
    /// Provider name → that provider's user id.
    pub providers: BTreeMap<String, String>,
    /// When this unified id was first given (RFC 3339): the oldest wins a merge.
    pub since: String,
}

/// A new id from a `(provider, id)` pair.
pub fn derive_id(provider: &str, id: &str) -> String {
    let mut h = Sha256::new();
    h.update(provider.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    let d = h.finalize();
    let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("u_{hex}")
}

struct Cluster<'a> {
    members: Vec<&'a User>,
    providers: HashSet<&'a str>,
    emails: HashSet<String>,
    numbers: HashSet<&'a str>,
}

/// Builds the directory. `users` holds, per provider name, its stored users; `previous` the
/// directory as stored (for stable ids); `now` stamps new ids.
pub fn build(
    primary: Option<&str>,
    users: &BTreeMap<String, Vec<User>>,
    previous: &[UnifiedUser],
    now: &str,
) -> Vec<UnifiedUser> {
    let mut order: Vec<&str> = users.keys().map(String::as_str).collect();
    order.sort_by_key(|p| (Some(*p) != primary, *p));
    // Numbers that exactly one user holds at each provider that has them.
    let mut holders: HashMap<&str, HashMap<&str, usize>> = HashMap::new();
    for (p, list) in users {
        for u in list {
            let mut seen = HashSet::new();
            for n in u.phone_numbers.iter().filter(|n| is_e164(n)) {
                if seen.insert(n.as_str()) {
                    *holders
                        .entry(n.as_str())
                        .or_default()
                        .entry(p.as_str())
                        .or_default() += 1;
                }
            }
        }
    }
    let unique = |n: &str| holders.get(n).is_some_and(|m| m.values().all(|c| *c == 1));

    let mut clusters: Vec<Cluster<'_>> = Vec::new();
    let mut by_email: HashMap<String, Vec<usize>> = HashMap::new();
    let mut by_number: HashMap<&str, Vec<usize>> = HashMap::new();
    for p in &order {
        let mut list: Vec<&User> = users
            .get(*p)
            .map(|l| l.iter().collect())
            .unwrap_or_default();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        for u in list {
            let email = u.email.as_ref().map(|e| e.to_lowercase());
            let free = |i: &usize, clusters: &Vec<Cluster<'_>>| !clusters[*i].providers.contains(p);
            let found = email
                .as_ref()
                .and_then(|e| by_email.get(e))
                .and_then(|c| c.iter().find(|i| free(i, &clusters)).copied())
                .or_else(|| {
                    u.phone_numbers
                        .iter()
                        .filter(|n| is_e164(n) && unique(n))
                        .find_map(|n| {
                            by_number
                                .get(n.as_str())
                                .and_then(|c| c.iter().find(|i| free(i, &clusters)).copied())
                        })
                });
            let i = match found {
                Some(i) => i,
                None => {
                    clusters.push(Cluster {
                        members: Vec::new(),
                        providers: HashSet::new(),
                        emails: HashSet::new(),
                        numbers: HashSet::new(),
                    });
                    clusters.len() - 1
                }
            };
            let c = &mut clusters[i];
            c.members.push(u);
            c.providers.insert(p);
            if let Some(e) = email {
                if c.emails.insert(e.clone()) {
                    by_email.entry(e).or_default().push(i);
                }
            }
            for n in u.phone_numbers.iter().filter(|n| is_e164(n) && unique(n)) {
                if c.numbers.insert(n.as_str()) {
                    by_number.entry(n.as_str()).or_default().push(i);
                }
            }
        }
    }

    // Stable ids: (provider, id) -> previous unified user.
    let mut prev_of: HashMap<(&str, &str), &UnifiedUser> = HashMap::new();
    for u in previous {
        for (p, id) in &u.providers {
            prev_of.insert((p.as_str(), id.as_str()), u);
        }
    }
    let mut taken: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(clusters.len());
    for c in &clusters {
        let mut candidates: Vec<&UnifiedUser> = c
            .members
            .iter()
            .filter_map(|m| prev_of.get(&(m.provider.as_str(), m.id.as_str())).copied())
            .collect();
        candidates.sort_by(|a, b| (&a.since, &a.id).cmp(&(&b.since, &b.id)));
        let kept = candidates.into_iter().find(|u| !taken.contains(&u.id));
        let (id, since) = match kept {
            Some(u) => (u.id.clone(), u.since.clone()),
            None => {
                let first = c.members[0];
                let base = derive_id(&first.provider, &first.id);
                let mut id = base.clone();
                let mut n = 2u32;
                while taken.contains(&id) || previous.iter().any(|p| p.id == id) {
                    id = format!("{base}-{n}");
                    n = n.saturating_add(1);
                }
                (id, now.to_string())
            }
        };
        taken.insert(id.clone());
        let mut phone_numbers = Vec::new();
        for m in &c.members {
            for n in &m.phone_numbers {
                if !phone_numbers.contains(n) {
                    phone_numbers.push(n.clone());
                }
            }
        }
        out.push(UnifiedUser {
            id,
            display_name: c.members.iter().find_map(|m| m.display_name.clone()),
            email: c
                .members
                .iter()
                .find_map(|m| m.email.as_ref().map(|e| e.to_lowercase())),
            phone_numbers,
            providers: c
                .members
                .iter()
                .map(|m| (m.provider.clone(), m.id.clone()))
                .collect(),
            since,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(p: &str, id: &str, name: &str, email: Option<&str>, numbers: &[&str]) -> User {
        User {
            id: id.into(),
            provider: p.into(),
            display_name: Some(name.into()),
            email: email.map(str::to_string),
            extension: None,
            phone_numbers: numbers.iter().map(|s| s.to_string()).collect(),
            raw: serde_json::Value::Null,
        }
    }

    fn dir(users: Vec<User>) -> BTreeMap<String, Vec<User>> {
        let mut m: BTreeMap<String, Vec<User>> = BTreeMap::new();
        for u in users {
            m.entry(u.provider.clone()).or_default().push(u);
        }
        m
    }

    #[test]
    fn same_email_merges_and_the_primary_wins_fields() {
        let d = dir(vec![
            user(
                "teams",
                "t1",
                "Ann Lee",
                Some("ann@x.com"),
                &["+14155550100"],
            ),
            user("zoom", "z9", "Ann L.", Some("ANN@X.COM"), &["+14155550199"]),
        ]);
        let got = build(Some("zoom"), &d, &[], "2026-01-01T00:00:00+00:00");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].display_name.as_deref(), Some("Ann L."));
        assert_eq!(got[0].phone_numbers, ["+14155550199", "+14155550100"]);
        assert_eq!(got[0].providers.len(), 2);
        assert_eq!(got[0].id, derive_id("zoom", "z9"));
    }

    #[test]
    fn a_shared_number_does_not_merge_but_a_unique_one_does() {
        let d = dir(vec![
            user(
                "teams",
                "t1",
                "Ann",
                None,
                &["+14155550100", "+14155550000"],
            ),
            user("teams", "t2", "Bob", None, &["+14155550000"]),
            user("zoom", "z1", "Ann", None, &["+14155550100"]),
            user("zoom", "z2", "Bob", None, &["+14155550000"]),
        ]);
        let got = build(Some("teams"), &d, &[], "now");
        assert_eq!(got.len(), 3, "{got:#?}");
        let ann = got
            .iter()
            .find(|u| u.providers.get("teams").map(String::as_str) == Some("t1"))
            .expect("ann");
        assert_eq!(ann.providers.get("zoom").map(String::as_str), Some("z1"));
    }

    #[test]
    fn never_two_users_of_one_provider_in_one_unified_user() {
        let d = dir(vec![
            user("teams", "t1", "A", Some("a@x.com"), &[]),
            user("teams", "t2", "A2", Some("a@x.com"), &[]),
            user("zoom", "z1", "A", Some("a@x.com"), &[]),
        ]);
        let got = build(Some("teams"), &d, &[], "now");
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|u| u.providers.len() <= 2));
    }

    #[test]
    fn ids_are_stable_and_the_oldest_wins_a_merge() {
        let prev = vec![
            UnifiedUser {
                id: "u_old".into(),
                display_name: None,
                email: None,
                phone_numbers: vec![],
                providers: [("zoom".to_string(), "z1".to_string())].into(),
                since: "2025-01-01T00:00:00+00:00".into(),
            },
            UnifiedUser {
                id: "u_new".into(),
                display_name: None,
                email: None,
                phone_numbers: vec![],
                providers: [("teams".to_string(), "t1".to_string())].into(),
                since: "2026-01-01T00:00:00+00:00".into(),
            },
        ];
        let d = dir(vec![
            user("teams", "t1", "A", Some("a@x.com"), &[]),
            user("zoom", "z1", "A", Some("a@x.com"), &[]),
        ]);
        let got = build(Some("teams"), &d, &prev, "now");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "u_old");
        assert_eq!(got[0].since, "2025-01-01T00:00:00+00:00");
        let again = build(Some("teams"), &d, &got, "later");
        assert_eq!(again, got);
    }
}
