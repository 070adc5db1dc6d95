//! Networking: the runner passes `hostd.ip=ADDR/PREFIX` (and optionally `hostd.gw=GW`)
//! on the kernel command line when it attaches a network device; guest init brings up
//! `lo`, gives `eth0` that address and adds the default route, with plain ioctls.

use std::net::Ipv4Addr;

use hostd_images::abi;
use hostd_images::manifest::NetworkInfo;
use hostd_images::names;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// eth0's address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
}

/// Parses `hostd.ip=` / `hostd.gw=` from a kernel command line.
pub fn parse(cmdline: &str) -> Result<Option<NetConfig>, String> {
    let mut ip = None;
    let mut gw = None;
    for arg in cmdline.split_whitespace() {
        if let Some(v) = arg.strip_prefix("hostd.ip=") {
            let (a, p) = v.split_once('/').unwrap_or((v, "24"));
            let addr: Ipv4Addr = a
                .parse()
                .map_err(|_| format!("hostd.ip: `{a}` is not an IPv4 address"))?;
            let prefix: u8 = p
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or(format!("hostd.ip: bad prefix `{p}`"))?;
            ip = Some((addr, prefix));
        } else if let Some(v) = arg.strip_prefix("hostd.gw=") {
            gw = Some(
                v.parse::<Ipv4Addr>()
                    .map_err(|_| format!("hostd.gw: `{v}` is not an IPv4 address"))?,
            );
        }
    }
    Ok(ip.map(|(addr, prefix)| NetConfig {
        addr,
        prefix,
        gateway: gw,
    }))
}

/// The resolver configuration (`/etc/resolv.conf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// DNS servers.
    pub dns: Vec<String>,
    /// Search domains.
    pub search: Vec<String>,
}

impl Resolver {
    /// resolv.conf's text.
    pub fn text(&self) -> String {
        let mut t = String::new();
        for d in &self.dns {
            t.push_str(&format!("nameserver {d}\n"));
        }
        if !self.search.is_empty() {
            t.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        t
    }

    /// One line for the console.
    pub fn summary(&self) -> String {
        let mut s = format!("dns {}", self.dns.join(","));
        if !self.search.is_empty() {
            s.push_str(&format!(" search {}", self.search.join(",")));
        }
        s
    }
}

/// The resolver configuration: `hostd.dns=`/`hostd.search=` from the command line
/// (`hostd run --net dns=`) where given, else the manifest's `network`. None when
/// neither names anything.
pub fn resolver(cmdline: &str, manifest: Option<&NetworkInfo>) -> Result<Option<Resolver>, String> {
    let list = |key: &str| -> Option<Vec<String>> {
        cmdline
            .split_whitespace()
            .rev()
            .find_map(|a| a.strip_prefix(key))
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
    };
    let dns = list(abi::CMDLINE_DNS)
        .or_else(|| manifest.map(|n| n.dns.clone()))
        .unwrap_or_default();
    let search = list(abi::CMDLINE_SEARCH)
        .or_else(|| manifest.map(|n| n.search.clone()))
        .unwrap_or_default();
    names::check_resolver(&dns, &search).map_err(|(k, m)| format!("hostd.{k}: {m}"))?;
    if dns.is_empty() && search.is_empty() {
        return Ok(None);
    }
    Ok(Some(Resolver { dns, search }))
}

/// Writes [`abi::RESOLV_CONF`] (the image's /etc/resolv.conf links to it).
pub fn write_resolv_conf(r: &Resolver) -> Result<(), String> {
    let path = std::path::Path::new(abi::RESOLV_CONF);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    std::fs::write(path, r.text()).map_err(|e| format!("write {}: {e}", abi::RESOLV_CONF))
}

/// The netmask for a prefix length.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    Ipv4Addr::from(bits)
}

/// Brings the loopback interface up (before the snapshot point: it is the same on every
/// run).
pub fn loopback_up() -> Result<(), String> {
    let sock = crate::sys::NetSocket::new().map_err(|e| format!("socket: {e}"))?;
    sock.up("lo").map_err(|e| format!("lo up: {e}"))
}

/// Configures `eth0` as given (nothing without a configuration).
pub fn configure(cfg: Option<&NetConfig>) -> Result<(), String> {
    let Some(cfg) = cfg else { return Ok(()) };
    let sock = crate::sys::NetSocket::new().map_err(|e| format!("socket: {e}"))?;
    sock.set_addr("eth0", cfg.addr, netmask(cfg.prefix))
        .map_err(|e| format!("eth0 address: {e}"))?;
    sock.up("eth0").map_err(|e| format!("eth0 up: {e}"))?;
    if let Some(gw) = cfg.gateway {
        sock.default_route(gw)
            .map_err(|e| format!("default route via {gw}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line() {
        assert_eq!(parse("console=ttyS0 quiet"), Ok(None));
        assert_eq!(
            parse("a hostd.ip=10.0.2.2/24 hostd.gw=10.0.2.1"),
            Ok(Some(NetConfig {
                addr: Ipv4Addr::new(10, 0, 2, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 1))
            }))
        );
        assert!(parse("hostd.ip=10.0.2/24").is_err());
        assert!(parse("hostd.ip=10.0.2.2/33").is_err());
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn the_command_line_overrides_the_manifest_resolver() {
        let m = NetworkInfo {
            dns: vec!["10.0.2.3".into()],
            search: vec!["example.org".into()],
        };
        assert_eq!(resolver("quiet", None), Ok(None));
        let r = resolver("quiet", Some(&m)).ok().flatten();
        assert_eq!(
            r.map(|r| r.text()),
            Some("nameserver 10.0.2.3\nsearch example.org\n".into())
        );
        let r = resolver("hostd.dns=10.0.2.1,fd00::1 x", Some(&m))
            .ok()
            .flatten();
        assert_eq!(
            r.map(|r| r.text()),
            Some("nameserver 10.0.2.1\nnameserver fd00::1\nsearch example.org\n".into())
        );
        assert!(resolver("hostd.dns=not-an-ip", None).is_err());
        assert!(resolver("hostd.search=bad..name hostd.dns=1.1.1.1", None).is_err());
    }
}
