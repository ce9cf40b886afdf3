//! kube-proxy-compatible health endpoint: `/healthz` answers 200 once the
//! first sync has been applied, 503 before.
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
#[derive(Debug, Default)]
pub struct Health {
    /// Unix seconds of the last applied sync; 0 before the first.
    last_sync: AtomicU64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Health {
    pub fn synced(&self) {
        self.last_sync.store(now(), Ordering::Relaxed);
    }

    /// Status code and JSON body for `path`.
    pub fn respond(&self, path: &str) -> (u16, String) {
        match path {
            "/healthz" | "/livez" => {
                let last = self.last_sync.load(Ordering::Relaxed);
                let body = format!(r#"{{"lastUpdated": {last}, "currentTime": {}}}"#, now());
                (if last == 0 { 503 } else { 200 }, body)
            }
            _ => (404, "404 page not found".into()),
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let health = health.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &health).await {
                        tracing::debug!(%error, "health request failed");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "health listener accept failed"),
        }
    }
}

async fn answer(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
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
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_until_first_sync() {
        let health = Health::default();
        assert_eq!(health.respond("/healthz").0, 503);
        health.synced();
        assert_eq!(health.respond("/healthz").0, 200);
        assert_eq!(health.respond("/livez").0, 200);
        assert_eq!(health.respond("/other").0, 404);
    }
}
