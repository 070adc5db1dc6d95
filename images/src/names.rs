//! What counts as a valid name, path or value in a spec and in a manifest. Both are
//! checked with the same rules: a spec when it is built, a manifest again whenever an
//! image is read (a hand-made image with correct digests is still untrusted input).

/// Longest name (image, service, volume, secret, boot step).
pub const MAX_NAME: usize = 64;
/// Longest guest path.
pub const MAX_GUEST_PATH: usize = 4095;
/// Longest name of one directory entry in a guest path (Linux's NAME_MAX).
pub const MAX_GUEST_NAME: usize = 255;
/// Smallest and largest guest memory, MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 32..=65536;
/// vCPUs a guest may have.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=32;
/// Smallest and largest volume, MiB (8 MiB to 1 TiB).
pub const VOLUME_MIB: std::ops::RangeInclusive<u32> = 8..=1 << 20;
/// Longest stop timeout, seconds.
pub const MAX_STOP_TIMEOUT: u32 = 3600;
/// Longest kernel command line hostd accepts from a spec or `--cmdline`, bytes (the
/// runners add their own arguments; the whole must fit the kernel's 2048 bytes).
pub const MAX_CMDLINE: usize = 2048;

/// 1-64 ASCII letters, digits, `-`, `_` and any of `extra`.
pub fn is_name(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c))
}

/// A volume, service or boot step name: letters, digits, `-`, `_`, not starting with
/// `-` (so it can never be read as an option).
pub fn is_plain_name(s: &str) -> bool {
    is_name(s, &[]) && !s.starts_with('-')
}

/// An image, host or secret name: as [`is_plain_name`], plus `.` inside (never `.` or
/// `..`, never leading).
pub fn is_dotted_name(s: &str) -> bool {
    is_name(s, &['.']) && !s.starts_with(['-', '.'])
}

/// What [`is_guest_path`] accepts, for messages: "`/x` must be {GUEST_PATH}".
pub const GUEST_PATH: &str =
    "an absolute path without `.`, `..` or empty components, each name at most 255 bytes";

/// Whether `p` is an absolute, normalised guest path (no `.`/`..`/empty components)
/// that Linux takes (names of at most 255 bytes, at most 4095 bytes in all).
pub fn is_guest_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= MAX_GUEST_PATH
        && !p.contains('\0')
        && (p == "/"
            || p[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= MAX_GUEST_NAME))
}

/// A Debian package name (Debian Policy 5.6.1): lower-case letters, digits, `+`, `-`,
/// `.`, at least two characters, starting with a letter or digit.
pub fn is_debian_package(s: &str) -> bool {
    s.len() >= 2
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// A Debian version (Debian Policy 5.6.12): `[epoch:]upstream[-revision]`, starting with
/// a digit, of letters, digits and `.+~-:`.
pub fn is_debian_version(s: &str) -> bool {
    let upstream = match s.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() || !epoch.chars().all(|c| c.is_ascii_digit()) {
                return false;
            }
            rest
        }
        None => s,
    };
    !upstream.is_empty()
        && s.len() <= 128
        && upstream.starts_with(|c: char| c.is_ascii_digit())
        && upstream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-:".contains(c))
}

/// A user or group name for /etc/passwd and /etc/group: 1-32 lower-case letters,
/// digits, `_` and `-`, starting with a letter or `_` (what `adduser` accepts by
/// default), so it can never hold the files' `:` or newline separators.
pub fn is_account_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// An environment variable name: letters, digits and `_`, not starting with a digit.
pub fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// At most this many DNS servers (glibc reads three `nameserver` lines).
pub const MAX_DNS: usize = 3;
/// At most this many search domains (glibc's limit).
pub const MAX_SEARCH: usize = 6;

/// Checks DNS servers (IP addresses) and search domains (host names: letters, digits,
/// `-`, `.`, at most 253 bytes). The error names the key (`dns` or `search`).
pub fn check_resolver(dns: &[String], search: &[String]) -> Result<(), (&'static str, String)> {
    if dns.len() > MAX_DNS {
        return Err(("dns", format!("at most {MAX_DNS} servers")));
    }
    if let Some(d) = dns.iter().find(|d| d.parse::<std::net::IpAddr>().is_err()) {
        return Err((
            "dns",
            format!("`{d}` is not an IP address (e.g. \"10.0.2.1\")"),
        ));
    }
    if search.len() > MAX_SEARCH {
        return Err(("search", format!("at most {MAX_SEARCH} domains")));
    }
    let is_domain = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    if let Some(s) = search.iter().find(|s| !is_domain(s)) {
        return Err((
            "search",
            format!("`{s}` is not a domain name (letters, digits, `-`, `.`)"),
        ));
    }
    Ok(())
}

