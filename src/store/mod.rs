//! The Redis connection pool, its topologies, and the error every Redis call returns.
//!
//! [`pool`] builds one of three topologies from `[redis]` (SPEC 6):
//! - one node (`redis.url`): a `deadpool` pool of multiplexed connections;
//! - Sentinel (`redis.sentinel_urls` + `redis.sentinel_master`): the same pool, whose
//!   connections go to the master the Sentinels name. A connection is re-resolved whenever
//!   the pool makes a new one: after a connection error (Sentinel kills the clients of a
//!   demoted master) or when a pooled connection's `ROLE` is no longer `master`. A master
//!   address other than the last one counts as a failover ([`master_changes`]);
//! - Cluster (`redis.cluster_urls`): one shared `redis::cluster_async` connection that routes
//!   every command by its key and follows `MOVED`/`ASK`.
//!
//! [`Connection`] implements [`redis::aio::ConnectionLike`] in every topology, so commands,
//! scripts and pipelines work unchanged at the call sites. On a Cluster a pipeline is split:
//! the commands on one key run in their order, commands on different keys concurrently (a
//! pipeline there is a batch, not a sequence; see [`is_cluster`] and [`query_ordered`] for
//! the places where the order across keys matters). [`masters`] gives a direct connection
//! to every master (SCAN and change events are per node on a Cluster).
//!
//! TLS (`rediss://`, `redis.ca_file`, optional client certificate) and ACL user and password
//! (`redis.username`/`redis.password` or the URL's userinfo) apply in every topology; the
//! Sentinels have their own (`redis.sentinel_username`/`sentinel_password` or their URLs'
//! userinfo). Every connect and every response is bounded by `redis.command_timeout_ms`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::config::RedisConfig;

pub mod bulk;
pub mod resp;

/// The one error answer that is about the key itself (a key of another type): the reads
/// take such a key as an invalid record. Every other error answer (`LOADING`, `BUSY`,
/// `NOPERM`, ...) fails the read it came in.
pub const KEY_ERROR: &str = "WRONGTYPE";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis unavailable: {0}")]
    Pool(String),
}

impl From<managed::PoolError<RedisError>> for StoreError {
    fn from(e: managed::PoolError<RedisError>) -> Self {
        match e {
            managed::PoolError::Backend(e) => StoreError::Redis(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

/// Which topology the settings name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Single,
    Cluster,
    Sentinel,
}

impl Topology {
    pub fn of(cfg: &RedisConfig) -> Topology {
        if !cfg.cluster_urls.trim().is_empty() {
            Topology::Cluster
        } else if !cfg.sentinel_urls.trim().is_empty() {
            Topology::Sentinel
        } else {
            Topology::Single
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Cluster => "cluster",
            Topology::Sentinel => "sentinel",
        }
    }
}

/// The Redis of `cfg` for logs and `check-config`, passwords redacted: the URL, the Cluster
/// seeds, or the Sentinels and the master name.
pub fn describe(cfg: &RedisConfig) -> String {
    match Topology::of(cfg) {
        Topology::Single => redact_url(&cfg.url),
        Topology::Cluster => format!("cluster {}", redact_url(&cfg.cluster_urls)),
        Topology::Sentinel => format!(
            "sentinel {} master {}",
            redact_url(&cfg.sentinel_urls),
            cfg.sentinel_master
        ),
    }
}

/// The comma-separated list `s`, trimmed, empty parts left out.
pub fn url_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// How to reach one data node: user, password, database, TLS and its certificates.
#[derive(Clone)]
pub struct NodeSettings {
    tls: bool,
    certs: Option<TlsCertificates>,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    timeout: Duration,
}

impl NodeSettings {
    /// A client for `host:port` with these settings; `resp3` for a connection that carries
    /// client-tracking pushes.
    pub fn client(&self, host: &str, port: u16, resp3: bool) -> RedisResult<Client> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let info = format!("{scheme}://{host}:{port}/{}", self.db).into_connection_info()?;
        let mut redis = info.redis_settings().clone();
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p);
        }
        if resp3 {
            redis = redis.set_protocol(redis::ProtocolVersion::RESP3);
        }
        let info = info.set_redis_settings(redis);
        match &self.certs {
            Some(certs) if self.tls => Client::build_with_tls(info, certs.clone()),
            _ => Client::open(info),
        }
    }

