//! The printable capability value:
//!
//! ```text
//! hostd-cap:1.SERVICE@LOCATION.KEYS.CHECK
//! ```
//!
//! - `1`: the format version.
//! - `SERVICE`: the service's name on the host that minted it (letters, digits, `-`, `_`).
//! - `LOCATION`: where the service listens, `HOST:PORT` (a hint: the caller may be
//!   told another address; the keys are what make it the service).
//! - `KEYS`: 128 hex digits, the service's X25519 static public key (32 bytes)
//!   followed by this capability's own pre-shared key (32 bytes).
//! - `CHECK`: 8 hex digits, the first 4 bytes of the SHA-256 of everything before
//!   the last `.`, so a value damaged by copying is refused at once.
//!
//! The psk is the secret part. `Display` and `Debug` show the service, the
//! location and the capability's id (a hash of the psk), never the keys; the
//! whole value comes out only through [`Capability::reveal`].

use sha2::{Digest, Sha256};

use crate::Error;

/// What every value starts with.
pub const PREFIX: &str = "hostd-cap:";
/// The format version this code writes and reads.
pub const VERSION: &str = "1";
/// Length of an X25519 public key and of a psk.
pub const KEY_LEN: usize = 32;
/// Longest service name.
pub const MAX_NAME: usize = 64;
/// Longest location hint.
pub const MAX_LOCATION: usize = 255;

/// One capability: the right to call one service.
#[derive(Clone, PartialEq, Eq)]
pub struct Capability {
    /// The service's name on its host.
    pub service: String,
    /// Where it listens (`HOST:PORT`).
    pub location: String,
    /// The service's static public key.
    pub public_key: [u8; KEY_LEN],
    /// This capability's pre-shared key.
    pub psk: [u8; KEY_LEN],
}

/// The id of the capability holding `psk`: 16 hex digits of a hash of it.
/// Safe to show and log; it names the capability without giving it away.
pub fn id_of(psk: &[u8; KEY_LEN]) -> String {
    let mut h = Sha256::new();
    h.update(b"hostd-cap id\0");
    h.update(psk);
    hex::encode(&h.finalize()[..8])
}

/// The 8-byte form of [`id_of`] sent in the handshake.
pub fn wire_id(psk: &[u8; KEY_LEN]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(b"hostd-cap id\0");
    h.update(psk);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize()[..8]);
    out
}

/// Checks a service (or held capability) name.
pub fn check_name(name: &str) -> Result<(), Error> {
    let bad = |why| {
        Err(Error::Name {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return bad("must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("may hold only letters, digits, '-' and '_'");
    }
    Ok(())
}

fn check_location(location: &str) -> Result<(), Error> {
    if location.is_empty() || location.len() > MAX_LOCATION {
        return Err(Error::Format("the location must be 1 to 255 characters"));
    }
    if !location.bytes().all(|b| b.is_ascii_graphic() && b != b'@') {
        return Err(Error::Format(
            "the location may hold only printable ASCII without '@' or spaces",
        ));
    }
    // HOST:PORT, as a holder connects to it: a host name, an IPv4 address or a bracketed
    // IPv6 address, and a port 1-65535.
    let Some((host, port)) = location.rsplit_once(':') else {
        return Err(Error::Format("the location is HOST:PORT (no port given)"));
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)) {
        return Err(Error::Format("the location's port is not a number 1-65535"));
    }
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        }
    };
    if !host_ok {
        return Err(Error::Format(
            "the location's host is not a host name, an IPv4 address or a bracketed IPv6 address",
        ));
    }
    Ok(())
}

fn checksum(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..4])
}

impl Capability {
    /// This capability's id (see [`id_of`]).
    pub fn id(&self) -> String {
        id_of(&self.psk)
    }

    /// The whole value, keys included: for the person who asked for it, never for logs.
    pub fn reveal(&self) -> String {
        let body = format!(
            "{PREFIX}{VERSION}.{}@{}.{}{}",
            self.service,
            self.location,
            hex::encode(self.public_key),
            hex::encode(self.psk)
        );
        let check = checksum(&body);
        format!("{body}.{check}")
    }

