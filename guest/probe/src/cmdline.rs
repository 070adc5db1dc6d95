//! Command-line parsing: `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, `probe.exit=N`
//! `probe.cpuid=LEAF[.SUBLEAF]` and `probe.rdmsr=MSR`.
//!
//! The syntax follows Linux (drivers/virtio/virtio_mmio.c): size and base are
//! `memparse` numbers (decimal, `0x` hex or leading-`0` octal, optional K/M/G/T/P/E
//! suffix), irq and the optional platform-device id are decimal.

/// One `virtio_mmio.device=` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioArg {
    /// Size of the register window in bytes.
    pub size: u64,
    /// Physical base address of the register window.
    pub base: u64,
    /// Interrupt line (unused: the probe polls).
    pub irq: u32,
}

const VIRTIO_MMIO_PREFIX: &[u8] = b"virtio_mmio.device=";
const EXIT_PREFIX: &[u8] = b"probe.exit=";
const CPUID_PREFIX: &[u8] = b"probe.cpuid=";
const RDMSR_PREFIX: &[u8] = b"probe.rdmsr=";

/// Splits a command line into arguments at ASCII whitespace.
pub fn args(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|a| !a.is_empty())
}

/// Returns the value of `arg` after `prefix`, if `arg` starts with it.
fn value_of<'a>(arg: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    arg.strip_prefix(prefix)
}

/// `Some(Ok(..))` for a well-formed `virtio_mmio.device=`, `Some(Err(()))` for a
/// malformed one, `None` for any other argument.
pub fn virtio_mmio(arg: &[u8]) -> Option<Result<VirtioMmioArg, ()>> {
    let value = value_of(arg, VIRTIO_MMIO_PREFIX)?;
    Some(parse_virtio_mmio(value).ok_or(()))
}

fn parse_virtio_mmio(value: &[u8]) -> Option<VirtioMmioArg> {
    let (size, rest) = memparse(value)?;
    let rest = rest.strip_prefix(b"@")?;
    let (base, rest) = memparse(rest)?;
    let rest = rest.strip_prefix(b":")?;
    let (irq, rest) = number(rest, 10)?;
    // Optional ":<id>" (platform device id); anything else is malformed.
    let rest = match rest.strip_prefix(b":") {
        Some(id) => number(id, 10)?.1,
        None => rest,
    };
    if !rest.is_empty() || size == 0 {
        return None;
    }
    Some(VirtioMmioArg {
        size,
        base,
        irq: u32::try_from(irq).ok()?,
    })
}

/// The exit code from `probe.exit=N`: `None` for other arguments, `Some(Err(()))`
/// when the value is not a decimal number in 0..=255.
pub fn exit_code(arg: &[u8]) -> Option<Result<u8, ()>> {
    let value = value_of(arg, EXIT_PREFIX)?;
    let parsed = match number(value, 10) {
        Some((n, [])) => u8::try_from(n).map_err(|_| ()),
        _ => Err(()),
    };
    Some(parsed)
}

/// The leaf and subleaf from `probe.cpuid=LEAF[.SUBLEAF]` (each a `0x` hex or decimal
/// u32; subleaf 0 when absent): `None` for other arguments, `Some(Err(()))` when malformed.
pub fn cpuid_leaf(arg: &[u8]) -> Option<Result<(u32, u32), ()>> {
    let value = value_of(arg, CPUID_PREFIX)?;
    let parsed = (|| {
        let (leaf, rest) = u32_at(value)?;
        let (sub, rest) = match rest.strip_prefix(b".") {
            Some(s) => u32_at(s)?,
            None => (0, rest),
        };
        rest.is_empty().then_some((leaf, sub))
    })();
    Some(parsed.ok_or(()))
}

/// The MSR index from `probe.rdmsr=MSR` (`0x` hex or decimal u32): `None` for other
/// arguments, `Some(Err(()))` when malformed.
pub fn rdmsr_index(arg: &[u8]) -> Option<Result<u32, ()>> {
    let value = value_of(arg, RDMSR_PREFIX)?;
    Some(match u32_at(value) {
        Some((msr, [])) => Ok(msr),
        _ => Err(()),
    })
}

/// A u32 at the start of `s`, `0x` hex or decimal; returns it and the rest.
fn u32_at(s: &[u8]) -> Option<(u32, &[u8])> {
    let (n, rest) = match s.strip_prefix(b"0x").or_else(|| s.strip_prefix(b"0X")) {
        Some(hex) => number(hex, 16)?,
        None => number(s, 10)?,
    };
    Some((u32::try_from(n).ok()?, rest))
}

/// Parses a number in `radix` (10, 16 or 8) at the start of `s`; returns it and the rest.
/// `None` if there is no digit or the value overflows u64.
fn number(s: &[u8], radix: u64) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    let mut used = 0;
    for &c in s {
        let digit = match c {
            b'0'..=b'9' => u64::from(c - b'0'),
            b'a'..=b'f' => u64::from(c - b'a') + 10,
            b'A'..=b'F' => u64::from(c - b'A') + 10,
            _ => break,
        };
        if digit >= radix {
            break;
        }
        value = value.checked_mul(radix)?.checked_add(digit)?;
        used += 1;
    }
    if used == 0 {
        return None;
    }
    Some((value, &s[used..]))
}