    /// Connect and response timeouts of every connection.
    pub fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Reads the CA file and the client certificate named in `cfg`, if any.
fn certificates(cfg: &RedisConfig) -> Result<Option<TlsCertificates>, StoreError> {
    let read = |what: &str, path: &str| {
        std::fs::read(path).map_err(|e| StoreError::Pool(format!("cannot read {what} {path}: {e}")))
    };
    let root_cert = match cfg.ca_file.as_str() {
        "" => None,
        p => Some(read("redis.ca_file", p)?),
    };
    let client_tls = match (cfg.client_cert_file.as_str(), cfg.client_key_file.as_str()) {
        ("", "") => None,
        (cert, key) if !cert.is_empty() && !key.is_empty() => Some(ClientTlsConfig {
            client_cert: read("redis.client_cert_file", cert)?,
            client_key: read("redis.client_key_file", key)?,
        }),
        _ => {
            return Err(StoreError::Pool(
                "redis.client_cert_file and redis.client_key_file go together".into(),
            ))
        }
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The node settings of `cfg`: user and password from `redis.username`/`redis.password`,
/// else from the userinfo of `url` (the URL, or the first Cluster seed).
pub fn node_settings(cfg: &RedisConfig, url: &str) -> Result<NodeSettings, StoreError> {
    let info = url.into_connection_info()?;
    let from_url = info.redis_settings();
    let pick = |setting: &str, url: Option<&str>| {
        if setting.is_empty() {
            url.filter(|s| !s.is_empty()).map(str::to_string)
        } else {
            Some(setting.to_string())
        }
    };
    Ok(NodeSettings {
        tls: url.starts_with("rediss://"),
        certs: certificates(cfg)?,
        username: pick(&cfg.username, from_url.username()),
        password: pick(&cfg.password, from_url.password()),
        db: from_url.db(),
        timeout: Duration::from_millis(cfg.command_timeout_ms),
    })
}

/// Makes the pool's connections: to one node, or to the master the Sentinels name.
pub struct NodeManager {
    source: Source,
    config: AsyncConnectionConfig,
    ping_number: AtomicU64,
}

enum Source {
    Node(Box<Client>),
    Sentinel(Box<SentinelSource>),
}

struct SentinelSource {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// The master address last connected to, and how many times it changed.
    last: Mutex<Option<String>>,
    /// Host and port of that master.
    node: Mutex<Option<(String, u16)>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl SentinelSource {
    /// Asks the Sentinels for the master; records it (and counts a change) when it is not
    /// the last one. Returns the master's client and address.
    async fn resolve(&self) -> Result<(Client, String), RedisError> {
        let client = self.client.lock().await.async_get_client().await?;
        let node = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(h, p) => Some((h.clone(), *p)),
            redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
            _ => None,
        };
        let addr = client.get_connection_info().addr().to_string();
        let changed = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let changed = last.as_ref().is_some_and(|l| *l != addr);
            *last = Some(addr.clone());
            changed
        };
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = node;
        if changed {
            tracing::warn!(master = %addr, "sentinel names a new master: following it");
            self.changes.send_modify(|n| *n = n.saturating_add(1));
        }
        Ok((client, addr))
    }

    fn is_last(&self, addr: &str) -> bool {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(addr)
    }
}

/// A pooled connection and, under Sentinel, the master it was made for.
pub struct NodeConn {
    conn: MultiplexedConnection,
    master: Option<String>,
}

impl managed::Manager for NodeManager {
    type Type = NodeConn;
    type Error = RedisError;

    async fn create(&self) -> Result<NodeConn, RedisError> {
        match &self.source {
            Source::Node(client) => Ok(NodeConn {
                conn: client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await?,
                master: None,
            }),
            Source::Sentinel(s) => {
                let (client, addr) = s.resolve().await?;
                let conn = client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await?;
                Ok(NodeConn {
                    conn,
                    master: Some(addr),
                })
            }
        }
    }

    async fn recycle(
        &self,
        obj: &mut NodeConn,
        _: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        let conn = &mut obj.conn;
        if let Source::Sentinel(s) = &self.source {
            // Made for a former master: that one may still accept writes until the
            // Sentinels demote it (writes it would then drop). Drop the connection.
            if !obj.master.as_deref().is_some_and(|m| s.is_last(m)) {
                return Err(managed::RecycleError::message("made for a former master"));
            }
            // A demoted master that kept our connection answers as a replica: drop it.
            let role: Vec<Value> = redis::cmd("ROLE").query_async(conn).await?;
            return match role.first() {
                Some(Value::BulkString(b)) if b == b"master" => Ok(()),
                Some(Value::SimpleString(s)) if s == "master" => Ok(()),
                _ => Err(managed::RecycleError::message("no longer the master")),
            };
        }
        let n = self.ping_number.fetch_add(1, Ordering::Relaxed).to_string();
        let got: String = redis::cmd("PING").arg(&n).query_async(conn).await?;
        if got == n {
            Ok(())
        } else {
            Err(managed::RecycleError::message("invalid PING answer"))
        }
    }
}

/// The shared connection of a Cluster and how to reach its nodes directly.
pub struct ClusterShared {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
    nodes: NodeSettings,
}

/// The Redis pool: one per daemon, cheap to clone.
#[derive(Clone)]
pub enum Pool {
    /// One node, or the Sentinels' master.
    Node {
        pool: managed::Pool<NodeManager>,
        nodes: Arc<NodeSettings>,
        /// Failovers seen (Sentinel only).
        changes: Option<tokio::sync::watch::Receiver<u64>>,
    },
    Cluster(Arc<ClusterShared>),
}

/// A Redis connection: multiplexed, so clones share one socket (per node) and may be used
/// at once.
#[derive(Clone)]
pub enum Connection {
    /// One node, or the Sentinels' master.
    Node(MultiplexedConnection),
    /// A Cluster: routed per key.
    Cluster {
        conn: ClusterConnection,
        shared: Arc<ClusterShared>,
    },
}

/// Builds the pool; no connection is made until the first use.
pub fn pool(cfg: &RedisConfig) -> Result<Pool, StoreError> {
    let timeout = Duration::from_millis(cfg.command_timeout_ms);
    match Topology::of(cfg) {
        Topology::Cluster => {
            let seeds = url_list(&cfg.cluster_urls);
            let first = seeds
                .first()
                .ok_or_else(|| StoreError::Pool("redis.cluster_urls is empty".into()))?;
            let nodes = node_settings(cfg, first)?;
            let mut builder = redis::cluster::ClusterClient::builder(seeds.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .overall_response_timeout(Some(timeout.saturating_mul(2)))
                .retries(3);
            if let Some(u) = &nodes.username {
                builder = builder.username(u);
            }
            if let Some(p) = &nodes.password {
                builder = builder.password(p);
            }
            if nodes.tls {
                builder = builder.tls(redis::TlsMode::Secure);
                if let Some(c) = &nodes.certs {
                    builder = builder.certs(c.clone());
                }
            }
            Ok(Pool::Cluster(Arc::new(ClusterShared {
                client: builder.build()?,
                conn: tokio::sync::Mutex::new(None),
                nodes,
            })))
        }
        Topology::Sentinel => {
            let nodes = node_settings(cfg, &cfg.url)?;
            let (tx, rx) = tokio::sync::watch::channel(0u64);
            let client = sentinel_client(cfg, &nodes)?;
            let source = Source::Sentinel(Box::new(SentinelSource {
                client: tokio::sync::Mutex::new(client),
                last: Mutex::new(None),
                node: Mutex::new(None),
                changes: tx,
            }));
            node_pool(cfg, source, nodes, Some(rx))
        }
        Topology::Single => {
            let nodes = node_settings(cfg, &cfg.url)?;
            let client = match &nodes.certs {
                Some(c) if nodes.tls => Client::build_with_tls(cfg.url.as_str(), c.clone())?,
                _ => Client::open(cfg.url.as_str())?,
            };
            node_pool(cfg, Source::Node(Box::new(client)), nodes, None)
        }
    }
}

fn node_pool(
    cfg: &RedisConfig,
    source: Source,
    nodes: NodeSettings,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
) -> Result<Pool, StoreError> {
    let timeout = nodes.timeout;
    let manager = NodeManager {
        source,
        config: nodes.connection_config(),
        ping_number: AtomicU64::new(0),
    };
    let pool = managed::Pool::builder(manager)
        .max_size(cfg.pool_size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))?;
    Ok(Pool::Node {
        pool,
        nodes: Arc::new(nodes),
        changes,
    })
}

fn sentinel_client(
    cfg: &RedisConfig,
    nodes: &NodeSettings,
) -> Result<redis::sentinel::SentinelClient, StoreError> {
    let urls = url_list(&cfg.sentinel_urls);
    let mut addrs = Vec::new();
    let mut user_from_url = None;
    let mut pass_from_url = None;
    let mut sentinel_tls = false;
    for u in &urls {
        let info = u.as_str().into_connection_info()?;
        sentinel_tls |= u.starts_with("rediss://");
        if user_from_url.is_none() {
            user_from_url = info.redis_settings().username().map(str::to_string);
        }
        if pass_from_url.is_none() {
            pass_from_url = info.redis_settings().password().map(str::to_string);
        }
        addrs.push(info.addr().clone());
    }
    let mut b = redis::sentinel::SentinelClientBuilder::new(
        addrs,
        &cfg.sentinel_master,
        redis::sentinel::SentinelServerType::Master,
    )?
    .set_client_to_redis_db(nodes.db);
    if let Some(u) = &nodes.username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = &nodes.password {
        b = b.set_client_to_redis_password(p);
    }
    if nodes.tls {
        b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
        if let Some(c) = &nodes.certs {
            b = b.set_client_to_redis_certificates(c.clone());
        }
    }
    let s_user = Some(cfg.sentinel_username.clone())
        .filter(|s| !s.is_empty())
        .or(user_from_url);
    let s_pass = Some(cfg.sentinel_password.clone())
        .filter(|s| !s.is_empty())
        .or(pass_from_url);
    if let Some(u) = s_user {
        b = b.set_client_to_sentinel_username(u);
    }
    if let Some(p) = s_pass {
        b = b.set_client_to_sentinel_password(p);
    }
    if sentinel_tls {
        b = b.set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        if let Some(c) = &nodes.certs {
            b = b.set_client_to_sentinel_certificates(c.clone());
        }
    }
    Ok(b.build()?)
}

/// A connection from the pool. The pool object goes back at once: the connection is
/// multiplexed, so a clone serves this caller while others use the same socket. (Holding the
/// pool object for a whole refresh capped concurrent refreshes at `redis.pool_size`: with
/// a 100 ms token endpoint the benchmark saw 16 calls in flight and 153 refreshes/s although
/// `refresh.max_concurrent` was 64.)
pub async fn conn(pool: &Pool) -> Result<Connection, StoreError> {
    match pool {
        Pool::Node { pool, .. } => {
            let pooled = pool.get().await?;
            Ok(Connection::Node(MultiplexedConnection::clone(&pooled.conn)))
        }
        Pool::Cluster(shared) => {
            let mut slot = shared.conn.lock().await;
            if let Some(c) = slot.as_ref() {
                return Ok(Connection::Cluster {
                    conn: c.clone(),
                    shared: Arc::clone(shared),
                });
            }
            let made = tokio::time::timeout(
                shared.nodes.timeout.saturating_mul(2),
                shared.client.get_async_connection(),
            )
            .await
            .map_err(|_| StoreError::Pool("cluster connect timed out".into()))??;
            *slot = Some(made.clone());
            Ok(Connection::Cluster {
                conn: made,
                shared: Arc::clone(shared),
            })
        }
    }
}

/// Up to `n` connections on distinct sockets where the pool has them (one node: `n` pool
/// objects held at once, then given back); on a Cluster the one shared connection. For a
/// bulk read whose answers are decoded by each socket's own task: spread over sockets, the
/// decoding runs on several cores.
pub async fn distinct_conns(pool: &Pool, n: usize) -> Result<Vec<Connection>, StoreError> {
    match pool {
        Pool::Node { pool, .. } => {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n.max(1) {
                held.push(pool.get().await?);
            }
            Ok(held
                .iter()
                .map(|p| Connection::Node(MultiplexedConnection::clone(&p.conn)))
                .collect())
        }
        Pool::Cluster(_) => Ok(vec![conn(pool).await?]),
    }
}

/// Whether `conn` is a Cluster connection (pipelines there are batches, not sequences).
pub fn is_cluster(conn: &Connection) -> bool {
    matches!(conn, Connection::Cluster { .. })
}

/// Failovers seen by a Sentinel pool: the value goes up by one each time the Sentinels name a
/// master other than the last one. `None` for the other topologies.
pub fn master_changes(pool: &Pool) -> Option<tokio::sync::watch::Receiver<u64>> {
    match pool {
        Pool::Node { changes, .. } => changes.clone(),
        Pool::Cluster(_) => None,
    }
}

/// How often [`follow_sentinels`] asks the Sentinels for the master.
pub const SENTINEL_POLL: Duration = Duration::from_secs(1);

/// Asks the Sentinels for the master every [`SENTINEL_POLL`] until cancelled (Sentinel pools
/// only; returns at once for the others). A failover is then followed within about a
/// second of the promotion rather than when the former master is demoted, which may take
/// the Sentinels several seconds, during which it still accepts (and will drop) writes.
pub async fn follow_sentinels(pool: Pool, cancel: tokio_util::sync::CancellationToken) {
    let Pool::Node { pool: p, .. } = &pool else {
        return;
    };
    let Source::Sentinel(s) = &p.manager().source else {
        return;
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(SENTINEL_POLL) => {}
        }
        if let Err(e) = s.resolve().await {
            tracing::debug!(error = %e, "the Sentinels could not be asked for the master");
        }
    }
}

/// How many master changes a Sentinel pool has seen (0 for the other topologies, and before
/// the first change). Goes up before the first connection to the new master is handed out.
pub fn master_generation(pool: &Pool) -> u64 {
    match pool {
        Pool::Node {
            changes: Some(rx), ..
        } => *rx.borrow(),
        _ => 0,
    }
}

/// A client for each master, for the change-event connections (pub/sub, client tracking),
/// labelled by address: the one node (from `redis.url`), the Sentinels' master as last
/// resolved, or every Cluster master. `resp3` for client tracking.
pub async fn event_clients(pool: &Pool, resp3: bool) -> Result<Vec<(String, Client)>, StoreError> {
    match pool {
        Pool::Node { pool: p, nodes, .. } => match &p.manager().source {
            Source::Node(client) => {
                let mut info = client.get_connection_info().clone();
                let label = info.addr().to_string();
                if resp3 {
                    let r = info
                        .redis_settings()
                        .clone()
                        .set_protocol(redis::ProtocolVersion::RESP3);
                    info = info.set_redis_settings(r);
                }
                let c = match &nodes.certs {
                    Some(certs) if nodes.tls => Client::build_with_tls(info, certs.clone())?,
                    _ => Client::open(info)?,
                };
                Ok(vec![(label, c)])
            }
            Source::Sentinel(s) => {
                // Resolves the master if no connection was made yet.
                let _ = conn(pool).await?;
                let node = s.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match node {
                    Some((host, port)) => Ok(vec![(
                        format!("{host}:{port}"),
                        nodes.client(&host, port, resp3)?,
                    )]),
                    None => Err(StoreError::Pool("the Sentinels named no master".into())),
                }
            }
        },
        Pool::Cluster(shared) => {
            let c = conn(pool).await?;
            let mut out = Vec::new();
            for (host, port) in cluster_masters(&c).await? {
                out.push((
                    format!("{host}:{port}"),
                    shared.nodes.client(&host, port, resp3)?,
                ));
            }
            Ok(out)
        }
    }
}

/// How to reach the data nodes directly (for the change-event connections).
pub fn nodes(pool: &Pool) -> NodeSettings {
    match pool {
        Pool::Node { nodes, .. } => NodeSettings::clone(nodes),
        Pool::Cluster(shared) => shared.nodes.clone(),
    }
}

/// `pipe`'s answers with its commands run in their order on every topology: on a Cluster one
/// command after the other, each awaited; elsewhere the one pipeline. Errors of single
/// commands are kept as values only if `pipe` ignores errors (as a pipeline does).
pub async fn query_ordered(conn: &mut Connection, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
    match conn {
        Connection::Node(_) => pipe.query_async(conn).await,
        Connection::Cluster { conn, .. } => {
            let mut out = Vec::new();
            for cmd in pipe.cmd_iter() {
                out.push(answer_of(conn.req_packed_command(cmd).await)?);
            }
            Ok(out)
        }
    }
}

/// A command's result as a pipeline would hold it: a server error as a value.
fn answer_of(r: RedisResult<Value>) -> RedisResult<Value> {
    match r {
        Ok(v) => Ok(v),
        Err(e) if e.code().is_some() => match e.into_server_errors() {
            Some(errs) => Ok(errs
                .first()
                .map(|(_, e)| Value::ServerError(e.clone()))
                .unwrap_or(Value::Nil)),
            None => Ok(Value::Nil),
        },
        Err(e) => Err(e),
    }
}

/// A direct connection to every master: the one node (or the Sentinels' master) itself, or
/// each master of the Cluster as its slot table names them now.
pub async fn masters(conn: &Connection) -> Result<Vec<(String, Connection)>, StoreError> {
    match conn {
        Connection::Node(_) => Ok(vec![(String::new(), conn.clone())]),
        Connection::Cluster { shared, .. } => {
            let mut out = Vec::new();
            for (host, port) in cluster_masters(conn).await? {
                let client = shared.nodes.client(&host, port, false)?;
                let node = client
                    .get_multiplexed_async_connection_with_config(&shared.nodes.connection_config())
                    .await?;
                out.push((format!("{host}:{port}"), Connection::Node(node)));
            }
            Ok(out)
        }
    }
}

/// The masters of a Cluster (`CLUSTER SLOTS`), each once; empty for the other topologies.
pub async fn cluster_masters(conn: &Connection) -> Result<Vec<(String, u16)>, StoreError> {
    let Connection::Cluster { conn, .. } = conn else {
        return Ok(Vec::new());
    };
    let slots: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn.clone())
        .await?;
    let mut masters = BTreeMap::new();
    for range in slots {
        let Value::Array(parts) = range else { continue };
        let Some(Value::Array(master)) = parts.get(2) else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        masters.insert((host, port), ());
    }
    Ok(masters.into_keys().collect())
}