    /// Reads a value written by [`Capability::reveal`] (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Capability, Error> {
        let text = text.trim();
        if text.len() > 1024 {
            return Err(Error::Format("longer than any capability"));
        }
        let rest = text
            .strip_prefix(PREFIX)
            .ok_or(Error::Format("it does not start with hostd-cap:"))?;
        let (body, check) = text.rsplit_once('.').ok_or(Error::Format("no checksum"))?;
        if checksum(body) != check {
            return Err(Error::Format(
                "the checksum does not match (damaged or cut when copied?)",
            ));
        }
        let rest = &rest[..rest.len() - check.len() - 1];
        let (head, keys) = rest.rsplit_once('.').ok_or(Error::Format("no keys"))?;
        let (version, named) = head.split_once('.').ok_or(Error::Format("no version"))?;
        if version != VERSION {
            return Err(Error::Format(
                "unknown version (made by a newer hostd?); this hostd reads version 1",
            ));
        }
        let (service, location) = named
            .split_once('@')
            .ok_or(Error::Format("no SERVICE@LOCATION"))?;
        check_name(service).map_err(|_| Error::Format("bad service name"))?;
        check_location(location)?;
        if keys.len() != 4 * KEY_LEN {
            return Err(Error::Format("the keys must be 128 hex digits"));
        }
        let raw = hex::decode(keys).map_err(|_| Error::Format("the keys are not hex"))?;
        let mut public_key = [0u8; KEY_LEN];
        let mut psk = [0u8; KEY_LEN];
        public_key.copy_from_slice(&raw[..KEY_LEN]);
        psk.copy_from_slice(&raw[KEY_LEN..]);
        Ok(Capability {
            service: service.to_owned(),
            location: location.to_owned(),
            public_key,
            psk,
        })
    }

    /// A new capability for a service, with a fresh random psk.
    pub fn mint(
        service: &str,
        location: &str,
        public_key: [u8; KEY_LEN],
    ) -> Result<Capability, Error> {
        check_name(service)?;
        check_location(location)?;
        let mut psk = [0u8; KEY_LEN];
        getrandom::getrandom(&mut psk).map_err(Error::Random)?;
        Ok(Capability {
            service: service.to_owned(),
            location: location.to_owned(),
            public_key,
            psk,
        })
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PREFIX}{VERSION}.{}@{} (id {}, keys redacted)",
            self.service,
            self.location,
            self.id()
        )
    }
}

impl std::fmt::Debug for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Capability {
        Capability {
            service: "echo".into(),
            location: "10.0.0.1:7070".into(),
            public_key: [7; 32],
            psk: [9; 32],
        }
    }

    #[test]
    fn round_trips() {
        let c = sample();
        let text = c.reveal();
        assert!(text.starts_with("hostd-cap:1.echo@10.0.0.1:7070."));
        assert_eq!(Capability::parse(&format!(" {text}\n")).expect("parses"), c);
    }

    #[test]
    fn display_and_debug_redact_the_keys() {
        let c = sample();
        let psk_hex = hex::encode(c.psk);
        for shown in [c.to_string(), format!("{c:?}")] {
            assert!(!shown.contains(&psk_hex), "{shown}");
            assert!(!shown.contains(&hex::encode(c.public_key)), "{shown}");
            assert!(shown.contains(&c.id()), "{shown}");
        }
    }

    #[test]
    fn refuses_damaged_values() {
        let text = sample().reveal();
        // One changed digit in the psk: the checksum catches it.
        let pos = text.len() - 20;
        let mut damaged = text.clone().into_bytes();
        damaged[pos] = if damaged[pos] == b'0' { b'1' } else { b'0' };
        let damaged = String::from_utf8(damaged).expect("ascii");
        assert!(Capability::parse(&damaged).is_err());
        assert!(Capability::parse(&text[..text.len() - 1]).is_err());
        assert!(Capability::parse(&text.replace("hostd-cap:1.", "hostd-cap:2.")).is_err());
        assert!(Capability::parse("hostd-cap:").is_err());
        assert!(Capability::parse("").is_err());
    }

    #[test]
    fn mints_distinct_psks() {
        let a = Capability::mint("svc", "127.0.0.1:1", [1; 32]).expect("mint");
        let b = Capability::mint("svc", "127.0.0.1:1", [1; 32]).expect("mint");
        assert_ne!(a.psk, b.psk);
        assert_ne!(a.id(), b.id());
        assert!(Capability::mint("bad name", "x:1", [1; 32]).is_err());
    }

    #[test]
    fn a_location_is_host_and_port() {
        for good in [
            "127.0.0.1:7070",
            "svc.example:443",
            "localhost:1",
            "[::1]:7443",
            "[fe80::1]:65535",
            "a-b.c:80",
        ] {
            assert!(check_location(good).is_ok(), "{good}");
            let cap = Capability::mint("svc", good, [1; 32]).expect("mint");
            assert_eq!(
                Capability::parse(&cap.reveal()).expect("parse").location,
                good
            );
        }
        for bad in [
            "nonsense",
            "127.0.0.1:99999",
            "127.0.0.1:0",
            "127.0.0.1:",
            ":80",
            "host:+80",
            "::1:80",
            "[::1:80",
            "[nothex]:80",
            "a..b:80",
            "-a:80",
            "a_b:80",
            "h@x:80",
            "a b:80",
        ] {
            assert!(check_location(bad).is_err(), "{bad}");
        }
    }
}
