//! IPv4 CIDRs as users write them in flags.
use std::{fmt, net::Ipv4Addr, str::FromStr};

/// A network, normalised: host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an IPv4 CIDR (a.b.c.d/n)")]
pub struct CidrError(String);

impl Cidr {
    /// `addr/prefix` with host bits cleared; `None` past /32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        let cidr = Self { addr, prefix: (prefix <= 32).then_some(prefix)? };
        Some(Self { addr: Ipv4Addr::from(u32::from(addr) & cidr.mask()), prefix })
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    pub const fn network(self) -> Ipv4Addr {
        self.addr
    }

    pub const fn prefix(self) -> u8 {
        self.prefix
    }
}

/// Parses a decimal number that may carry leading zeros, as the sloppy
/// parsers Kubernetes uses for CIDRs accept ("010" is ten).
fn sloppy<T: FromStr>(s: &str) -> Option<T> {
    let digits = s.trim_start_matches('0');
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    (if digits.is_empty() { "0" } else { digits }).parse().ok()
}

/// An IPv4 address as Kubernetes reads one (`netutils.ParseIPSloppy`, as
/// kube-proxy does): leading zeros are decimal, so `192.168.099.011` is
/// 192.168.99.11. The API validates addresses strictly today, but objects
/// created before that still hold such spellings; Rust's parser refuses
/// them, and a strict reading would skip the address.
pub fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    let octets: Vec<u8> = s.split('.').map(sloppy).collect::<Option<_>>()?;
    let [a, b, c, d] = octets[..] else { return None };
    Some(Ipv4Addr::new(a, b, c, d))
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Accepts what users write: surrounding spaces, leading zeros
    /// (decimal), host bits (cleared), a bare address (a /32).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let text = s.trim();
        let (addr, prefix) = text.split_once('/').unwrap_or((text, "32"));
        let addr = parse_ipv4(addr.trim()).ok_or_else(err)?;
        let prefix: u8 = sloppy(prefix.trim()).filter(|p| *p <= 32).ok_or_else(err)?;
        let cidr = Self { addr, prefix };
        Ok(Self { addr: Ipv4Addr::from(u32::from(cidr.addr) & cidr.mask()), prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_contain() {
        let c: Cidr = " 192.168.0.0/16 ".parse().unwrap();
        assert!(c.contains("192.168.10.1".parse().unwrap()));
        assert!(!c.contains("192.169.0.1".parse().unwrap()));
        let host: Cidr = "10.0.0.1".parse().unwrap();
        assert_eq!(host.to_string(), "10.0.0.1/32");
        assert!(host.contains("10.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in
            ["10.0.0.0/33", "10.0.0/8", "fd00::/8", "x", "10.0.0.256/8", "10.0.0.0/", "-1.0.0.0/8"]
        {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_with_leading_zeros_are_decimal() {
        for (written, read) in [
            ("192.168.099.011", Some("192.168.99.11")),
            ("010.096.000.001", Some("10.96.0.1")),
            ("0000010.0.0.1", Some("10.0.0.1")),
            ("10.0.0.1", Some("10.0.0.1")),
            ("10.0.0.0256", None),
            ("10.0.0", None),
            ("10.0.0.1.2", None),
            ("10.0..1", None),
            (" 10.0.0.1", None),
            ("0x0a.0.0.1", None),
            ("+1.0.0.1", None),
            ("2001:db8::1", None),
        ] {
            let read = read.map(|r| r.parse::<Ipv4Addr>().unwrap());
            assert_eq!(parse_ipv4(written), read, "{written:?}");
        }
    }

    #[test]
    fn odd_spellings_are_normalised() {
        for (written, normal) in [
            (" 192.168.010.000/024 ", "192.168.10.0/24"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("010.0.0.1", "10.0.0.1/32"),
            ("0.0.0.0/00", "0.0.0.0/0"),
        ] {
            assert_eq!(written.parse::<Cidr>().unwrap().to_string(), normal, "{written:?}");
        }
    }
}