/// `WAIT numreplicas timeout` on the node that holds `key`: how many replicas confirmed the
/// writes made so far on this connection. On a Cluster it is sent to the key's master.
pub async fn wait_replicas(
    conn: &mut Connection,
    key: &str,
    replicas: u32,
    timeout: Duration,
) -> Result<u32, StoreError> {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut cmd = redis::cmd("WAIT");
    cmd.arg(replicas).arg(ms);
    let n: i64 = match conn {
        Connection::Node(c) => cmd.query_async(c).await?,
        Connection::Cluster { conn, .. } => {
            use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
            let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
            let v = conn
                .route_command(cmd, redis::cluster_routing::RoutingInfo::SingleNode(route))
                .await?;
            redis::from_redis_value(v).map_err(RedisError::from)?
        }
    };
    Ok(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// The key a command works on, for grouping a Cluster pipeline: the first argument after
/// the name, after `numkeys` for scripts; `None` for keyless commands.
fn key_of(cmd: &Cmd) -> Option<Vec<u8>> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(b) => Some(b),
        _ => None,
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" => {
            let _script = args.next()?;
            let numkeys = args.next()?;
            if numkeys == b"0" {
                return None;
            }
            args.next().map(<[u8]>::to_vec)
        }
        b"PING" | b"WAIT" | b"INFO" | b"CONFIG" | b"CLIENT" | b"CLUSTER" | b"SCRIPT" | b"SCAN"
        | b"ROLE" | b"TIME" | b"DBSIZE" => None,
        _ => args.next().map(<[u8]>::to_vec),
    }
}

