//! Attaching the programs so that they outlive the agent. XDP, TCX (kernel
//! 6.6+) and cgroup attachments are BPF links pinned under the node's pin
//! directory; before TCX, TC programs are netlink filters at a fixed
//! priority and handle, which the kernel keeps with the interface. A new
//! agent swaps its programs into what it finds (atomically: no packet goes
//! untranslated), and attaches afresh where nothing is left.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
        links::{FdLink, LinkError},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use forwarder_common::program_names;

use crate::{
    conntrack::now_seconds,
    dataplane::{
        Capacity, DataplaneError, Maps, Tuning, current_netns_cookie, load_object, pinned_capacity,
    },
    pins::{self, PinDir},
};

/// Where our netlink TC filters sit (kernels before 6.6): fixed, so a new
/// agent finds and replaces its predecessor's.
const TC_PRIORITY: u16 = 0x2f00;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0xf0d);

/// How an XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Driver,
    Generic,
    /// Swapped into the link a previous agent left (its mode kept).
    Replaced,
}

/// One attachment, and what keeps it when the agent is gone.
#[derive(Debug)]
enum Attachment {
    /// A BPF link, alive as long as its pin.
    Pinned(PathBuf),
    /// A netlink TC filter, alive as long as the interface.
    Netlink { iface: String, hook: TcAttachType, program: &'static str },
}

impl Attachment {
    /// Detaches (the interface may be gone already).
    fn remove(self) {
        let result = match &self {
            Self::Pinned(path) => std::fs::remove_file(path),
            Self::Netlink { iface, hook, program } => {
                tc::qdisc_detach_program(iface, *hook, program).map_err(std::io::Error::other)
            }
        };
        if let Err(error) = result {
            tracing::debug!(attachment = ?self, %error, "detach (target may be gone)");
        }
    }
}

fn tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Programs, maps and attachments of a running forwarder.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: Maps,
    pins: PinDir,
    /// Pod-facing attachments by ifindex (names can be reused).
    pod_tc: BTreeMap<u32, (String, Vec<Attachment>)>,
    /// Link pins this agent attached or took over.
    claimed: BTreeSet<PathBuf>,
    capacity: Capacity,
}

impl Dataplane {
    /// Loads for the node whose network namespace is the current one,
    /// reusing the maps pinned in `pins` (creating and pinning them when
    /// there are none).
    pub fn load(capacity: Capacity, tuning: Tuning, pins: PinDir) -> Result<Self, DataplaneError> {
        let pin_err =
            |source| DataplaneError::Pin { path: pins.path().display().to_string(), source };
        pins.create().map_err(pin_err)?;
        let capacity = pinned_capacity(&pins, capacity.as_created())?;
        let node_netns = current_netns_cookie().map_err(DataplaneError::NetnsCookie)?;
        let mut ebpf = load_object(capacity, tuning, node_netns, Some(&pins))?;
        let mut maps = Maps::take(&mut ebpf)?;
        let old_conntrack = pins.map(crate::conntrack::V1_NAME);
        let mut keep = crate::dataplane::MAPS.to_vec();
        match crate::conntrack::migrate_v1(&old_conntrack, &mut maps, now_seconds()) {
            Ok(0) => {}
            Ok(moved) => tracing::info!(entries = moved, "conntrack of an earlier build migrated"),
            Err(error) => {
                tracing::warn!(%error, "an earlier build's conntrack was not migrated; it stays pinned");
                keep.push(crate::conntrack::V1_NAME);
            }
        }
        maps.ensure_hash_seed().map_err(|source| DataplaneError::Map {
            name: forwarder_common::map_names::HASH_SEED,
            source,
        })?;
        // Maps of earlier layouts no build reads any more.
        for stale in pins.unknown_maps(&keep) {
            tracing::info!(pin = %stale.display(), "removing a map an earlier build pinned");
            let _ = std::fs::remove_file(&stale);
        }
        Ok(Self { ebpf, maps, pins, pod_tc: BTreeMap::new(), claimed: BTreeSet::new(), capacity })
    }

