//! The handshake, as plain functions over byte buffers (the async code in
//! [`crate::stream`] only moves the bytes; the fuzz target drives these directly).
//!
//! Pattern: `Noise_NKpsk2_25519_ChaChaPoly_BLAKE2s`, prologue `hostd-cap/1`.
//!
//! ```text
//! -> e, es            payload: the capability's 8-byte id
//! <- e, ee, psk       payload: empty
//! ```
//!
//! - NK: the caller knows the service's static key in advance (it is in the
//!   capability) and stays anonymous, so one capability can be handed on.
//! - psk2: the capability's own pre-shared key is mixed in at the end of the
//!   responder's message, after the responder has read the capability's id
//!   (encrypted to its static key) and looked the psk up among the service's
//!   capabilities that are not revoked. A caller without the psk cannot read
//!   that message, and the responder's next read fails, so both ends stop.
//! - Replay: the responder's fresh ephemeral key (`e, ee`) goes into every
//!   session key, so a recorded first message replayed to the responder gets a
//!   new answer that only the original caller's ephemeral key could read; the
//!   recorded transport messages that follow do not decrypt under the new keys.
//!   The request itself is never in the first message (no 0-RTT data), so a
//!   replay cannot make the service act.
//!
//! The first frame carries the service's name in clear before the Noise
//! message (`len:u8, name, msg1`), so one listener can serve several services,
//! each with its own static key (as a TLS server name is in clear).

use snow::{Builder, HandshakeState, TransportState};

use crate::capability::{check_name, wire_id, Capability, KEY_LEN};
use crate::Error;

/// The Noise protocol name.
pub const PATTERN: &str = "Noise_NKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash: both ends must agree on it.
pub const PROLOGUE: &[u8] = b"hostd-cap/1";
/// Length of a Noise message's authentication tag.
pub const TAG_LEN: usize = 16;
/// Largest plaintext in one transport frame.
pub const MAX_PLAINTEXT: usize = crate::frame::MAX_FRAME - TAG_LEN;

fn params() -> snow::params::NoiseParams {
    // The constant is a valid Noise protocol name; parsing it cannot fail.
    #[allow(clippy::unwrap_used)]
    PATTERN.parse().unwrap()
}

fn noise(step: &'static str) -> impl FnOnce(snow::Error) -> Error {
    move |source| Error::Noise { step, source }
}

/// A fresh X25519 key pair: (private, public).
pub fn generate_keypair() -> Result<([u8; KEY_LEN], [u8; KEY_LEN]), Error> {
    let kp = Builder::new(params())
        .generate_keypair()
        .map_err(noise("generating a key pair"))?;
    let mut private = [0u8; KEY_LEN];
    let mut public = [0u8; KEY_LEN];
    if kp.private.len() != KEY_LEN || kp.public.len() != KEY_LEN {
        return Err(Error::Protocol("key pair of an unexpected size"));
    }
    private.copy_from_slice(&kp.private);
    public.copy_from_slice(&kp.public);
    Ok((private, public))
}

/// The public key of an X25519 private key.
pub fn public_of(private: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], Error> {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .ok_or(Error::Protocol("no X25519 implementation"))?;
    dh.set(private);
    dh.pubkey()
        .try_into()
        .map_err(|_| Error::Protocol("public key of an unexpected size"))
}

/// What the responder consults: its services' private keys and the psks of
/// their live capabilities.
pub trait Keys {
    /// The static private key of `service`, if this host serves it.
    fn service_key(&self, service: &str) -> Option<[u8; KEY_LEN]>;
    /// The psk of the capability of `service` with this id, unless it is revoked or unknown.
    fn psk(&self, service: &str, id: &[u8; 8]) -> Option<[u8; KEY_LEN]>;
}

/// The caller's half-done handshake.
#[derive(Debug)]
pub struct Initiator {
    state: HandshakeState,
}