/// A Cluster pipeline: commands grouped by key, each group in order, the groups at once.
async fn cluster_pipeline(
    conn: &ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    if pipeline.is_transaction() {
        // MULTI/EXEC: one slot by contract; the library routes it and reports a cross-slot.
        return conn
            .clone()
            .req_packed_commands(pipeline, offset, count)
            .await;
    }
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut groups: BTreeMap<Option<Vec<u8>>, Vec<usize>> = BTreeMap::new();
    let mut keyless = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        match key_of(cmd) {
            Some(k) => groups.entry(Some(k)).or_default().push(i),
            None => keyless.push(vec![i]),
        }
    }
    let runs = groups.into_values().chain(keyless).map(|idx| {
        let mut c = conn.clone();
        let cmds = &cmds;
        async move {
            let mut out = Vec::with_capacity(idx.len());
            for i in idx {
                let Some(cmd) = cmds.get(i) else { continue };
                out.push((i, answer_of(c.req_packed_command(cmd).await)?));
            }
            Ok::<_, RedisError>(out)
        }
    });
    let mut values: Vec<Value> = vec![Value::Nil; cmds.len()];
    for group in futures_util::future::join_all(runs).await {
        for (i, v) in group? {
            if let Some(slot) = values.get_mut(i) {
                *slot = v;
            }
        }
    }
    Ok(values.into_iter().skip(offset).take(count).collect())
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Node(c) => c.req_packed_command(cmd),
            Connection::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster { conn, .. } => {
                let conn = conn.clone();
                Box::pin(async move { cluster_pipeline(&conn, pipeline, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(c) => c.get_db(),
            Connection::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

/// `url` without its password, for logs and `check-config`: the password of the userinfo
/// (`redis://:pw@h`, `redis://user:pw@h`, `rediss://...`) and the `pass`/`password` query
/// parameters (`unix:///run/redis.sock?pass=pw`); a comma-separated list (Cluster seeds)
/// part by part.
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

const REDACTED: &str = "[redacted]";

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let (head, query) = match rest.find('?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut out = String::from(scheme);
    match head.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&head[..at], &head[at..]);
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(REDACTED);
                }
                // Only a user name: nothing secret, unless it is a bare password as some
                // clients take it; redacted either way.
                None if !userinfo.is_empty() => out.push_str(REDACTED),
                None => {}
            }
            out.push_str(host);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _))
                    if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                {
                    format!("{k}={REDACTED}")
                }
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted_in_every_form() {
        let cases = [
            ("redis://:pw@host:6379/0", "redis://:[redacted]@host:6379/0"),
            (
                "redis://user:pw@host:6379/0",
                "redis://user:[redacted]@host:6379/0",
            ),
            (
                "rediss://user:p@ss:w@host/0",
                "rediss://user:[redacted]@host/0",
            ),
            ("redis://pw@host", "redis://[redacted]@host"),
            (
                "unix:///run/redis.sock?pass=pw",
                "unix:///run/redis.sock?pass=[redacted]",
            ),
            (
                "unix:///run/redis.sock?db=1&user=u&password=pw",
                "unix:///run/redis.sock?db=1&user=u&password=[redacted]",
            ),
            (
                "redis://:a@h1:1,redis://:b@h2:2",
                "redis://:[redacted]@h1:1,redis://:[redacted]@h2:2",
            ),
            ("redis://host/0", "redis://host/0"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
