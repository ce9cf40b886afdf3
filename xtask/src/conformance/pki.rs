//! The cluster's certificate authority and the apiserver's serving
//! certificate (by `openssl`), and the service-account signing key. Clients
//! authenticate with bearer tokens (`Tokens`): kubelets as
//! `system:node:<name>` in `system:nodes`, so the Node authorizer applies
//! to them as on a kubeadm cluster.
use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::setup::check;

/// Files under the cluster's `pki` directory.
pub struct Pki {
    pub ca: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub service_account_key: PathBuf,
    pub tokens: PathBuf,
}

/// Who talks to the apiserver, and the token each uses.
pub struct Identity {
    pub token: String,
    pub user: String,
    pub groups: &'static str,
}

impl Identity {
    pub fn admin() -> Self {
        Self::new("admin", "system:masters")
    }

    pub fn controller_manager() -> Self {
        Self::new("system:kube-controller-manager", "")
    }

    pub fn scheduler() -> Self {
        Self::new("system:kube-scheduler", "")
    }

    pub fn node(name: &str) -> Self {
        Self::new(&format!("system:node:{name}"), "system:nodes")
    }

    fn new(user: &str, groups: &'static str) -> Self {
        // Unguessable enough for a cluster that lives minutes on a test host.
        let token = format!(
            "{:016x}",
            crate::conformance::build::fnv1a(
                format!("{user} {} {:?}", std::process::id(), std::time::SystemTime::now())
                    .as_bytes(),
            )
        );
        Self { token, user: user.to_owned(), groups }
    }
}

/// Writes the CA, a serving certificate for every name and address the
/// apiserver is reached by (its node-facing address, the `kubernetes`
/// Service's ClusterIP, loopback), the service-account key and the token
/// file for `identities`.
pub fn create(dir: &Path, addresses: &[Ipv4Addr], identities: &[&Identity]) -> anyhow::Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let pki = Pki {
        ca: dir.join("ca.crt"),
        apiserver_cert: dir.join("apiserver.crt"),
        apiserver_key: dir.join("apiserver.key"),
        service_account_key: dir.join("service-account.key"),
        tokens: dir.join("tokens.csv"),
    };
    let ca_key = dir.join("ca.key");
    check(
        openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=forwarder-conformance-ca"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&pki.ca),
    )?;
    let csr = dir.join("apiserver.csr");
    check(
        openssl(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver"])
            .arg("-keyout")
            .arg(&pki.apiserver_key)
            .arg("-out")
            .arg(&csr),
    )?;
    let mut names: Vec<String> = ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect();
    names.push("DNS:kubernetes.default.svc.cluster.local".into());
    names.push("DNS:localhost".into());
    names.extend(addresses.iter().map(|a| format!("IP:{a}")));
    let extensions = dir.join("apiserver.ext");
    std::fs::write(
        &extensions,
        format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
            names.join(",")
        ),
    )?;
    check(
        openssl(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&pki.ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(&pki.apiserver_cert),
    )?;
    check(openssl(["genrsa", "-out"]).arg(&pki.service_account_key).arg("2048"))?;
    let mut tokens = String::new();
    for (uid, identity) in identities.iter().enumerate() {
        writeln!(tokens, "{},{},{uid},\"{}\"", identity.token, identity.user, identity.groups)?;
    }
    std::fs::write(&pki.tokens, tokens)?;
    Ok(pki)
}

/// A kubeconfig for `identity` against `server`, trusting the cluster's CA.
pub fn kubeconfig(pki: &Pki, server: &str, identity: &Identity, path: &Path) -> anyhow::Result<()> {
    let text = forwarder_tests::k8s::kubeconfig_text(server, &pki.ca, &identity.token);
    std::fs::write(path, text)?;
    Ok(())
}

fn openssl<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("openssl");
    cmd.args(args).stderr(std::process::Stdio::null());
    cmd
}
