//! Pure: acts only on a member set that has held still. Like Akka's bootstrap
//! `stable-margin`: a view is published once the raw member set has not changed
//! for `margin`, so a pod that flaps or a rollout that replaces pods one by one
//! moves shards once, not at every step.

use std::time::{Duration, Instant};

use super::members::View;

/// Turns raw member sets into stable views.
#[derive(Debug)]
pub struct Stabilizer {
    margin: Duration,
    raw: Option<View>,
    changed_at: Option<Instant>,
    published: Option<View>,
}

impl Stabilizer {
    /// Publishes a set once it has held for `margin`.
    pub fn new(margin: Duration) -> Self {
        Self { margin, raw: None, changed_at: None, published: None }
    }

    /// The raw set as discovered at `now`.
    pub fn observe(&mut self, raw: View, now: Instant) {
        if self.raw.as_ref() != Some(&raw) {
            self.raw = Some(raw);
            self.changed_at = Some(now);
        }
    }

    /// The view to act on, if a new one became stable by `now`.
    pub fn poll(&mut self, now: Instant) -> Option<View> {
        let changed_at = self.changed_at?;
        if self.raw == self.published || now.duration_since(changed_at) < self.margin {
            return None;
        }
        self.published = self.raw.clone();
        self.published.clone()
    }

    /// When the pending set becomes stable if nothing changes (`None`: nothing pending).
    pub fn next_check(&self) -> Option<Instant> {
        (self.raw != self.published).then(|| self.changed_at.map(|t| t + self.margin)).flatten()
    }

    /// The raw set changed at this instant and has not been published yet.
    pub fn pending_since(&self) -> Option<Instant> {
        (self.raw != self.published).then_some(self.changed_at).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::members::{Member, Role};

    fn view(ids: &[&str]) -> View {
        View::new(
            ids.iter()
                .map(|id| Member {
                    id: id.to_string(),
                    http: String::new(),
                    roles: [Role::Ingest].into(),
                    version: "1".into(),
                })
                .collect(),
        )
    }

    #[test]
    fn a_set_is_acted_on_only_after_it_held_still() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut st = Stabilizer::new(Duration::from_secs(5));
        st.observe(view(&["a"]), t0);
        assert_eq!(st.poll(t0 + 4 * s), None);
        assert_eq!(st.next_check(), Some(t0 + 5 * s));
        assert_eq!(st.poll(t0 + 5 * s), Some(view(&["a"])));
        assert_eq!(st.poll(t0 + 6 * s), None, "published once");
        // A member that flaps every 2 s never moves anything.
        for i in 0..10u32 {
            let ids: &[&str] = if i % 2 == 0 { &["a", "b"] } else { &["a"] };
            st.observe(view(ids), t0 + (10 + 2 * i) * s);
            assert_eq!(st.poll(t0 + (11 + 2 * i) * s), None);
        }
        // The set it ends on is published after the margin; coming back to the
        // published set cancels the pending change.
        st.observe(view(&["a", "b"]), t0 + 40 * s);
        assert_eq!(st.poll(t0 + 45 * s), Some(view(&["a", "b"])));
        st.observe(view(&["a"]), t0 + 46 * s);
        st.observe(view(&["a", "b"]), t0 + 47 * s);
        assert_eq!(st.next_check(), None);
        assert_eq!(st.poll(t0 + 60 * s), None);
    }
}
