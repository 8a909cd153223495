//! [`Recorder`]: a small in-test HTTP server (hyper) that records every request exactly as it
//! arrived (method, path, query, headers, form fields, arrival time) and answers each with
//! the test's own function, so a test can play one provider's token endpoint and API in that
//! provider's own format and then check the exact requests it was sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub form: BTreeMap<String, String>,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.get(name).map(String::as_str)
    }

    /// The request as text with secrets masked: `Authorization`, and form or query fields
    /// named like a credential, keep their first 6 characters.
    pub fn masked(&self) -> String {
        let mask = |k: &str, v: &str| {
            let secret = [
                "client_secret",
                "refresh_token",
                "assertion",
                "client_assertion",
                "pat",
                "authorization",
                "x-api-key",
                "api_key",
            ]
            .contains(&k);
            if secret && v.len() > 6 {
                format!("{}…[{} chars]", &v[..6], v.len())
            } else {
                v.to_string()
            }
        };
        let mut out = format!("{} {}", self.method, self.path);
        if !self.query.is_empty() {
            let q: Vec<String> = self
                .query
                .iter()
                .map(|(k, v)| format!("{k}={}", mask(k, v)))
                .collect();
            out.push('?');
            out.push_str(&q.join("&"));
        }
        for name in ["authorization", "content-type", "x-api-key"] {
            if let Some(v) = self.headers.get(name) {
                out.push_str(&format!("\n  {name}: {}", mask(name, v)));
            }
        }
        for (k, v) in &self.form {
            out.push_str(&format!("\n  {k}={}", mask(k, v)));
        }
        out
    }
}

/// An answer: status, extra headers, body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(status: u16, body: serde_json::Value) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string(),
        }
    }
}

type Handler = dyn Fn(&Seen, usize) -> Answer + Send + Sync;

/// The server; stops when dropped.
pub struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn pairs(s: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

impl Recorder {
    /// Starts on a free port; `answer` gets each request and how many came before it.
    pub async fn start(
        answer: impl Fn(&Seen, usize) -> Answer + Send + Sync + 'static,
    ) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("recorder cannot bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("recorder address: {e}"));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(answer);
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = Arc::clone(&log);
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = Arc::clone(&log);
                        let handler = Arc::clone(&handler);
                        async move {
                            let at = Instant::now();
                            let (parts, body) = req.into_parts();
                            let bytes = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                query: pairs(parts.uri.query().unwrap_or("")),
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_string(),
                                            v.to_str().unwrap_or("").to_string(),
                                        )
                                    })
                                    .collect(),
                                form: pairs(&String::from_utf8_lossy(&bytes)),
                                at,
                            };
                            let n = {
                                let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                                l.push(seen.clone());
                                l.len() - 1
                            };
                            let a = handler(&seen, n);
                            let mut resp = hyper::Response::builder().status(a.status);
                            for (k, v) in a.headers {
                                resp = resp.header(k, v);
                            }
                            resp.body(Full::new(Bytes::from(a.body)))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Recorder { addr, seen, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests to one path.
    pub fn to(&self, path: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|s| s.path == path)
            .collect()
    }

    /// Prints every request as the fake saw it, secrets masked (for notes and reviews).
    pub fn print(&self, title: &str) {
        println!("== {title}: requests as the fake saw them");
        for s in self.requests() {
            println!("{}", s.masked());
        }
    }
}
