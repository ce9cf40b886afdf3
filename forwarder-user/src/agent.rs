//! The `run` loop: attach, then keep maps and attachments in sync with the
//! Kubernetes objects (API server or manifests) and the node's interfaces
//! until a signal arrives.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use forwarder_common::{CtTimeouts, SnatPorts, map_names};
use futures::StreamExt;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    addresses::{node_ips, node_zone, nodeport_addresses, snat_addresses},
    cidr::Cidr,
    cluster::ClusterSource,
    dataplane::{Capacity, Dataplane, Tuning, XdpAttachMode},
    healthz::{self, Health, ServiceHealth},
    manifests::Objects,
    metrics::Metrics,
    model::DesiredState,
    netlink::{Link, Netlink, glob_match},
    pins::PinDir,
    sock_diag,
    source::Source,
    stale::{abandoned_sockets, removed_udp_endpoints},
    sync::Syncer,
    translate::{HealthCheck, Locality, translate},
};

/// Where the Kubernetes objects come from.
pub enum SourceConfig {
    /// YAML/JSON files, watched: no cluster.
    Manifests(PathBuf),
    /// The API server, through this kubeconfig or in-cluster config.
    Cluster { kubeconfig: Option<PathBuf> },
}

pub struct Config {
    pub source: SourceConfig,
    pub node_name: String,
    pub ifaces: Vec<String>,
    pub pod_iface_globs: Vec<String>,
    pub healthz_bind_address: SocketAddr,
    /// Node addresses that serve NodePorts; empty means all of them.
    pub nodeport_addresses: Vec<Cidr>,
    /// cgroup v2 directory for the socket-level programs (node-originated
    /// traffic); `None`: the root of the mounted cgroup v2 hierarchy.
    pub cgroup_path: Option<PathBuf>,
    /// Where this node's maps and links are pinned: `<root>/<node name>/`.
    pub bpffs_root: PathBuf,
    pub metrics_bind_address: SocketAddr,
    /// Map sizes; a pinned map keeps the size it was created with.
    pub capacity: Capacity,
    /// Conntrack lifetimes by state.
    pub timeouts: CtTimeouts,
    /// How often expired conntrack entries are removed.
    pub conntrack_gc_interval: Duration,
    /// ICMP rejects per second and CPU; 0: no limit.
    pub icmp_reject_rate: u32,
    /// Every this often the whole state is synced even without a change;
    /// /healthz fails when no sync succeeded for twice as long.
    pub sync_period: Duration,
}

/// When map writes failed (a full map), the sync is retried this often.
const RETRY_FAILED_SYNC: Duration = Duration::from_secs(5);

/// Loads and attaches the programs (into what a previous agent left), runs
/// until SIGINT/SIGTERM and exits leaving them in place: forwarding goes on
/// with the last state until the next agent syncs. `forwarder cleanup`
/// removes them.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut source = match &config.source {
        SourceConfig::Manifests(path) => {
            std::fs::metadata(path)
                .with_context(|| format!("manifests path {}", path.display()))?;
            Source::manifests(path)
        }
        SourceConfig::Cluster { kubeconfig } => Source::cluster(
            ClusterSource::connect(kubeconfig.as_deref(), &config.node_name)
                .await
                .context("connecting to the API server")?,
        ),
    };
    let listener = healthz::bind(config.healthz_bind_address)
        .await
        .with_context(|| format!("healthz address {}", config.healthz_bind_address))?;
    let metrics_listener = healthz::bind(config.metrics_bind_address)
        .await
        .with_context(|| format!("metrics address {}", config.metrics_bind_address))?;
    let capacity = config.capacity;
    let pins = PinDir::new(&config.bpffs_root, &config.node_name);
    let snat_ports = SnatPorts::DEFAULT;
    let tuning =
        Tuning { timeouts: config.timeouts, snat_ports, reject_rate: config.icmp_reject_rate };
    let mut dataplane =
        Dataplane::load(capacity, tuning, pins.clone()).context("loading the eBPF programs")?;
    crate::conntrack::spawn_collector(
        [pins.map(map_names::CONNTRACK), pins.map(map_names::NAT)],
        config.timeouts,
        config.conntrack_gc_interval,
    );
    let capacity = dataplane.capacity();
    let wanted = config.capacity.as_created();
    if (capacity.services, capacity.conntrack) != (wanted.services, wanted.conntrack) {
        tracing::warn!(
            services = capacity.services,
            conntrack = capacity.conntrack,
            "the pinned maps keep their sizes; `forwarder cleanup` applies new ones"
        );
    }
    let metrics = Metrics::with_stats_pin(&pins.map(map_names::STATS)).unwrap_or_else(|error| {
        tracing::warn!(%error, "packet counters not exported");
        Metrics::default()
    });
    let metrics = Arc::new(metrics);
    tokio::spawn(healthz::serve(metrics_listener, metrics.clone()));
    // Restore: the maps still serve the last state; the first sync writes
    // only what changed since and sweeps what is gone.
    let mut syncer = Syncer::new(capacity.services as usize, capacity.backends as usize);
    let contents = dataplane.maps.contents().context("reading the pinned maps")?;
    let restored = (contents.services.len(), contents.backends.len());
    let report = syncer.restore(contents, &mut dataplane.maps);
    if restored != (0, 0) {
        tracing::info!(
            service_entries = restored.0,
            backends = restored.1,
            removed = report.writes,
            "adopted the state a previous agent left"
        );
    }
    let mut agent = Agent {
        capacity,
        dataplane,
        syncer,
        netlink: Netlink::connect().context("netlink")?,
        health: Arc::new(Health::new(config.sync_period)),
        metrics,
        synced_once: false,
        objects_seen: false,
        manifest_node_ips: BTreeSet::new(),
        applied: DesiredState::default(),
        health_checks: BTreeMap::new(),
        config,
    };
    tokio::spawn(healthz::serve(listener, agent.health.clone()));
    let result = agent.run(&mut source).await;
    tracing::info!("exiting; programs stay attached (`forwarder cleanup` removes them)");
    result
}