/// Linux `memparse`: a number with automatic base and an optional size suffix.
fn memparse(s: &[u8]) -> Option<(u64, &[u8])> {
    let (value, rest) = if let Some(hex) = s.strip_prefix(b"0x").or_else(|| s.strip_prefix(b"0X")) {
        number(hex, 16)?
    } else if s.len() > 1 && s[0] == b'0' && s[1].is_ascii_digit() {
        number(&s[1..], 8)?
    } else {
        number(s, 10)?
    };
    let shift = match rest.first() {
        Some(b'k' | b'K') => 10,
        Some(b'm' | b'M') => 20,
        Some(b'g' | b'G') => 30,
        Some(b't' | b'T') => 40,
        Some(b'p' | b'P') => 50,
        Some(b'e' | b'E') => 60,
        _ => return Some((value, rest)),
    };
    let scaled = value.checked_shl(shift).filter(|v| v >> shift == value)?;
    Some((scaled, &rest[1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> Option<Result<VirtioMmioArg, ()>> {
        virtio_mmio(s.as_bytes())
    }

    #[test]
    fn virtio_mmio_forms() {
        let want = |size, base, irq| Some(Ok(VirtioMmioArg { size, base, irq }));
        assert_eq!(
            dev("virtio_mmio.device=512@0xfeb00000:10"),
            want(512, 0xfeb0_0000, 10)
        );
        assert_eq!(
            dev("virtio_mmio.device=4K@0xd0000000:5"),
            want(4096, 0xd000_0000, 5)
        );
        assert_eq!(
            dev("virtio_mmio.device=0x1000@0xd0001000:6:2"),
            want(4096, 0xd000_1000, 6)
        );
        assert_eq!(dev("virtio_mmio.device=1k@4096:7"), want(1024, 4096, 7));
        assert_eq!(dev("console=ttyS0"), None);
        assert_eq!(dev("virtio_mmio.device="), Some(Err(())));
        assert_eq!(dev("virtio_mmio.device=4K@0xd0000000"), Some(Err(())));
        assert_eq!(dev("virtio_mmio.device=4K@0xd0000000:x"), Some(Err(())));
        assert_eq!(dev("virtio_mmio.device=4K@0xd0000000:5junk"), Some(Err(())));
        assert_eq!(dev("virtio_mmio.device=0@0xd0000000:5"), Some(Err(())));
        assert_eq!(dev("virtio_mmio.device=99999999999E@0x1:5"), Some(Err(())));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(b"probe.exit=7"), Some(Ok(7)));
        assert_eq!(exit_code(b"probe.exit=0"), Some(Ok(0)));
        assert_eq!(exit_code(b"probe.exit=255"), Some(Ok(255)));
        assert_eq!(exit_code(b"probe.exit=256"), Some(Err(())));
        assert_eq!(exit_code(b"probe.exit="), Some(Err(())));
        assert_eq!(exit_code(b"probe.exit=1x"), Some(Err(())));
        assert_eq!(exit_code(b"probe.exitx=1"), None);
    }

    #[test]
    fn cpuid_leaves() {
        assert_eq!(
            cpuid_leaf(b"probe.cpuid=0x40000000"),
            Some(Ok((0x4000_0000, 0)))
        );
        assert_eq!(cpuid_leaf(b"probe.cpuid=7.0"), Some(Ok((7, 0))));
        assert_eq!(cpuid_leaf(b"probe.cpuid=0xd.0x1"), Some(Ok((0xd, 1))));
        assert_eq!(cpuid_leaf(b"probe.cpuid=1"), Some(Ok((1, 0))));
        assert_eq!(cpuid_leaf(b"probe.cpuid="), Some(Err(())));
        assert_eq!(cpuid_leaf(b"probe.cpuid=0x100000000"), Some(Err(())));
        assert_eq!(cpuid_leaf(b"probe.cpuid=1.2.3"), Some(Err(())));
        assert_eq!(cpuid_leaf(b"probe.cpuid=1x"), Some(Err(())));
        assert_eq!(cpuid_leaf(b"probe.exit=1"), None);
        assert_eq!(
            rdmsr_index(b"probe.rdmsr=0x4b564d00"),
            Some(Ok(0x4b56_4d00))
        );
        assert_eq!(rdmsr_index(b"probe.rdmsr=16"), Some(Ok(16)));
        assert_eq!(rdmsr_index(b"probe.rdmsr=0x"), Some(Err(())));
        assert_eq!(rdmsr_index(b"probe.rdmsr=1.0"), Some(Err(())));
    }

    #[test]
    fn splitting() {
        let v: Vec<&[u8]> = args(b"  a b\tc\n").collect();
        assert_eq!(v, vec![&b"a"[..], b"b", b"c"]);
    }
}
