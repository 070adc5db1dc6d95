//! The capability responder's wire parser: arbitrary bytes as what a caller sends
//! to `--cap-listen` (frames, the first-frame service name, the Noise handshake
//! message, transport messages), as the answer a caller reads back, and as a
//! `hostd-cap:` value. Nothing may panic; a frame is never longer than its
//! length prefix says; nothing forged is accepted.

use hostd_caps::capability::{wire_id, Capability, KEY_LEN};
use hostd_caps::frame;
use hostd_caps::session::{self, Initiator, Keys};

/// One service `svc` with one valid capability (fixed keys: the fuzzer cannot know them).
struct Fixed {
    private: [u8; KEY_LEN],
    psk: [u8; KEY_LEN],
}

impl Keys for Fixed {
    fn service_key(&self, service: &str) -> Option<[u8; KEY_LEN]> {
        (service == "svc").then_some(self.private)
    }
    fn psk(&self, service: &str, id: &[u8; 8]) -> Option<[u8; KEY_LEN]> {
        (service == "svc" && id == &wire_id(&self.psk)).then_some(self.psk)
    }
}

const PRIVATE: [u8; KEY_LEN] = [0x41; KEY_LEN];
const PSK: [u8; KEY_LEN] = [0x17; KEY_LEN];

/// Splits `data` into frames the way the responder reads them.
fn frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    loop {
        match frame::split(data) {
            Ok(Some((body, used))) => {
                assert!(!body.is_empty() && body.len() <= frame::MAX_FRAME);
                assert_eq!(used, body.len() + frame::HEADER);
                out.push(body);
                data = &data[used..];
            }
            Ok(None) | Err(_) => return out,
        }
    }
}

/// One input: the first byte picks what the rest is fed to.
pub fn run(data: &[u8]) {
    let keys = Fixed {
        private: PRIVATE,
        psk: PSK,
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        // Raw frames from a caller: the first is the handshake, the rest transport.
        0 => {
            let fs = frames(rest);
            let Some(first) = fs.first() else { return };
            if let Ok(mut acc) = session::respond(first, &keys) {
                // Only a caller holding the psk gets here; the fuzzer does not.
                assert_eq!(acc.service, "svc");
                for f in &fs[1..] {
                    if session::open(&mut acc.transport, f).is_err() {
                        break;
                    }
                }
            }
        }
        // A genuine handshake, then fuzzed transport frames: none may decrypt.
        1 => {
            let public = match public_key() {
                Some(p) => p,
                None => return,
            };
            let cap = Capability {
                service: "svc".into(),
                location: "fuzz:1".into(),
                public_key: public,
                psk: PSK,
            };
            let Ok((init, hello)) = Initiator::start(&cap) else {
                return;
            };
            let Ok(mut acc) = session::respond(&hello, &keys) else {
                panic!("a genuine handshake was refused")
            };
            assert!(
                init.finish(&acc.reply).is_ok(),
                "a genuine answer was refused"
            );
            for f in frames(rest) {
                assert!(
                    session::open(&mut acc.transport, f).is_err(),
                    "a forged transport frame decrypted"
                );
            }
        }
        // A fuzzed answer to a genuine first message: the caller must refuse it.
        2 => {
            let Some(public) = public_key() else { return };
            let cap = Capability {
                service: "svc".into(),
                location: "fuzz:1".into(),
                public_key: public,
                psk: PSK,
            };
            let Ok((init, _hello)) = Initiator::start(&cap) else {
                return;
            };
            if let Some(reply) = frames(rest).first() {
                assert!(init.finish(reply).is_err(), "a forged answer was accepted");
            }
        }
        // A capability value.
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(cap) = Capability::parse(text) {
                    assert_eq!(Capability::parse(&cap.reveal()).ok(), Some(cap.clone()));
                    assert!(!cap.to_string().contains(&hex_of(&cap.psk)));
                }
            }
        }
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The public key of [`PRIVATE`], found by a handshake with ourselves.
fn public_key() -> Option<[u8; KEY_LEN]> {
    static PUBLIC: std::sync::OnceLock<Option<[u8; KEY_LEN]>> = std::sync::OnceLock::new();
    *PUBLIC.get_or_init(|| session::public_of(&PRIVATE).ok())
}
