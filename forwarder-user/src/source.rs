//! Where the Kubernetes objects come from, and how a change is noticed:
//! manifest files polled for edits, or the API server's reflectors.
use std::{path::Path, time::Instant};

use tokio::time::{Duration, Interval};

use crate::{
    cluster::ClusterSource,
    manifests::{Fingerprint, ManifestSource, Objects},
};

/// How often the manifests are checked for changes (edits apply within 1 s).
const MANIFEST_POLL: Duration = Duration::from_millis(250);
/// A burst of API events (a rollout touching many slices) within this time
/// is programmed in one sync; short against the latency goal (p99 100 ms).
const COALESCE_EVENTS: Duration = Duration::from_millis(5);

/// The objects' source, and how it tells of changes.
pub enum Source {
    Manifests {
        files: ManifestSource,
        fingerprint: Option<Fingerprint>,
        poll: Interval,
    },
    /// `listed`: every kind was listed completely once.
    Cluster {
        cluster: ClusterSource,
        listed: bool,
    },
}

impl Source {
    pub fn manifests(path: &Path) -> Self {
        Self::Manifests {
            files: ManifestSource::new(path),
            fingerprint: None,
            poll: tokio::time::interval(MANIFEST_POLL),
        }
    }

    pub fn cluster(cluster: ClusterSource) -> Self {
        Self::Cluster { cluster, listed: false }
    }

    /// Resolves when the objects changed, or when a failed sync is due for
    /// another try (`retry_at`).
    pub async fn changed(&mut self, retry_at: Option<Instant>) {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        match self {
            Self::Manifests { files, fingerprint, poll } => {
                let edited = async {
                    loop {
                        poll.tick().await;
                        let current = files.fingerprint();
                        if fingerprint.as_ref() != Some(&current) {
                            *fingerprint = Some(current);
                            return;
                        }
                    }
                };
                tokio::select! { () = retry => {}, () = edited => {} }
            }
            // Never program from a partial cache: it lacks what is not
            // listed yet, and the sync would delete that.
            Self::Cluster { cluster, listed: listed @ false } => {
                cluster.ready().await;
                tracing::info!("API objects listed");
                *listed = true;
            }
            Self::Cluster { cluster, listed: true } => tokio::select! {
                () = retry => {}
                () = cluster.changed() => {}
            },
        }
    }

    /// Lets a burst of API events arrive before the sync (outside
    /// `changed`, whose future a concurrent event may cancel).
    pub async fn coalesce(&self) {
        if let Self::Cluster { .. } = self {
            tokio::time::sleep(COALESCE_EVENTS).await;
        }
    }

    /// Whether `objects` may be synced: not before the first complete lists.
    pub fn ready(&self) -> bool {
        !matches!(self, Self::Cluster { listed: false, .. })
    }

    pub fn objects(&mut self) -> Objects {
        match self {
            Self::Manifests { files, .. } => {
                let (objects, problems) = files.load();
                for problem in &problems {
                    tracing::warn!(%problem, "manifest skipped");
                }
                objects
            }
            Self::Cluster { cluster, .. } => cluster.snapshot(),
        }
    }
}
