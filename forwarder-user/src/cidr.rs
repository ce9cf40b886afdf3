//! IPv4 CIDRs as users write them in flags.
use std::{fmt, net::Ipv4Addr, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an IPv4 CIDR (a.b.c.d/n)")]
pub struct CidrError(String);

impl Cidr {
    fn mask(self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Accepts surrounding spaces and a bare address (a /32).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let text = s.trim();
        let (addr, prefix) = text.split_once('/').unwrap_or((text, "32"));
        let addr: Ipv4Addr = addr.trim().parse().map_err(|_| err())?;
        let prefix: u8 = prefix.trim().parse().map_err(|_| err())?;
        if prefix > 32 {
            return Err(err());
        }
        Ok(Self { addr, prefix })
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
        for bad in ["10.0.0.0/33", "10.0.0/8", "fd00::/8", "x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
