//! One upstream service's replicas: every address its endpoint URLs resolve to (a headless
//! Service's name resolves to every pod), each checked with grpc.health.v1. The SERVING ones are
//! in tonic's balanced channel (power-of-two-choices over pending requests); the set is refreshed
//! every interval, and at once when a call finds a replica gone.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch, Notify},
    task::JoinSet,
};
use tonic::transport::{channel::Change, Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
use url::Url;

/// How long a replica's health check may take before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Where an upstream service is: one or more URLs, and the CA its TLS certificates chain to.
#[derive(Clone)]
pub struct UpstreamSpec {
    pub urls: Vec<Url>,
    pub tls: Option<ClientTlsConfig>,
}

impl UpstreamSpec {
    /// `list`: comma-separated `http://host:port` or `https://host:port` URLs; `https` needs `ca`
    /// or uses the CA given for all upstreams.
    pub fn parse(list: &str, ca: Option<&Path>) -> Result<Self, String> {
        let mut urls = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let url = Url::parse(&endpoint_url(item, ca.is_some()))
                .map_err(|e| format!("upstream endpoint {item:?}: {e}"))?;
            if !matches!(url.scheme(), "http" | "https")
                || url.host_str().is_none()
                || url.port_or_known_default().is_none()
            {
                return Err(format!(
                    "upstream endpoint {item:?}: expected HOST:PORT, http://HOST:PORT or https://HOST:PORT"
                ));
            }
            urls.push(url);
        }
        if urls.is_empty() {
            return Err("an upstream endpoint list is empty".into());
        }
        let tls = match ca {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| format!("--upstream-ca {}: {e}", ca.display()))?;
                Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            }
            None if urls.iter().any(|u| u.scheme() == "https") => {
                return Err("https upstream endpoints need --upstream-ca".into());
            }
            None => None,
        };
        Ok(Self { urls, tls })
    }

    fn endpoint(&self, addr: SocketAddr, url: &Url) -> Option<Endpoint> {
        let mut endpoint = Endpoint::from_shared(format!("{}://{addr}", url.scheme()))
            .ok()?
            .connect_timeout(CHECK_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if url.scheme() == "https" {
            // The certificate names the service, not the pod address connected to.
            let tls = self.tls.clone().unwrap_or_default().domain_name(url.host_str()?.to_string());
            endpoint = endpoint.tls_config(tls).ok()?;
        }
        Some(endpoint)
    }
}

pub struct Pool {
    channel: Channel,
    recheck: Arc<Notify>,
    ready: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pool {
    /// Starts watching `spec`'s replicas of `service` (its grpc.health.v1 name).
    pub fn start(service: &'static str, spec: UpstreamSpec, interval: Duration) -> Self {
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(1024);
        let (ready_tx, ready) = watch::channel(false);
        let recheck = Arc::new(Notify::new());
        let task = tokio::spawn(maintain(service, spec, interval, changes, ready_tx, recheck.clone()));
        Self { channel, recheck, ready, task }
    }

    /// The balanced channel over the SERVING replicas.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Whether at least one replica is SERVING.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Looks at the replicas again now (a call found one gone).
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }
}

async fn maintain(
    service: &'static str,
    spec: UpstreamSpec,
    interval: Duration,
    changes: mpsc::Sender<Change<SocketAddr, Endpoint>>,
    ready: watch::Sender<bool>,
    recheck: Arc<Notify>,
) {
    let mut serving: HashSet<SocketAddr> = HashSet::new();
    // A lazily connected channel per address, for its health checks.
    let mut probes: HashMap<SocketAddr, Channel> = HashMap::new();
    loop {
        let mut found: HashMap<SocketAddr, Url> = HashMap::new();
        for url in &spec.urls {
            let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else { continue };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            match tokio::net::lookup_host((host, port)).await {
                Ok(addrs) => found.extend(addrs.map(|a| (a, url.clone()))),
                Err(e) => tracing::warn!(%url, error = %e, service, "cannot resolve an upstream"),
            }
        }
        probes.retain(|addr, _| found.contains_key(addr));
        let mut checks = JoinSet::new();
        for (addr, url) in &found {
            if !probes.contains_key(addr) {
                let Some(endpoint) = spec.endpoint(*addr, url) else { continue };
                probes.insert(*addr, endpoint.connect_lazy());
            }
            let probe = probes[addr].clone();
            let addr = *addr;
            checks.spawn(async move { (addr, is_serving(probe, service).await) });
        }
        let mut now_serving = HashSet::new();
        while let Some(Ok((addr, up))) = checks.join_next().await {
            if up {
                now_serving.insert(addr);
            }
        }
        for addr in now_serving.difference(&serving) {
            if let Some(endpoint) = spec.endpoint(*addr, &found[addr]) {
                tracing::info!(%addr, service, "upstream replica serving");
                let _ = changes.send(Change::Insert(*addr, endpoint)).await;
            }
        }
        for addr in serving.difference(&now_serving) {
            tracing::warn!(%addr, service, "upstream replica gone or not serving");
            let _ = changes.send(Change::Remove(*addr)).await;
        }
        serving = now_serving;
        ready.send_replace(!serving.is_empty());
        metrics::gauge!("caption_upstream_replicas", "service" => service).set(serving.len() as f64);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = recheck.notified() => {}
        }
    }
}

async fn is_serving(channel: Channel, service: &str) -> bool {
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest { service: service.into() });
    matches!(
        tokio::time::timeout(CHECK_TIMEOUT, check).await,
        Ok(Ok(resp)) if resp.get_ref().status == ServingStatus::Serving as i32
    )
}

/// An endpoint as gRPC tools write it, `HOST:PORT`, or as a URL: a bare `HOST:PORT` is `http://`,
/// or `https://` when a CA for TLS was given.
pub fn endpoint_url(endpoint: &str, tls: bool) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("{}://{endpoint}", if tls { "https" } else { "http" })
    }
}
