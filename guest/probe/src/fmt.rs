//! Number formatting without `core::fmt` (keeps the image small and the code plain).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Formats `value` in decimal into the end of `buf`; returns the digits.
pub fn dec(mut value: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Formats `value` in lowercase hex, no leading zeros, into the end of `buf`.
pub fn hex(mut value: u64, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(value & 0xf) as usize];
        value >>= 4;
        if value == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Two lowercase hex digits.
pub fn hex_byte(b: u8) -> [u8; 2] {
    [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let mut d = [0u8; 20];
        assert_eq!(dec(0, &mut d), b"0");
        assert_eq!(dec(u64::MAX, &mut d), b"18446744073709551615");
        let mut h = [0u8; 16];
        assert_eq!(hex(0, &mut h), b"0");
        assert_eq!(hex(0xfeb0_0000, &mut h), b"feb00000");
        assert_eq!(hex(u64::MAX, &mut h), b"ffffffffffffffff");
        assert_eq!(hex_byte(0x0a), *b"0a");
    }
}
