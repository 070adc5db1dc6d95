//! A snapshot file as `hostd run --snapshot-cache` reads it back from disk: arbitrary
//! bytes as a whole file (header, memory and state digests, state records), and the
//! same bytes as bare state records and as one virtio-mmio transport record. Nothing
//! may panic; what parses re-encodes to the same bytes.

use hostd_devices::virtio::mmio::TransportState;
use hostd_vmm::kvm::snapshot::{parse, State};

/// One input.
pub fn run(data: &[u8]) {
    if let Ok((header, state)) = parse(data) {
        assert_eq!(
            header.state_offset + header.state_len,
            data.len() as u64,
            "an accepted header lays out the whole file"
        );
        let again = State::decode(&state.encode()).expect("a decoded state re-decodes");
        assert_eq!(again.encode(), state.encode());
    }
    if let Ok(state) = State::decode(data) {
        let bytes = state.encode();
        let again = State::decode(&bytes).expect("a decoded state re-decodes");
        assert_eq!(again.encode(), bytes);
    }
    if let Some(t) = TransportState::from_bytes(data) {
        assert_eq!(t.to_bytes(), data, "a transport record round-trips");
    }
}