/// A kernel command line from a spec or a manifest: printable ASCII, at most
/// [`MAX_CMDLINE`] bytes.
pub fn check_cmdline(s: &str) -> Result<(), String> {
    if s.len() > MAX_CMDLINE {
        return Err(format!(
            "{} bytes; at most {MAX_CMDLINE} fit the kernel's command line",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "contains {c:?}; only printable ASCII and spaces are allowed"
        ));
    }
    Ok(())
}

/// A uid or gid a spec may give: 0 to 2^32-2 ((uid_t)-1 means "no change" to the
/// kernel and is refused).
pub fn parse_id(s: &str) -> Option<u32> {
    // Digits only: `u32::from_str` also takes a leading `+` ("+1:1" was an owner).
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|id| *id != u32::MAX)
}

/// Parses `uid:gid`.
pub fn parse_owner(s: &str) -> Option<(u32, u32)> {
    let (u, g) = s.split_once(':')?;
    Some((parse_id(u)?, parse_id(g)?))
}

/// A user to run as: `root`, a user name (looked up in the guest's /etc/passwd), or
/// `uid[:gid]`.
pub fn is_user(s: &str) -> bool {
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        return match s.split_once(':') {
            Some(_) => parse_owner(s).is_some(),
            None => parse_id(s).is_some(),
        };
    }
    s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c))
}

/// A program to start: an absolute path first, arguments and environment values
/// without NUL bytes, valid variable names, a valid user.
pub fn check_program(
    argv: &[String],
    env: &std::collections::BTreeMap<String, String>,
    user: &str,
) -> Result<(), String> {
    match argv.first() {
        Some(p) if is_guest_path(p) => {}
        Some(p) => return Err(format!("program `{p}` must be {GUEST_PATH}")),
        None => return Err("no program".into()),
    }
    if argv.len() > 4096 || argv.iter().any(|a| a.contains('\0') || a.len() > 65536) {
        return Err("arguments: at most 4096, each under 64 KiB, without NUL bytes".into());
    }
    if let Some((k, _)) = env
        .iter()
        .find(|(k, v)| !is_env_name(k) || v.contains('\0'))
    {
        return Err(format!(
            "env `{k}`: names are letters, digits and `_`; values hold no NUL byte"
        ));
    }
    if !is_user(user) {
        return Err(format!(
            "user `{user}` is not `root`, a user name or `uid[:gid]`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        assert!(is_guest_path("/a/b"));
        assert!(!is_guest_path("a/b"));
        assert!(!is_guest_path("/a/../b"));
        assert!(!is_guest_path("/a//b"));
        assert!(!is_guest_path("/a/"));
        assert!(!is_guest_path("/a\0"));
        assert!(is_guest_path(&format!("/{}", "n".repeat(255))));
        assert!(!is_guest_path(&format!("/a/{}/b", "n".repeat(256))));
    }

    #[test]
    fn names_cannot_be_options_or_paths() {
        assert!(is_plain_name("data"));
        assert!(!is_plain_name("-x"));
        assert!(!is_plain_name("../x"));
        assert!(!is_plain_name("/x"));
        assert!(!is_plain_name(""));
        assert!(!is_plain_name(&"a".repeat(65)));
        assert!(is_dotted_name("db.password"));
        assert!(!is_dotted_name(".."));
        assert!(!is_dotted_name(".hidden"));
    }

    #[test]
    fn debian_names_and_versions() {
        for ok in ["busybox-static", "libc6", "g++", "python3.11", "0ad"] {
            assert!(is_debian_package(ok), "{ok}");
        }
        for bad in [
            "--config-file",
            "-o",
            "a",
            "Busybox",
            "x y",
            "pkg/bookworm",
            "p;rm",
        ] {
            assert!(!is_debian_package(bad), "{bad}");
        }
        for ok in ["1.36.1-9", "1:2.38-4", "2.36.1-8+deb12u1", "1.0~rc1"] {
            assert!(is_debian_version(ok), "{ok}");
        }
        for bad in ["", "-1", "a1.0", ":1", "1.0 x", "1.0/x", "x:1"] {
            assert!(!is_debian_version(bad), "{bad}");
        }
    }

    #[test]
    fn ids_users_and_command_lines() {
        assert_eq!(parse_owner("1000:1000"), Some((1000, 1000)));
        assert_eq!(parse_owner("4294967295:0"), None);
        assert_eq!(parse_owner("0:-1"), None);
        assert!(is_user("root") && is_user("www-data") && is_user("1000:1000"));
        assert!(!is_user("4294967295") && !is_user("Root") && !is_user("a b"));
        assert!(check_cmdline("quiet loglevel=3").is_ok());
        assert!(check_cmdline(&"x".repeat(MAX_CMDLINE + 1)).is_err());
        assert!(check_cmdline("a\nb").is_err());
    }
}