struct Agent {
    capacity: Capacity,
    dataplane: Dataplane,
    syncer: Syncer,
    netlink: Netlink,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Whether a sync without errors happened: trigger times seen before
    /// it belong to changes made before this agent ran.
    synced_once: bool,
    /// Whether a sync read the objects (this Node's addresses among them).
    objects_seen: bool,
    /// This node's addresses from its Node object.
    manifest_node_ips: BTreeSet<Ipv4Addr>,
    /// The state of the last sync, to find what left.
    applied: DesiredState,
    /// Health check node port servers, by port.
    health_checks: BTreeMap<u16, (Arc<ServiceHealth>, tokio::task::JoinHandle<()>)>,
    config: Config,
}

impl Agent {
    async fn run(&mut self, source: &mut Source) -> anyhow::Result<()> {
        // A new build may bring the node addresses' map in a new layout,
        // empty: it is filled before the build's programs replace the
        // running ones, or NodePorts would go unserved until then.
        if let Some(links) = self.links().await {
            self.reconcile_addresses(&links).await;
        }
        for iface in &self.config.ifaces {
            let mode = self
                .dataplane
                .attach_node_iface(iface)
                .with_context(|| format!("attaching XDP to --iface {iface}"))?;
            match mode {
                XdpAttachMode::Driver => tracing::info!(%iface, "XDP attached in driver mode"),
                XdpAttachMode::Generic => tracing::warn!(%iface, "XDP attached in generic mode"),
                XdpAttachMode::Replaced => tracing::info!(%iface, "XDP program replaced in place"),
            }
        }
        match self.config.cgroup_path.clone().or_else(cgroup2_root).or_else(mount_cgroup2) {
            Some(cgroup) => match self.dataplane.attach_sockets(&cgroup) {
                Ok(()) => tracing::info!(cgroup = %cgroup.display(), "socket programs attached"),
                Err(error) => tracing::warn!(
                    error = format!("{:#}", anyhow::Error::new(error)),
                    "node-originated traffic to Services is not translated"
                ),
            },
            None => tracing::warn!(
                "no cgroup v2 hierarchy: node-originated traffic to Services is not translated"
            ),
        }
        let mut link_changes = Netlink::changes().context("netlink subscription")?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut retry_at: Option<Instant> = None;
        self.reconcile_interfaces().await;
        // Every present interface is attached: links left for others go.
        self.dataplane.sweep_unclaimed_links();
        let mut resync = tokio::time::interval(self.config.sync_period);
        resync.tick().await;
        loop {
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = resync.tick(), if source.ready() => {
                    // Nothing changed: a no-op that proves the maps writable.
                    let complete = self.sync(source.objects());
                    retry_at = (!complete).then(|| Instant::now() + RETRY_FAILED_SYNC);
                }
                () = source.changed(retry_at) => {
                    source.coalesce().await;
                    let complete = self.sync(source.objects());
                    retry_at = (!complete).then(|| Instant::now() + RETRY_FAILED_SYNC);
                    self.reconcile_interfaces().await;
                }
                Some(()) = link_changes.next() => {
                    // Coalesce a burst of notifications into one reconcile.
                    while let Ok(Some(())) =
                        tokio::time::timeout(Duration::from_millis(20), link_changes.next()).await
                    {}
                    self.reconcile_interfaces().await;
                }
            }
        }
        tracing::info!("signal received, shutting down");
        Ok(())
    }

    /// Closes the node's connected UDP sockets whose backend left the
    /// frontend they were connected through (`stale`): their owners get
    /// ECONNABORTED and connect anew, to a backend that serves.
    fn close_abandoned_sockets(&self, state: &DesiredState) {
        let sockets = match sock_diag::connected_udp_sockets() {
            Ok(sockets) => sockets,
            Err(error) => {
                tracing::warn!(%error, "listing the node's UDP sockets failed");
                return;
            }
        };
        let maps = &self.dataplane.maps;
        let abandoned =
            abandoned_sockets(&sockets, |s| maps.socket_frontend(s.cookie, s.remote), state);
        let mut closed = 0;
        for socket in abandoned {
            match sock_diag::destroy(socket) {
                Ok(()) => closed += 1,
                Err(error) => {
                    tracing::warn!(%error, local = %socket.local, remote = %socket.remote, "closing a node UDP socket failed");
                }
            }
        }
        if closed > 0 {
            tracing::info!(
                sockets = closed,
                "closed node UDP sockets connected to endpoints that left"
            );
        }
    }

    /// Returns whether every map write succeeded.
    fn sync(&mut self, objects: Objects) -> bool {
        let started = Instant::now();
        self.objects_seen = true;
        let here = Locality {
            node: &self.config.node_name,
            zone: node_zone(&objects.nodes, &self.config.node_name),
        };
        let translation = translate(&objects.services, &objects.slices, here);
        for skipped in &translation.skipped {
            tracing::warn!(object = %skipped.object, reason = %skipped.reason, "Service part skipped");
        }
        self.manifest_node_ips = node_ips(&objects.nodes, &self.config.node_name);
        let report = self.syncer.apply(&translation.state, &mut self.dataplane.maps);
        for error in &report.errors {
            tracing::error!(%error, "map write failed; the previous entry stays in force");
        }
        let left =
            self.synced_once.then(|| removed_udp_endpoints(&self.applied, &translation.state));
        let purged = match &left {
            Some(stale) => self.dataplane.maps.purge_udp_flows(stale),
            // What left while no agent ran is not in `applied`: judge every
            // UDP flow the maps hold against the new state.
            None => self.dataplane.maps.purge_udp_flows_outside(&translation.state),
        };
        match purged {
            Ok(0) => {}
            Ok(flows) => tracing::info!(flows, "removed UDP flows to endpoints that left"),
            Err(error) => tracing::warn!(%error, "removing stale UDP flows failed"),
        }
        if left.as_ref().is_none_or(|stale| !stale.is_empty()) {
            self.close_abandoned_sockets(&translation.state);
        }
        let health_checks_bound = self.reconcile_health_checks(&translation.health_checks);
        self.applied = translation.state;
        let took = started.elapsed();
        self.metrics.synced(took, report.errors.len());
        self.health.attempted();
        for warning in &report.warnings {
            tracing::warn!(%warning, "Service partly programmed");
        }
        if report.errors.is_empty() {
            self.health.synced();
            self.metrics.programmed(&objects.slices, self.synced_once);
            self.synced_once = true;
        }
        self.record_map_entries();
        if report.writes > 0 || !report.errors.is_empty() {
            tracing::info!(
                frontends = self.applied.services.len(),
                writes = report.writes,
                elapsed_ms = took.as_secs_f64() * 1e3,
                "synced"
            );
        }
        report.errors.is_empty() && health_checks_bound
    }

    fn record_map_entries(&self) {
        let capacity = self.capacity;
        for (name, entries) in self.syncer.entries() {
            let limit = match name {
                map_names::SERVICES => capacity.services,
                map_names::BACKENDS => capacity.backends,
                map_names::NODE_IPS => forwarder_common::NODE_IPS_MAX,
                map_names::SNAT_ADDRS => forwarder_common::SNAT_ADDRS_MAX,
                map_names::CLUSTER_IPS => forwarder_common::CLUSTER_IPS_MAX,
                _ => forwarder_common::SOURCE_RANGES_MAX,
            };
            self.metrics.set_map(name, Some(entries), limit);
        }
        // LRU maps fill by themselves; counting them would walk every entry.
        self.metrics.set_map(map_names::CONNTRACK, None, capacity.conntrack);
        self.metrics.set_map(map_names::NAT, None, capacity.nat);
        self.metrics.set_map(map_names::AFFINITY, None, forwarder_common::AFFINITY_MAX);
        self.metrics.set_map(map_names::SOCKET_NAT, None, forwarder_common::SOCKET_NAT_MAX);
    }

    /// Serves a health check node port per `externalTrafficPolicy: Local`
    /// Service, with its current count of local endpoints. Returns whether
    /// every port is served (a failed bind is retried with the sync).
    fn reconcile_health_checks(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> bool {
        self.health_checks.retain(|port, (health, task)| {
            let keep = wanted
                .get(port)
                .is_some_and(|w| w.namespace == health.namespace && w.name == health.name);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut all_bound = true;
        for (port, check) in wanted {
            let count = check.local_endpoints as u64;
            if let Some((health, _)) = self.health_checks.get(port) {
                health.local_endpoints.store(count, Ordering::Relaxed);
                continue;
            }
            let listener = std::net::TcpListener::bind(("0.0.0.0", *port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std);
            match listener {
                Ok(listener) => {
                    let health = Arc::new(ServiceHealth {
                        namespace: check.namespace.clone(),
                        name: check.name.clone(),
                        local_endpoints: count.into(),
                    });
                    let task = tokio::spawn(healthz::serve(listener, health.clone()));
                    self.health_checks.insert(*port, (health, task));
                }
                // A port just released by an aborted server may still be
                // busy: the failed sync is retried.
                Err(error) => {
                    tracing::warn!(port, %error, "health check node port unavailable");
                    all_bound = false;
                }
            }
        }
        all_bound
    }

    /// Attaches to new pod-facing interfaces, forgets vanished ones, and
    /// refreshes the node addresses.
    async fn reconcile_interfaces(&mut self) {
        let Some(links) = self.links().await else {
            return;
        };
        self.reconcile_pod_attachments(&links);
        self.reconcile_addresses(&links).await;
    }

    async fn links(&mut self) -> Option<Vec<Link>> {
        match self.netlink.links().await {
            Ok(links) => Some(links),
            Err(error) => {
                tracing::warn!(%error, "listing interfaces failed");
                None
            }
        }
    }

    /// Refreshes the node addresses: those that serve NodePorts, and those
    /// flows are masqueraded to.
    async fn reconcile_addresses(&mut self, links: &[Link]) {
        match self.netlink.ipv4_addrs().await {
            Ok(by_interface) => {
                let local: BTreeSet<Ipv4Addr> = by_interface.iter().map(|(_, ip)| *ip).collect();
                let addrs = nodeport_addresses(
                    &local,
                    &self.manifest_node_ips,
                    &self.config.nodeport_addresses,
                );
                // Before the Node object is read, its addresses are unknown:
                // add the local ones, remove nothing a previous agent set.
                let addrs = match self.objects_seen {
                    true => addrs,
                    false => addrs.union(&self.syncer.node_ips()).copied().collect(),
                };
                let mut report = self.syncer.apply_node_ips(&addrs, &mut self.dataplane.maps);
                let snat = snat_addresses(&by_interface, links, &self.config.ifaces);
                let snat_report = self.syncer.apply_snat_addrs(&snat, &mut self.dataplane.maps);
                report.errors.extend(snat_report.errors);
                for error in &report.errors {
                    tracing::error!(%error, "node address update failed");
                }
            }
            Err(error) => tracing::warn!(%error, "listing addresses failed"),
        }
    }

    fn reconcile_pod_attachments(&mut self, links: &[Link]) {
        let wanted: BTreeSet<(u32, String)> = links
            .iter()
            .filter(|l| !self.config.ifaces.contains(&l.name))
            .filter(|l| self.config.pod_iface_globs.iter().any(|g| glob_match(g, &l.name)))
            .map(|l| (l.index, l.name.clone()))
            .collect();
        let attached: Vec<(u32, String)> =
            self.dataplane.pod_ifaces().map(|(i, n)| (i, n.to_owned())).collect();
        for (index, name) in attached {
            // Gone, or renamed (CNIs create veths under a temporary name).
            if !wanted.contains(&(index, name.clone())) {
                self.dataplane.detach_pod_iface(index);
                tracing::info!(iface = %name, "pod interface gone, detached");
            }
        }
        let attached: BTreeSet<u32> = self.dataplane.pod_ifaces().map(|(i, _)| i).collect();
        for (index, name) in wanted {
            if attached.contains(&index) {
                continue;
            }
            match self.dataplane.attach_pod_iface(index, &name) {
                Ok(()) => tracing::info!(iface = %name, "TC attached to pod interface"),
                Err(error) => tracing::warn!(iface = %name, %error, "TC attach failed"),
            }
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted, per /proc/self/mountinfo.
fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        (rest.split_whitespace().next() == Some("cgroup2"))
            .then(|| fields.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Mounts the cgroup v2 hierarchy for ourselves when nobody has (`ip netns
/// exec` hides the host's mounts under /sys; containers may lack it).
fn mount_cgroup2() -> Option<PathBuf> {
    let dir = PathBuf::from("/run/forwarder/cgroup2");
    std::fs::create_dir_all(&dir).ok()?;
    let target = std::ffi::CString::new(dir.to_str()?).ok()?;
    // SAFETY: valid C strings; mounting a filesystem has no memory effects.
    let rc = unsafe {
        libc::mount(c"cgroup2".as_ptr(), target.as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "mounting cgroup2");
        return None;
    }
    Some(dir)
}
