//! Kubernetes objects from the API server: one reflector each (list, then
//! watch; relist after errors and `410 Gone`, with backoff) for Services,
//! EndpointSlices and this node's Node. The maps keep the last programmed
//! state while the API is unreachable; objects deleted meanwhile leave with
//! the relist.
use std::{fmt::Debug, hash::Hash, path::Path, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::{manifests::Objects, metrics::TRIGGER_TIME};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig { path: String, source: KubeconfigError },
    #[error("no --kubeconfig, and neither $KUBECONFIG, ~/.kube/config nor in-cluster config: {0}")]
    Infer(#[from] InferConfigError),
    #[error("API client: {0}")]
    Client(#[from] kube::Error),
    #[error(
        "KUBERNETES_SERVICE_HOST is {0:?}, not an address: set the API server's address in \
         the agent's ConfigMap (deploy/forwarder.yaml)"
    )]
    ServiceHost(String),
}

/// The in-cluster address as deploy/forwarder.yaml sets it: left unedited
/// (or empty) it is no host, and says so rather than failing on a URL.
fn check_service_host() -> Result<(), ClusterError> {
    match std::env::var("KUBERNETES_SERVICE_HOST") {
        Ok(host) if host.trim().is_empty() || host.contains(char::is_whitespace) => {
            Err(ClusterError::ServiceHost(host))
        }
        _ => Ok(()),
    }
}

pub struct ClusterSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    changed: Arc<Notify>,
}

impl ClusterSource {
    /// Starts the reflectors; `kubeconfig` `None` means in-cluster (or the
    /// default kubeconfig), as with kube-proxy.
    pub async fn connect(kubeconfig: Option<&Path>, node_name: &str) -> Result<Self, ClusterError> {
        let config = match kubeconfig {
            Some(path) => {
                let error =
                    |source| ClusterError::Kubeconfig { path: path.display().to_string(), source };
                let file = Kubeconfig::read_from(path).map_err(error)?;
                Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(error)?
            }
            None => {
                check_service_host()?;
                Config::infer().await?
            }
        };
        let client = Client::try_from(config)?;
        let changed = Arc::new(Notify::new());
        let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        Ok(Self {
            services: reflect(Api::all(client.clone()), watcher::Config::default(), &changed, &[]),
            slices: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                &changed,
                &[TRIGGER_TIME],
            ),
            nodes: reflect(Api::all(client), this_node, &changed, &[]),
            changed,
        })
    }

    /// Waits until each kind has been listed completely once: programming
    /// from a partial cache would delete every Service not yet seen.
    pub async fn ready(&self) {
        let (a, b, c) = tokio::join!(
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.nodes.wait_until_ready()
        );
        // A writer only goes away with its task, which never ends.
        debug_assert!(a.is_ok() && b.is_ok() && c.is_ok());
    }

    /// Resolves after the next change (at once if one came since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The cached objects, shared with the cache (no copies).
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: self.services.state(),
            slices: self.slices.state(),
            nodes: self.nodes.state(),
        }
    }
}

/// A reflector on its own task: keeps `Store` current and signals `changed`
/// after every event. Errors are logged and retried with backoff; the
/// stream never ends. Objects are cached without their managed fields and
/// with only the annotations `keep` names: at 10,000 Services those are
/// most of the memory and none of the meaning.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
    keep: &'static [&'static str],
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let slim = watcher(api, config).default_backoff().modify(move |object: &mut K| {
        object.managed_fields_mut().clear();
        object.annotations_mut().retain(|key, _| keep.contains(&key.as_str()));
    });
    let stream = reflector::reflector(writer, slim);
    let changed = changed.clone();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(error) => tracing::warn!(%kind, %error, "watch failed; retrying"),
            }
        }
    });
    store
}
