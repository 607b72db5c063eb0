//! Pure: members, their roles, and a view of the cluster (a member set) with the
//! questions every node asks of it the same way.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// What a node does. A node has one or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Owns shards: takes bundles, commits, acks.
    Ingest,
    /// Runs the singletons (rollup, dead-letter replay orchestration).
    Jobs,
    /// Answers HTTP queries and the registry's REST.
    Api,
    /// Scores models.
    Inference,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Ingest, Role::Jobs, Role::Api, Role::Inference];

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Jobs => "jobs",
            Role::Api => "api",
            Role::Inference => "inference",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s.trim())
    }

    /// Parses a list as a pod label carries it: `ingest.jobs` or `ingest,jobs`
    /// (label values allow no commas, so dots or dashes too). Unknown names are
    /// returned apart.
    pub fn parse_list(s: &str) -> (BTreeSet<Role>, Vec<String>) {
        let mut roles = BTreeSet::new();
        let mut unknown = Vec::new();
        for part in s.split([',', '.', '_', '-', ' ']).filter(|p| !p.is_empty()) {
            match Self::parse(part) {
                Some(r) => {
                    roles.insert(r);
                }
                None => unknown.push(part.to_string()),
            }
        }
        (roles, unknown)
    }
}

/// A node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub id: String,
    /// Where its HTTP endpoint is reached (`host:port`).
    pub http: String,
    /// Its roles.
    pub roles: BTreeSet<Role>,
    /// Its build version (two versions at once: a rollout is in progress).
    pub version: String,
}

impl Member {
    /// Whether it has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// A member set, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct View {
    members: Vec<Member>,
}

impl View {
    /// A view of `members` (sorted; a repeated id keeps its first entry).
    pub fn new(mut members: Vec<Member>) -> Self {
        members.sort();
        members.dedup_by(|a, b| a.id == b.id);
        Self { members }
    }

    /// Every member.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member with id `id`.
    pub fn get(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Ids of the members with `role`, sorted.
    pub fn with_role(&self, role: Role) -> Vec<&str> {
        self.members.iter().filter(|m| m.has(role)).map(|m| m.id.as_str()).collect()
    }

    /// Members run more than one version: a rollout is in progress, and live
    /// shards are not moved until it ends.
    pub fn rollout(&self) -> bool {
        self.members.windows(2).any(|w| w[0].version != w[1].version)
    }

    /// Where a singleton of `role` runs without leases: the lowest member id with
    /// the role (every node that sees the same view agrees).
    pub fn singleton(&self, role: Role) -> Option<&str> {
        self.with_role(role).into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, roles: &str, version: &str) -> Member {
        Member { id: id.into(), http: format!("{id}:1"), roles: Role::parse_list(roles).0, version: version.into() }
    }

    #[test]
    fn roles_parse_from_labels_and_lists() {
        let (r, bad) = Role::parse_list("ingest.jobs");
        assert_eq!((r.into_iter().collect::<Vec<_>>(), bad.len()), (vec![Role::Ingest, Role::Jobs], 0));
        let (r, bad) = Role::parse_list("api, inference,gpu");
        assert_eq!(r.len(), 2);
        assert_eq!(bad, ["gpu"]);
    }

    #[test]
    fn views_answer_roles_rollouts_and_singletons() {
        let v = View::new(vec![m("c", "ingest", "1"), m("a", "jobs.api", "1"), m("b", "ingest.jobs", "1")]);
        assert_eq!(v.with_role(Role::Ingest), ["b", "c"]);
        assert_eq!(v.singleton(Role::Jobs), Some("a"));
        assert_eq!(v.singleton(Role::Inference), None);
        assert!(!v.rollout());
        let v = View::new(vec![m("a", "ingest", "1"), m("b", "ingest", "2"), m("a", "ingest", "9")]);
        assert_eq!(v.members().len(), 2);
        assert!(v.rollout());
    }
}
