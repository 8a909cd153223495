//! The fake provider's directory APIs, for the sync tests and the demo: each of the four
//! providers' list endpoints under `/api/{provider}/...`, paging `page_size` records (3
//! unless seeded otherwise) in that provider's own style:
//! - `goto`: `pageMarker` in, `{"items": [...], "nextPageMarker": "..."}` out;
//! - `teams`: `{"value": [...], "@odata.nextLink": "<absolute URL with $skiptoken>"}`;
//! - `ringcentral`: `page` in, `{"records": [...], "paging": {..}, "navigation":
//!   {"nextPage": {"uri": "<absolute URL>"}}}` out;
//! - `zoom`: `next_page_token` in, `{"<items>": [...], "next_page_token": ""}` out.
//!
//! Every answer carries fields a client must ignore (`totalCount`, `@odata.context`, ...).
//! Calls need a live access token of the fake's token endpoint (else 401).
//!
//! Control: `POST /dir/seed {"provider", "path", "items": [...], "page_size"?}` replaces a
//! list; `POST /dir/faults {"provider", "path", "rate_limit_at_page"?, "retry_after"?,
//! "malformed_at_page"?, "delay_ms"?}` arms faults (each page fault fires once);
//! `GET /dir/stats` counts page requests per list and the 401s and 429s sent.

use std::collections::HashMap;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{json, Value};

type Resp = Response<Full<Bytes>>;

#[derive(Default)]
struct List {
    items: Vec<Value>,
    page_size: usize,
    rate_limit_at_page: Option<usize>,
    retry_after: Option<String>,
    malformed_at_page: Option<usize>,
    delay_ms: u64,
    requests: u64,
}

/// All seeded lists, by `(provider, path)`.
#[derive(Default)]
pub struct Directory {
    lists: HashMap<(String, String), List>,
    unauthorized: u64,
    rate_limited: u64,
}

fn json_resp(status: StatusCode, body: &Value) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The items array's name in a provider's answers.
fn items_key(provider: &str, path: &str) -> String {
    match provider {
        "goto" => "items".into(),
        "teams" => "value".into(),
        "ringcentral" => "records".into(),
        _ => match path.rsplit('/').next().unwrap_or("") {
            "numbers" => "phone_numbers".into(),
            other => other.to_string(),
        },
    }
}

impl Directory {
    /// `POST /dir/seed`.
    pub fn seed(&mut self, body: &Value) -> Result<Value, String> {
        let provider = body["provider"].as_str().ok_or("provider missing")?;
        let path = body["path"].as_str().ok_or("path missing")?;
        let items = body["items"].as_array().ok_or("items missing")?.clone();
        let page_size = body["page_size"].as_u64().unwrap_or(3).max(1) as usize;
        let list = self
            .lists
            .entry((provider.to_string(), path.to_string()))
            .or_default();
        list.items = items;
        list.page_size = page_size;
        Ok(json!({"ok": true, "items": list.items.len()}))
    }

    /// `POST /dir/faults`.
    pub fn faults(&mut self, body: &Value) -> Result<Value, String> {
        let provider = body["provider"].as_str().ok_or("provider missing")?;
        let path = body["path"].as_str().ok_or("path missing")?;
        let list = self
            .lists
            .get_mut(&(provider.to_string(), path.to_string()))
            .ok_or("no such list")?;
        list.rate_limit_at_page = body["rate_limit_at_page"].as_u64().map(|n| n as usize);
        list.retry_after = body["retry_after"].as_str().map(str::to_string);
        list.malformed_at_page = body["malformed_at_page"].as_u64().map(|n| n as usize);
        list.delay_ms = body["delay_ms"].as_u64().unwrap_or(0);
        Ok(json!({"ok": true}))
    }

    /// `GET /dir/stats`.
    pub fn stats(&self) -> Value {
        let mut lists = serde_json::Map::new();
        for ((p, path), l) in &self.lists {
            lists.insert(format!("{p}{path}"), json!(l.requests));
        }
        json!({"requests": lists, "unauthorized": self.unauthorized, "rate_limited": self.rate_limited})
    }

