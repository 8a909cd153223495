//! Which providers and features a tenant's sync covers (`sync_strategy`, SPEC 1.1/1.3):
//! - `primary`: only `primary_provider`, all of its `features_enabled`;
//! - `all`: every active provider, all of its `features_enabled`;
//! - `custom`: only providers with `sync_enabled` true, and of each its `sync_features`
//!   (default `features_enabled`).
//!
//! Inactive and `reauth_required` providers are skipped, and the plan says so; so are
//! features the catalog has no endpoint for (they never become key names). A missing
//! strategy is `all`; one that is none of the three is `primary` (the narrowest), noted.

use std::collections::BTreeSet;

use super::model::Feature;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Primary,
    All,
    Custom,
}

impl Strategy {
    /// The strategy, and whether the value had to be replaced.
    pub fn parse(s: Option<&str>) -> (Strategy, bool) {
        match s.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("all") => (Strategy::All, false),
            Some("primary") => (Strategy::Primary, false),
            Some("custom") => (Strategy::Custom, false),
            Some(_) => (Strategy::Primary, true),
        }
    }
}

/// What the plan needs to know of one provider of the tenant.
#[derive(Debug, Clone, Default)]
pub struct ProviderView {
    pub name: String,
    pub provider_type: String,
    pub active: bool,
    pub reauth_required: bool,
    /// The record cannot be served (`invalid_record`).
    pub invalid: bool,
    pub features_enabled: Vec<String>,
    pub sync_enabled: bool,
    /// `None`: absent (custom falls back to `features_enabled`).
    pub sync_features: Option<Vec<String>>,
}

/// Why a provider or a feature is left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Inactive,
    ReauthRequired,
    InvalidRecord,
    NotPrimary,
    SyncDisabled,
    /// The catalog has no endpoint for this feature of this provider type.
    NotInCatalog,
    /// Excluded by `--provider`/`--feature`.
    NotSelected,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Inactive => "skipped_inactive",
            SkipReason::ReauthRequired => "skipped_reauth_required",
            SkipReason::InvalidRecord => "skipped_invalid_record",
            SkipReason::NotPrimary => "skipped_not_primary",
            SkipReason::SyncDisabled => "skipped_sync_disabled",
            SkipReason::NotInCatalog => "skipped_not_in_catalog",
            SkipReason::NotSelected => "skipped_not_selected",
        }
    }
}

/// One provider to sync, with its features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub name: String,
    pub features: Vec<Feature>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub run: Vec<Planned>,
    /// `(provider, feature or None for the whole provider, reason)`.
    pub skipped: Vec<(String, Option<String>, SkipReason)>,
}

/// Optional narrowing by the command line.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub provider: Option<String>,
    pub feature: Option<String>,
}

/// The plan. `in_catalog(provider_type, feature)` says whether the catalog has an endpoint.
pub fn plan(
    strategy: Strategy,
    primary: Option<&str>,
    providers: &[ProviderView],
    selection: &Selection,
    in_catalog: impl Fn(&str, Feature) -> bool,
) -> Plan {
    let mut out = Plan::default();
    for p in providers {
        let skip = |out: &mut Plan, r| out.skipped.push((p.name.clone(), None, r));
        if selection.provider.as_deref().is_some_and(|s| s != p.name) {
            continue;
        }
        let wanted = match strategy {
            Strategy::Primary if primary != Some(p.name.as_str()) => {
                skip(&mut out, SkipReason::NotPrimary);
                continue;
            }
            Strategy::Custom if !p.sync_enabled => {
                skip(&mut out, SkipReason::SyncDisabled);
                continue;
            }
            Strategy::Custom => p.sync_features.as_ref().unwrap_or(&p.features_enabled),
            Strategy::Primary | Strategy::All => &p.features_enabled,
        };
        if !p.active {
            skip(&mut out, SkipReason::Inactive);
            continue;
        }
        if p.invalid {
            skip(&mut out, SkipReason::InvalidRecord);
            continue;
        }
        if p.reauth_required {
            skip(&mut out, SkipReason::ReauthRequired);
            continue;
        }
        let mut features = BTreeSet::new();
        for name in wanted {
            if selection.feature.as_deref().is_some_and(|f| f != name) {
                continue;
            }
            match Feature::parse(name).filter(|f| in_catalog(&p.provider_type, *f)) {
                Some(f) => {
                    features.insert(f);
                }
                None => out.skipped.push((
                    p.name.clone(),
                    Some(crate::text::escape_control(name).into_owned()),
                    SkipReason::NotInCatalog,
                )),
            }
        }
        if !features.is_empty() {
            out.run.push(Planned {
                name: p.name.clone(),
                features: features.into_iter().collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, features: &[&str]) -> ProviderView {
        ProviderView {
            name: name.into(),
            provider_type: name.into(),
            active: true,
            features_enabled: features.iter().map(|s| s.to_string()).collect(),
            ..ProviderView::default()
        }
    }

    fn names(p: &Plan) -> Vec<(String, Vec<&'static str>)> {
        p.run
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.features.iter().map(|f| f.as_str()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn each_strategy_picks_its_providers_and_features() {
        let mut zoom = view("zoom", &["users", "call_queues"]);
        zoom.sync_enabled = true;
        zoom.sync_features = Some(vec!["users".into()]);
        let mut off = view("ringcentral", &["users"]);
        off.active = false;
        let mut reauth = view("goto", &["users"]);
        reauth.reauth_required = true;
        let teams = view("teams", &["users", "voicemail"]);
        let all = [teams, zoom, off, reauth];
        let yes = |_: &str, _: Feature| true;
        let p = plan(
            Strategy::Primary,
            Some("teams"),
            &all,
            &Selection::default(),
            yes,
        );
        assert_eq!(names(&p), [("teams".to_string(), vec!["users"])]);
        assert!(p.skipped.iter().any(|(n, f, r)| n == "teams"
            && f.as_deref() == Some("voicemail")
            && *r == SkipReason::NotInCatalog));
        let p = plan(
            Strategy::All,
            Some("teams"),
            &all,
            &Selection::default(),
            yes,
        );
        assert_eq!(
            names(&p),
            [
                ("teams".to_string(), vec!["users"]),
                ("zoom".to_string(), vec!["users", "call_queues"])
            ]
        );
        assert!(p
            .skipped
            .contains(&("ringcentral".into(), None, SkipReason::Inactive)));
        assert!(p
            .skipped
            .contains(&("goto".into(), None, SkipReason::ReauthRequired)));
        let p = plan(
            Strategy::Custom,
            Some("teams"),
            &all,
            &Selection::default(),
            yes,
        );
        assert_eq!(names(&p), [("zoom".to_string(), vec!["users"])]);
        assert!(p
            .skipped
            .contains(&("teams".into(), None, SkipReason::SyncDisabled)));
        let sel = Selection {
            provider: Some("zoom".into()),
            feature: Some("call_queues".into()),
        };
        let p = plan(Strategy::All, None, &all, &sel, yes);
        assert_eq!(names(&p), [("zoom".to_string(), vec!["call_queues"])]);
        assert_eq!(Strategy::parse(Some("weird")), (Strategy::Primary, true));
        assert_eq!(Strategy::parse(None), (Strategy::All, false));
    }
}