impl Initiator {
    /// Starts a handshake with the service of `cap`; returns the first frame's body.
    pub fn start(cap: &Capability) -> Result<(Initiator, Vec<u8>), Error> {
        let mut state = Builder::new(params())
            .prologue(PROLOGUE)
            .remote_public_key(&cap.public_key)
            .psk(2, &cap.psk)
            .build_initiator()
            .map_err(noise("setting up the initiator"))?;
        let mut msg = vec![0u8; 256];
        let n = state
            .write_message(&wire_id(&cap.psk), &mut msg)
            .map_err(noise("writing the first message"))?;
        let name = cap.service.as_bytes();
        let name_len =
            u8::try_from(name.len()).map_err(|_| Error::Protocol("service name too long"))?;
        let mut out = Vec::with_capacity(1 + name.len() + n);
        out.push(name_len);
        out.extend_from_slice(name);
        out.extend_from_slice(&msg[..n]);
        Ok((Initiator { state }, out))
    }

    /// Reads the responder's answer; a wrong psk or key fails here.
    pub fn finish(mut self, reply: &[u8]) -> Result<TransportState, Error> {
        let mut payload = vec![0u8; reply.len()];
        self.state.read_message(reply, &mut payload).map_err(noise(
            "reading the service's answer (wrong or revoked capability?)",
        ))?;
        self.state
            .into_transport_mode()
            .map_err(noise("entering transport mode"))
    }
}

/// A handshake the responder accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The service called.
    pub service: String,
    /// The capability used (its printable id).
    pub cap_id: String,
    /// The answer frame's body, to send back.
    pub reply: Vec<u8>,
    /// The session.
    pub transport: TransportState,
}

/// Splits the first frame into the service name and the Noise message.
pub fn parse_hello(frame: &[u8]) -> Result<(&str, &[u8]), Error> {
    let (&len, rest) = frame
        .split_first()
        .ok_or(Error::Protocol("empty first frame"))?;
    let name = rest
        .get(..usize::from(len))
        .ok_or(Error::Protocol("first frame shorter than its service name"))?;
    let name = std::str::from_utf8(name).map_err(|_| Error::Protocol("service name not UTF-8"))?;
    check_name(name).map_err(|_| Error::Protocol("bad service name"))?;
    Ok((name, &rest[usize::from(len)..]))
}

/// The responder's whole part of the handshake: reads the first frame, finds
/// the service's key and the capability's psk, and writes the answer.
pub fn respond(frame: &[u8], keys: &dyn Keys) -> Result<Accepted, Error> {
    let (service, msg) = parse_hello(frame)?;
    let private = keys
        .service_key(service)
        .ok_or(Error::Protocol("no such service here"))?;
    let mut state = Builder::new(params())
        .prologue(PROLOGUE)
        .local_private_key(&private)
        .build_responder()
        .map_err(noise("setting up the responder"))?;
    let mut payload = vec![0u8; msg.len()];
    let n = state
        .read_message(msg, &mut payload)
        .map_err(noise("reading the first message"))?;
    let id: [u8; 8] = payload
        .get(..n)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::Protocol(
            "first message does not carry a capability id",
        ))?;
    let psk = keys
        .psk(service, &id)
        .ok_or(Error::Protocol("no such capability, or it was revoked"))?;
    state
        .set_psk(2, &psk)
        .map_err(noise("setting the capability's psk"))?;
    let mut reply = vec![0u8; 128];
    let n = state
        .write_message(&[], &mut reply)
        .map_err(noise("writing the answer"))?;
    reply.truncate(n);
    let transport = state
        .into_transport_mode()
        .map_err(noise("entering transport mode"))?;
    Ok(Accepted {
        service: service.to_owned(),
        cap_id: hex::encode(id),
        reply,
        transport,
    })
}

/// Encrypts one transport message (`plain` at most [`MAX_PLAINTEXT`] bytes).
pub fn seal(t: &mut TransportState, plain: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; plain.len() + TAG_LEN];
    let n = t
        .write_message(plain, &mut out)
        .map_err(noise("encrypting"))?;
    out.truncate(n);
    Ok(out)
}

