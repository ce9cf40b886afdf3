//! kube-proxy-compatible health endpoints: `/healthz` answers 200 while the
//! last sync without errors is younger than twice the sync period, 503
//! before the first and after that; `/livez` asks only that the sync loop
//! runs (a full map is not cured by restarting the agent); and the
//! per-Service health check node ports of `externalTrafficPolicy: Local`
//! Services, which load balancers probe to find nodes with endpoints.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Shared between the sync loop and the health server.
#[derive(Debug)]
pub struct Health {
    /// Unix seconds of the last sync without errors; 0 before the first.
    last_sync: AtomicU64,
    /// Unix seconds of the last sync, with errors or not.
    last_attempt: AtomicU64,
    /// Seconds after which that is too old: twice the sync period.
    stale_after: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(std::time::Duration::from_secs(30))
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Health {
    pub fn new(sync_period: std::time::Duration) -> Self {
        Self {
            last_sync: AtomicU64::new(0),
            last_attempt: AtomicU64::new(0),
            stale_after: 2 * sync_period.as_secs().max(1),
        }
    }

    /// A sync ran, whatever its outcome.
    pub fn attempted(&self) {
        self.last_attempt.store(now(), Ordering::Relaxed);
    }

    pub fn synced(&self) {
        self.attempted();
        self.last_sync.store(now(), Ordering::Relaxed);
    }

    /// Status code and JSON body for `path`.
    pub fn respond(&self, path: &str) -> (u16, String) {
        match path {
            "/healthz" | "/livez" => {
                let last = match path {
                    "/livez" => &self.last_attempt,
                    _ => &self.last_sync,
                };
                let (last, now) = (last.load(Ordering::Relaxed), now());
                let body = format!(r#"{{"lastUpdated": {last}, "currentTime": {now}}}"#);
                let fresh = last != 0 && now.saturating_sub(last) <= self.stale_after;
                (if fresh { 200 } else { 503 }, body)
            }
            _ => (404, "404 page not found".into()),
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Answers a request path with a status code and a body.
pub trait Respond: Send + Sync + 'static {
    fn respond(&self, path: &str) -> (u16, String);

    fn content_type(&self) -> &'static str {
        "application/json"
    }
}

impl Respond for Health {
    fn respond(&self, path: &str) -> (u16, String) {
        Health::respond(self, path)
    }
}

pub async fn serve(listener: TcpListener, responder: Arc<impl Respond>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let responder = responder.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &*responder).await {
                        tracing::debug!(%error, "health request failed");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "health listener accept failed"),
        }
    }
}

/// The health check node port of one `externalTrafficPolicy: Local`
/// Service: 200 with the count of this node's ready endpoints when there is
/// at least one, 503 otherwise (also when they are all terminating).
#[derive(Debug)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: AtomicU64,
}

impl Respond for ServiceHealth {
    fn respond(&self, _path: &str) -> (u16, String) {
        let count = self.local_endpoints.load(Ordering::Relaxed);
        let body = format!(
            r#"{{"service": {{"namespace": "{}", "name": "{}"}}, "localEndpoints": {count}, "serviceProxyHealthy": true}}"#,
            self.namespace, self.name
        );
        (if count > 0 { 200 } else { 503 }, body)
    }
}

async fn answer(mut stream: TcpStream, health: &impl Respond) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = health.respond(path.split('?').next().unwrap_or(path));
    let reason = match status {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        health.content_type(),
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_health_counts_local_endpoints() {
        let health = ServiceHealth {
            namespace: "demo".into(),
            name: "web".into(),
            local_endpoints: AtomicU64::new(0),
        };
        let (status, body) = health.respond("/");
        assert_eq!(status, 503);
        assert!(body.contains(r#""localEndpoints": 0"#), "{body}");
        health.local_endpoints.store(2, Ordering::Relaxed);
        let (status, body) = health.respond("/anything");
        assert_eq!(status, 200);
        assert!(
            body.contains(r#""name": "web""#) && body.contains(r#""localEndpoints": 2"#),
            "{body}"
        );
    }

    #[test]
    fn unhealthy_until_first_sync() {
        let health = Health::default();
        assert_eq!(health.respond("/healthz").0, 503);
        health.attempted();
        assert_eq!(health.respond("/livez").0, 200, "the loop runs");
        assert_eq!(health.respond("/healthz").0, 503, "no clean sync yet");
        health.synced();
        assert_eq!(health.respond("/healthz").0, 200);
        assert_eq!(health.respond("/other").0, 404);
    }

    #[test]
    fn unhealthy_when_no_sync_succeeded_for_twice_the_period() {
        let health = Health::new(std::time::Duration::from_secs(30));
        health.last_sync.store(now() - 59, Ordering::Relaxed);
        assert_eq!(health.respond("/healthz").0, 200);
        health.last_sync.store(now() - 61, Ordering::Relaxed);
        assert_eq!(health.respond("/healthz").0, 503);
    }
}
