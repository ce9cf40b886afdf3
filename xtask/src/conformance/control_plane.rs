//! The control plane: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler, in the cluster's own network namespace, the apiserver
//! reached by nodes at `APISERVER` and by pods through the `kubernetes`
//! Service (10.96.0.1), which its lease reconciler points at it.
use std::{net::Ipv4Addr, path::Path, time::Duration};

use super::{
    pki::{self, Identity, Pki},
    process::{Daemon, Place, output, wait_for},
};

pub const APISERVER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const APISERVER_PORT: u16 = 6443;
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP: the first of `SERVICE_CIDR`.
pub const KUBERNETES_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

pub struct ControlPlane {
    pub pki: Pki,
    /// In start order; stopped in reverse (clients before etcd).
    daemons: Vec<Daemon>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while self.daemons.pop().is_some() {}
    }
}

pub fn server() -> String {
    format!("https://{APISERVER}:{APISERVER_PORT}")
}

impl ControlPlane {
    /// Starts everything in `place`'s network namespace, with state and
    /// logs in `dir`, and waits for the apiserver to be ready.
    pub fn start(
        dir: &Path,
        place: &Place,
        kubernetes: &Path,
        identities: &[&Identity],
    ) -> anyhow::Result<Self> {
        let admin = Identity::admin();
        let (manager, scheduler) = (Identity::controller_manager(), Identity::scheduler());
        let mut all = vec![&admin, &manager, &scheduler];
        all.extend_from_slice(identities);
        let pki = pki::create(
            &dir.join("pki"),
            &[APISERVER, KUBERNETES_SERVICE, Ipv4Addr::LOCALHOST],
            &all,
        )?;
        let kubeconfig = dir.join("admin.kubeconfig");
        pki::kubeconfig(&pki, &server(), &admin, &kubeconfig)?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let etcd_bin = crate::k8s::build()?;
        let etcd = Daemon::spawn(
            "etcd",
            &logs,
            place
                .command(etcd_bin.join("etcd"))
                .arg("--name=conformance")
                .arg(format!("--data-dir={}", dir.join("etcd").display()))
                .args(["--listen-client-urls=http://127.0.0.1:2379"])
                .args(["--advertise-client-urls=http://127.0.0.1:2379"])
                .args(["--listen-peer-urls=http://127.0.0.1:2380"])
                .args(["--listen-metrics-urls=http://127.0.0.1:2381"])
                // A cluster that lives minutes: durability buys nothing.
                .arg("--unsafe-no-fsync"),
        )?;
        let key = pki.service_account_key.display().to_string();
        let mut apiserver = Daemon::spawn(
            "kube-apiserver",
            &logs,
            place
                .command(etcd_bin.join("kube-apiserver"))
                .arg("--etcd-servers=http://127.0.0.1:2379")
                .arg("--bind-address=0.0.0.0")
                .arg(format!("--advertise-address={APISERVER}"))
                .arg(format!("--secure-port={APISERVER_PORT}"))
                .arg(format!("--tls-cert-file={}", pki.apiserver_cert.display()))
                .arg(format!("--tls-private-key-file={}", pki.apiserver_key.display()))
                .arg(format!("--client-ca-file={}", pki.ca.display()))
                .arg(format!("--token-auth-file={}", pki.tokens.display()))
                .arg("--authorization-mode=Node,RBAC")
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg(format!("--service-account-key-file={key}"))
                .arg(format!("--service-account-signing-key-file={key}"))
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
                // Nodes are reached by address: no DNS names them.
                .arg("--kubelet-preferred-address-types=InternalIP")
                .arg("--allow-privileged=true"),
        )?;
        let probe = place.clone();
        let admin_kubeconfig = kubeconfig.clone();
        let kubectl = kubernetes.join("kubectl");
        // Not ~/.kube/cache.
        let cache = dir.join("kube-cache");
        wait_for("kube-apiserver", Duration::from_secs(120), &mut [&mut apiserver], || {
            let said = output(
                probe
                    .command(&kubectl)
                    .env("KUBECACHEDIR", &cache)
                    .arg(format!("--kubeconfig={}", admin_kubeconfig.display()))
                    .args(["get", "--raw=/readyz"]),
            )?;
            Ok(said.trim() == "ok")
        })?;
        let mut daemons = vec![etcd, apiserver];
        for (name, identity, flags) in [
            (
                "kube-controller-manager",
                &manager,
                vec![
                    format!("--root-ca-file={}", pki.ca.display()),
                    format!("--service-account-private-key-file={key}"),
                    "--use-service-account-credentials=true".into(),
                    format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    format!("--cluster-cidr={CLUSTER_CIDR}"),
                    "--bind-address=127.0.0.1".into(),
                    // Off its host default under /usr/libexec, which it creates.
                    format!("--flex-volume-plugin-dir={}", dir.join("volume-plugins").display()),
                ],
            ),
            ("kube-scheduler", &scheduler, vec!["--bind-address=127.0.0.1".into()]),
        ] {
            let config = dir.join(format!("{name}.kubeconfig"));
            pki::kubeconfig(&pki, &server(), identity, &config)?;
            daemons.push(Daemon::spawn(
                name,
                &logs,
                place
                    .command(kubernetes.join(name))
                    .arg(format!("--kubeconfig={}", config.display()))
                    .arg("--leader-elect=false")
                    .args(flags),
            )?);
        }
        Ok(Self { pki, daemons })
    }
}