/// Decrypts one transport message; a changed, replayed or reordered one fails.
pub fn open(t: &mut TransportState, sealed: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; sealed.len()];
    let n = t.read_message(sealed, &mut out).map_err(noise(
        "decrypting a frame (changed, replayed or out of order)",
    ))?;
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneService {
        private: [u8; 32],
        psks: Vec<[u8; 32]>,
    }

    impl Keys for OneService {
        fn service_key(&self, service: &str) -> Option<[u8; 32]> {
            (service == "svc").then_some(self.private)
        }
        fn psk(&self, _service: &str, id: &[u8; 8]) -> Option<[u8; 32]> {
            self.psks.iter().copied().find(|p| &wire_id(p) == id)
        }
    }

    fn setup() -> (OneService, Capability) {
        let (private, public) = generate_keypair().expect("keypair");
        let cap = Capability::mint("svc", "127.0.0.1:1", public).expect("mint");
        (
            OneService {
                private,
                psks: vec![cap.psk],
            },
            cap,
        )
    }

    #[test]
    fn handshake_then_both_directions() {
        let (keys, cap) = setup();
        let (init, hello) = Initiator::start(&cap).expect("start");
        let mut acc = respond(&hello, &keys).expect("accepted");
        assert_eq!(acc.cap_id, cap.id());
        let mut client = init.finish(&acc.reply).expect("finish");
        let sealed = seal(&mut client, b"GET / HTTP/1.1").expect("seal");
        assert!(!sealed.windows(3).any(|w| w == b"GET"));
        assert_eq!(
            open(&mut acc.transport, &sealed).expect("open"),
            b"GET / HTTP/1.1"
        );
        let back = seal(&mut acc.transport, b"ok").expect("seal");
        assert_eq!(open(&mut client, &back).expect("open"), b"ok");
    }

    #[test]
    fn wrong_psk_fails_at_the_caller() {
        let (keys, mut cap) = setup();
        // A capability with a known id but another psk: the responder answers
        // with the real psk, which the caller cannot read.
        let real = cap.psk;
        cap.psk[0] ^= 1;
        let keys = OneService {
            psks: vec![real],
            ..keys
        };
        let (init, hello) = Initiator::start(&cap).expect("start");
        // The id is derived from the psk, so this one is unknown: refused outright.
        assert!(respond(&hello, &keys).is_err());
        // The same id with another psk (a forged id) passes the lookup but not the answer.
        struct AnyId([u8; 32], [u8; 32]);
        impl Keys for AnyId {
            fn service_key(&self, _: &str) -> Option<[u8; 32]> {
                Some(self.0)
            }
            fn psk(&self, _: &str, _: &[u8; 8]) -> Option<[u8; 32]> {
                Some(self.1)
            }
        }
        let acc = respond(&hello, &AnyId(keys.private, real)).expect("answered");
        assert!(init.finish(&acc.reply).is_err());
    }

    #[test]
    fn revoked_or_unknown_is_refused() {
        let (mut keys, cap) = setup();
        keys.psks.clear();
        let (_init, hello) = Initiator::start(&cap).expect("start");
        assert!(respond(&hello, &keys).is_err());
    }

    #[test]
    fn replayed_first_message_gets_a_session_the_replayer_cannot_use() {
        let (keys, cap) = setup();
        let (init, hello) = Initiator::start(&cap).expect("start");
        let mut first = respond(&hello, &keys).expect("accepted");
        let mut client = init.finish(&first.reply).expect("finish");
        let recorded = seal(&mut client, b"POST /pay").expect("seal");
        assert!(open(&mut first.transport, &recorded).is_ok());
        // The attacker replays the first frame and the recorded request.
        let mut second = respond(&hello, &keys).expect("the responder cannot tell yet");
        assert_ne!(second.reply, first.reply, "a fresh ephemeral per answer");
        assert!(open(&mut second.transport, &recorded).is_err());
    }

    #[test]
    fn public_of_matches_the_generated_pair() {
        let (private, public) = generate_keypair().expect("keypair");
        assert_eq!(public_of(&private).expect("public"), public);
    }

    #[test]
    fn hello_parser_refuses_garbage() {
        assert!(parse_hello(&[]).is_err());
        assert!(parse_hello(&[5, b'a']).is_err());
        assert!(parse_hello(&[1, b' ']).is_err());
        assert_eq!(parse_hello(&[1, b'a', 9]).expect("ok"), ("a", &[9u8][..]));
    }
}