    /// The maps' sizes (a pinned map keeps the size it was created with).
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Points the link pinned at `pin` to `program`. `Ok(false)` when
    /// there is none or its target is gone (the stale pin is then removed);
    /// any other failure leaves the old program attached and is an error,
    /// since attaching afresh beside a live link would fail anyway.
    fn replace(&mut self, pin: &Path, program: &'static str) -> Result<bool, DataplaneError> {
        if !pin.exists() {
            return Ok(false);
        }
        self.claimed.insert(pin.to_owned());
        let fd = self.ebpf.program(program).expect("loaded in load()").fd().expect("loaded");
        match pins::replace_program(pin, fd.as_fd()) {
            Ok(()) => Ok(true),
            Err(error) if error.raw_os_error() == Some(libc::ENOLINK) => {
                tracing::info!(pin = %pin.display(), "the link's target is gone; attaching afresh");
                let _ = std::fs::remove_file(pin);
                Ok(false)
            }
            Err(source) => Err(DataplaneError::Pin { path: pin.display().to_string(), source }),
        }
    }

    /// Removes the pins of links this agent did not take over: interfaces
    /// gone or no longer selected while no agent ran. Called once every
    /// present interface is attached.
    pub fn sweep_unclaimed_links(&mut self) {
        for (name, path) in self.pins.links() {
            if !self.claimed.contains(&path) {
                tracing::info!(link = %name, "removing a link no interface claims");
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Pins a new attachment's link: from now on the pin keeps it.
    fn pin_link(
        &mut self,
        link: impl TryInto<FdLink, Error = LinkError>,
        pin: &Path,
    ) -> Result<(), DataplaneError> {
        let error = |e: &dyn std::fmt::Display| DataplaneError::Pin {
            path: pin.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        let link: FdLink = link.try_into().map_err(|e| error(&e))?;
        self.claimed.insert(pin.to_owned());
        link.pin(pin).map(drop).map_err(|e| error(&e))
    }

    /// Attaches the socket-level programs to the cgroup v2 at `cgroup`
    /// (the root one covers every process); they act on this node's
    /// network namespace only, so several nodes can share the hierarchy.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let attach_err =
            |source| DataplaneError::Attach { iface: cgroup.display().to_string(), source };
        let dir = std::fs::File::open(cgroup).map_err(|e| attach_err(ProgramError::IOError(e)))?;
        for name in [
            program_names::SOCK_CONNECT,
            program_names::SOCK_SENDMSG,
            program_names::SOCK_RECVMSG,
            program_names::SOCK_PEERNAME,
        ] {
            let pin = self.pins.link(&format!("sock-{name}"));
            if self.replace(&pin, name)? {
                continue;
            }
            let program: &mut CgroupSockAddr =
                self.ebpf.program_mut(name).expect("loaded").try_into().expect("socket program");
            // With BPF links (5.7+) several programs share a cgroup whatever the
            // mode; the kernel rejects any other mode flag on a link.
            let id = program.attach(&dir, CgroupAttachMode::Single).map_err(attach_err)?;
            let link = program.take_link(id).map_err(attach_err)?;
            self.pin_link(link, &pin)?;
        }
        Ok(())
    }

    fn xdp(&mut self) -> &mut Xdp {
        let program = self.ebpf.program_mut(program_names::XDP_NODE).expect("loaded in load()");
        program.try_into().expect("XDP program")
    }

    fn tc(&mut self, name: &'static str) -> &mut SchedClassifier {
        let program = self.ebpf.program_mut(name).expect("loaded in load()");
        program.try_into().expect("TC program")
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        program: &'static str,
        hook: TcAttachType,
    ) -> Result<Attachment, DataplaneError> {
        let attach_err = |source| DataplaneError::Attach { iface: iface.to_owned(), source };
        if !tcx() {
            // Before TCX, classifiers hang off a clsact qdisc; it may exist already.
            let _ = tc::qdisc_add_clsact(iface);
            let options =
                NlOptions { priority: TC_PRIORITY, handle: TC_HANDLE, ..NlOptions::default() };
            let tc = self.tc(program);
            let id = match tc.attach_with_options(iface, hook, TcAttachOptions::Netlink(options)) {
                Ok(id) => id,
                // A previous agent's filter sits there: replace it in place.
                Err(_) => {
                    let link =
                        SchedClassifierLink::attached(iface, hook, TC_PRIORITY, TC_HANDLE, None)
                            .map_err(|e| attach_err(ProgramError::IOError(e)))?;
                    tc.attach_to_link(link).map_err(attach_err)?
                }
            };
            // Dropping the link would delete the filter, which must stay.
            std::mem::forget(tc.take_link(id).map_err(attach_err)?);
            return Ok(Attachment::Netlink { iface: iface.to_owned(), hook, program });
        }
        let direction = if hook == TcAttachType::Ingress { "in" } else { "out" };
        let pin = self.pins.link(&format!("tc-{direction}-{iface}"));
        if !self.replace(&pin, program)? {
            let tc = self.tc(program);
            let id = tc.attach(iface, hook).map_err(attach_err)?;
            let link = tc.take_link(id).map_err(attach_err)?;
            self.pin_link(link, &pin)?;
        }
        Ok(Attachment::Pinned(pin))
    }

    /// XDP (driver mode, falling back to generic) for DNAT of arriving
    /// packets, TC ingress to send the rejects XDP hands over, TC egress
    /// for reverse NAT of replies leaving the node.
    pub fn attach_node_iface(&mut self, iface: &str) -> Result<XdpAttachMode, DataplaneError> {
        let attach_err = |source| DataplaneError::Attach { iface: iface.to_owned(), source };
        let pin = self.pins.link(&format!("xdp-{iface}"));
        let mode = if self.replace(&pin, program_names::XDP_NODE)? {
            XdpAttachMode::Replaced
        } else {
            let (id, mode) = match self.xdp().attach(iface, XdpMode::Driver) {
                Ok(id) => (id, XdpAttachMode::Driver),
                Err(driver_err) => {
                    tracing::warn!(%iface, error = %driver_err, "native XDP unavailable, using generic mode");
                    let id = self.xdp().attach(iface, XdpMode::Skb).map_err(attach_err)?;
                    (id, XdpAttachMode::Generic)
                }
            };
            let link = self.xdp().take_link(id).map_err(attach_err)?;
            self.pin_link(link, &pin)?;
            mode
        };
        if !Path::new(&format!("/sys/class/net/{iface}/device")).exists() {
            // Local senders over veth/tap hand over CHECKSUM_PARTIAL packets,
            // which XDP cannot tell apart from complete ones.
            tracing::warn!(
                %iface,
                "virtual interface: XDP rewrites assume complete L4 checksums, as NICs deliver; \
                 disable TX checksum offload on its peer"
            );
        }
        self.attach_tc(iface, program_names::TC_NODE, TcAttachType::Ingress)?;
        self.attach_tc(iface, program_names::TC_REVERSE_NAT, TcAttachType::Egress)?;
        Ok(mode)
    }

    pub fn pod_ifaces(&self) -> impl Iterator<Item = (u32, &str)> {
        self.pod_tc.iter().map(|(index, (name, _))| (*index, name.as_str()))
    }

    /// TC ingress (DNAT of pod clients) and egress (reverse NAT of replies
    /// to pods) on a pod-facing interface.
    pub fn attach_pod_iface(&mut self, index: u32, name: &str) -> Result<(), DataplaneError> {
        let ingress = self.attach_tc(name, program_names::TC_POD, TcAttachType::Ingress)?;
        let egress = match self.attach_tc(name, program_names::TC_REVERSE_NAT, TcAttachType::Egress)
        {
            Ok(link) => link,
            Err(err) => {
                ingress.remove();
                return Err(err);
            }
        };
        self.pod_tc.insert(index, (name.to_owned(), vec![ingress, egress]));
        Ok(())
    }

    /// Detaches from a pod-facing interface, which may already be gone.
    pub fn detach_pod_iface(&mut self, index: u32) {
        if let Some((_, attachments)) = self.pod_tc.remove(&index) {
            for attachment in attachments {
                if let Attachment::Pinned(path) = &attachment {
                    self.claimed.remove(path);
                }
                attachment.remove();
            }
        }
    }
}

/// `forwarder cleanup`: removes every attachment and pin of the node whose
/// pins are in `pins`, in the current network namespace. Returns how many
/// pins went.
pub fn cleanup(pins: &PinDir) -> std::io::Result<usize> {
    if !tcx() {
        // Netlink filters have no pins: find ours by program name.
        let links = std::fs::read_dir("/sys/class/net")?;
        for iface in links.flatten().map(|e| e.file_name().to_string_lossy().into_owned()) {
            for (hook, program) in [
                (TcAttachType::Ingress, program_names::TC_POD),
                (TcAttachType::Ingress, program_names::TC_NODE),
                (TcAttachType::Egress, program_names::TC_REVERSE_NAT),
            ] {
                let _ = tc::qdisc_detach_program(&iface, hook, program);
            }
        }
    }
    pins.remove_all()
}
