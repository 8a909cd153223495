//! The sync half of the provider catalog: per provider type and feature, the endpoint, its
//! query, the array that holds the items, the pagination style and a filter. Read from the
//! `[providers.<type>.sync]` tables of `config/providers.toml` (the catalog passes them
//! through untouched); this module is their only parser.
//!
//! ```toml
//! [providers.goto.sync]
//! min_interval_ms = 100          # API budget: at most one request per 100 ms per provider
//! [providers.goto.sync.users]
//! path = "/extensions"           # joined to the record's api_base_url
//! query = { accountKey = "{account_key}" }
//! items = "items"                # the answer's array of objects
//! pagination = "goto"            # goto | graph | ringcentral | zoom | none
//! filter = { type = "DIRECT_EXTENSION" }   # keep items whose fields equal these
//! ```
//! Only the feature names of [`Feature`] are accepted as table names, so only they become
//! key names.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::model::Feature;
use crate::catalog::Catalog;

/// How an endpoint pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pagination {
    /// GoTo: `pageSize` + `pageMarker`; the answer's `nextPageMarker` (absent or empty: done).
    Goto,
    /// Microsoft Graph: `$top`; follow `@odata.nextLink` verbatim until absent.
    Graph,
    /// RingCentral: `page` + `perPage`; follow `navigation.nextPage.uri` until absent.
    Ringcentral,
    /// Zoom: `page_size` + `next_page_token` (empty: done).
    Zoom,
    /// One answer, no paging.
    None,
}

/// One feature's endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub path: String,
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    pub items: String,
    pub pagination: Pagination,
    #[serde(default)]
    pub filter: BTreeMap<String, String>,
    /// Largest page this endpoint accepts (the smaller of it and `sync.page_size` is asked).
    #[serde(default)]
    pub max_page_size: Option<u32>,
}

/// One provider type's sync table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderSync {
    /// Smallest gap between two requests to one provider (its API budget).
    pub min_interval_ms: u64,
    pub features: BTreeMap<Feature, Endpoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error("[providers.{provider}.sync]: {message}")]
    Invalid { provider: String, message: String },
}

/// Every provider type's sync table, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Endpoints(BTreeMap<String, ProviderSync>);

impl Endpoints {
    pub fn from_catalog(catalog: &Catalog) -> Result<Endpoints, EndpointsError> {
        let mut out = BTreeMap::new();
        for name in catalog.provider_types() {
            let Some(table) = catalog.get(name).and_then(|e| e.sync.as_ref()) else {
                continue;
            };
            let invalid = |message: String| EndpointsError::Invalid {
                provider: name.to_string(),
                message,
            };
            let mut ps = ProviderSync::default();
            for (key, value) in table {
                if key == "min_interval_ms" {
                    ps.min_interval_ms = value
                        .as_integer()
                        .and_then(|v| u64::try_from(v).ok())
                        .filter(|v| *v <= 60_000)
                        .ok_or_else(|| invalid("min_interval_ms: an integer 0-60000".into()))?;
                    continue;
                }
                let feature = Feature::parse(key).ok_or_else(|| {
                    invalid(format!("{key:?} is not a feature (users, extensions, call_queues, auto_attendants, phone_numbers)"))
                })?;
                let ep: Endpoint = value
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| invalid(format!("{key}: {}", e.message())))?;
                if !ep.path.starts_with('/') {
                    return Err(invalid(format!("{key}: path must start with '/'")));
                }
                ps.features.insert(feature, ep);
            }
            out.insert(name.to_string(), ps);
        }
        Ok(Endpoints(out))
    }

    pub fn provider(&self, provider_type: &str) -> Option<&ProviderSync> {
        self.0.get(provider_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalog_has_sync_tables_for_the_four_providers() {
        let catalog = Catalog::builtin().expect("catalog");
        let eps = Endpoints::from_catalog(&catalog).expect("endpoints");
        for p in ["goto", "teams", "ringcentral", "zoom"] {
            let ps = eps.provider(p).unwrap_or_else(|| panic!("{p}"));
            assert!(ps.features.contains_key(&Feature::Users), "{p}");
        }
        let goto = &eps.provider("goto").expect("goto").features[&Feature::Users];
        assert_eq!(
            goto.filter.get("type").map(String::as_str),
            Some("DIRECT_EXTENSION")
        );
        assert_eq!(goto.pagination, Pagination::Goto);
    }

    #[test]
    fn unknown_feature_names_are_refused() {
        let text = format!(
            "{}\n[providers.zoom.sync.\"../x\"]\npath = \"/x\"\nitems = \"x\"\npagination = \"zoom\"\n",
            "[providers.zoom]\ntoken_url = \"https://zoom.us/oauth/token\"\n"
        );
        let catalog = Catalog::parse(&text, "test").expect("catalog");
        assert!(Endpoints::from_catalog(&catalog).is_err());
    }
}