    pub fn count_unauthorized(&mut self) {
        self.unauthorized += 1;
    }

    /// How long to wait before answering `GET /api/{provider}{path}` (its delay fault).
    pub fn delay_ms(&self, provider: &str, path: &str) -> u64 {
        self.lists
            .get(&(provider.to_string(), path.to_string()))
            .map_or(0, |l| l.delay_ms)
    }

    /// `GET /api/{provider}{path}?query` with an accepted token; `None`: no such list.
    pub fn page(
        &mut self,
        provider: &str,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<Resp> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
            .to_string();
        let key = (provider.to_string(), path.to_string());
        let list = self.lists.get_mut(&key)?;
        list.requests += 1;
        let size = list.page_size;
        let offset: usize = match provider {
            "goto" => query_param(query, "pageMarker"),
            "teams" => query_param(query, "$skiptoken"),
            "zoom" => query_param(query, "next_page_token"),
            _ => query_param(query, "page")
                .and_then(|p| p.parse::<usize>().ok())
                .map(|p| (p.max(1) - 1) * size)
                .map(|o| o.to_string()),
        }
        .and_then(|m| m.trim_start_matches(['m', 't', 's']).parse().ok())
        .unwrap_or(0);
        let page_no = offset / size + 1;
        if list.rate_limit_at_page == Some(page_no) {
            list.rate_limit_at_page = None;
            self.rate_limited += 1;
            let mut resp = json_resp(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({"error": "rate limited"}),
            );
            if let Some(ra) = list
                .retry_after
                .as_deref()
                .and_then(|r| HeaderValue::from_str(r).ok())
            {
                resp.headers_mut().insert(header::RETRY_AFTER, ra);
            }
            return Some(resp);
        }
        if list.malformed_at_page == Some(page_no) {
            list.malformed_at_page = None;
            let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"items\": [ {\"id\": ")));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Some(resp);
        }
        let end = (offset + size).min(list.items.len());
        let items: Vec<Value> = list.items.get(offset..end).unwrap_or(&[]).to_vec();
        let more = end < list.items.len();
        let ik = items_key(provider, path);
        let base = format!("http://{host}/api/{provider}{path}");
        let mut body = serde_json::Map::new();
        body.insert(ik, Value::Array(items));
        match provider {
            "goto" => {
                body.insert("totalCount".into(), json!(list.items.len()));
                if more {
                    body.insert("nextPageMarker".into(), json!(format!("m{end}")));
                }
            }
            "teams" => {
                body.insert(
                    "@odata.context".into(),
                    json!("https://graph.microsoft.com/v1.0/$metadata#users"),
                );
                if more {
                    body.insert(
                        "@odata.nextLink".into(),
                        json!(format!("{base}?$top={size}&$skiptoken=s{end}")),
                    );
                }
            }
            "ringcentral" => {
                let page = page_no;
                body.insert(
                    "paging".into(),
                    json!({"page": page, "perPage": size, "totalElements": list.items.len()}),
                );
                let mut nav = serde_json::Map::new();
                if more {
                    let mut q: Vec<(String, String)> =
                        form_urlencoded::parse(query.unwrap_or("").as_bytes())
                            .filter(|(k, _)| k != "page")
                            .map(|(k, v)| (k.into_owned(), v.into_owned()))
                            .collect();
                    q.push(("page".into(), (page + 1).to_string()));
                    let qs: String = form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(q)
                        .finish();
                    nav.insert("nextPage".into(), json!({"uri": format!("{base}?{qs}")}));
                }
                body.insert("navigation".into(), Value::Object(nav));
            }
            _ => {
                body.insert("page_size".into(), json!(size));
                body.insert(
                    "next_page_token".into(),
                    json!(if more {
                        format!("t{end}")
                    } else {
                        String::new()
                    }),
                );
            }
        }
        Some(json_resp(StatusCode::OK, &Value::Object(body)))
    }
}
