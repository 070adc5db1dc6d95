//! What a runner loads into a guest (kernel, initrd): a byte range of a file, read
//! front to back in small chunks, hashed while it is read and checked before the guest
//! runs. No copy of a payload is kept in the monitor's heap: the built-in VMM writes
//! each chunk straight into guest memory, the QEMU runner into the file QEMU reads.
//!
//! A kernel payload is either an ELF vmlinux as it is or an image's packed kernel
//! section (hostd_images::kernel); [`Payload::stream_kernel`] turns both into the same
//! (ELF file offset, bytes) pieces.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use hostd_images::kernel::{self, KernelError, Unpacker};
use hostd_images::stamp::FileStamp;
use sha2::{Digest, Sha256};

/// Bytes read at a time (the only buffer a load needs).
const CHUNK: usize = 64 << 10;

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Reading the file failed.
    #[error("cannot read {name}")]
    Read {
        /// The payload's name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a copy for another program (QEMU) failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file written.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes read are not the ones the image's header records.
    #[error("{name}: its sha256 is not the one recorded when the image was opened (the file changed on disk); nothing was run")]
    Digest {
        /// The payload's name.
        name: String,
    },
    /// The kernel's encoding is malformed.
    #[error("{name}")]
    Kernel {
        /// The payload's name.
        name: String,
        /// What is wrong.
        #[source]
        source: KernelError,
    },
    /// Whoever took the bytes refused them.
    #[error("{name}: {message}")]
    Sink {
        /// The payload's name.
        name: String,
        /// What the sink said.
        message: String,
    },
}

/// A byte range of a file to load, with the digest it must have.
#[derive(Debug)]
pub struct Payload {
    file: File,
    offset: u64,
    length: u64,
    sha256: Option<[u8; 32]>,
    /// The version of the file whose bytes were verified already (an image verified in
    /// full): while the file is still that version, nothing is hashed again.
    verified: Option<FileStamp>,
    name: String,
}

impl Payload {
    /// The same payload over a duplicate of its descriptor (every read is positioned, so
    /// the two do not disturb each other).
    pub fn try_clone(&self) -> std::io::Result<Payload> {
        Ok(Payload {
            file: self.file.try_clone()?,
            offset: self.offset,
            length: self.length,
            sha256: self.sha256,
            verified: self.verified,
            name: self.name.clone(),
        })
    }

    /// A whole file (a `--kernel` or `--initrd`), at most `max` bytes; no digest to check.
    pub fn whole_file(path: &Path, max: u64) -> std::io::Result<Payload> {
        let file = hostd_images::input::open_regular(path)?;
        let length = file.metadata()?.len();
        if length > max {
            return Err(std::io::Error::other(format!(
                "{length} bytes; at most {max} are accepted"
            )));
        }
        Ok(Payload {
            file,
            offset: 0,
            length,
            sha256: None,
            verified: None,
            name: path.to_string_lossy().into_owned(),
        })
    }

    /// The whole of an open file (what a fuzzer or a test hands the loader); no digest.
    pub fn from_file(file: File, name: &str) -> std::io::Result<Payload> {
        Ok(Payload {
            length: file.metadata()?.len(),
            file,
            offset: 0,
            sha256: None,
            verified: None,
            name: name.to_string(),
        })
    }

    /// `length` bytes at `offset` of the image at `path` that must hash to `sha256`. When
    /// `verified` is the stamp of the image version whose digests were checked (and the
    /// file opened here is still that version while it is read), the bytes are not
    /// hashed again; otherwise they are.
    pub fn section(
        path: &Path,
        offset: u64,
        length: u64,
        sha256: [u8; 32],
        verified: Option<FileStamp>,
        name: String,
    ) -> std::io::Result<Payload> {
        Ok(Payload {
            file: hostd_images::input::open_regular(path)?,
            offset,
            length,
            sha256: Some(sha256),
            verified,
            name,
        })
    }

    /// The digest it is checked against (an image section's), if any.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        self.sha256
    }

    /// Its name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.length
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Hands every chunk to `sink` (with its offset in the payload), front to back; then
    /// checks the digest. A sink's error stops the read.
    pub fn stream(
        &self,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(), PayloadError> {
        // SAFETY: `place` names no memory.
        unsafe { self.stream_placed(|_, _| None, |at, bytes, _| sink(at, bytes)) }
    }

    /// [`stream`](Self::stream), where `place` may name memory that the next bytes go
    /// to unchanged: asked with their offset in the payload and how many there are at
    /// most, it returns a pointer and a length (at most that many, at least one) to
    /// read them into directly, without a copy through the buffer. They are hashed there
    /// and handed to `sink` with `true` (placed: to look at, not to copy); the rest as
    /// [`stream`](Self::stream) does, with `false`.
    ///
    /// # Safety
    /// A pointer `place` returns must be valid for writes of its length, and nothing else
    /// may read or write that memory until this returns.
    pub unsafe fn stream_placed(
        &self,
        mut place: impl FnMut(u64, usize) -> Option<(*mut u8, usize)>,
        mut sink: impl FnMut(u64, &[u8], bool) -> Result<(), String>,
    ) -> Result<(), PayloadError> {
        let mut buf = Vec::new();
        // Checked before and after the read: a write in between changes the stamp.
        let trusted = self.verified.filter(|s| s.holds_for(&self.file));
        // Hashed only when there is a digest to check and no stamp vouches for it (a
        // `--kernel` file has none: hashing it was work for nothing on the start path).
        let mut check = self
            .sha256
            .filter(|_| trusted.is_none())
            .map(|want| (want, Sha256::new()));
        let mut pos = 0u64;
        while pos < self.length {
            let n = ((self.length - pos) as usize).min(CHUNK);
            let target = place(pos, n).filter(|(p, m)| !p.is_null() && (1..=n).contains(m));
            let (bytes, placed): (&mut [u8], bool) = match target {
                // SAFETY: valid for writes of `m` bytes that nothing else touches meanwhile
                // (the caller's promise for what `place` returns).
                Some((p, m)) => (unsafe { std::slice::from_raw_parts_mut(p, m) }, true),
                None => {
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                    (&mut buf[..n], false)
                }
            };
            self.file
                .read_exact_at(bytes, self.offset + pos)
                .map_err(|source| PayloadError::Read {
                    name: self.name.clone(),
                    source,
                })?;
            if let Some((_, h)) = check.as_mut() {
                h.update(&*bytes);
            }
            sink(pos, bytes, placed).map_err(|message| PayloadError::Sink {
                name: self.name.clone(),
                message,
            })?;
            pos += bytes.len() as u64;
        }
        if let Some(stamp) = trusted {
            if !stamp.holds_for(&self.file) {
                return Err(PayloadError::Digest {
                    name: self.name.clone(),
                });
            }
        } else if let Some((want, hash)) = check {
            let got: [u8; 32] = hash.finalize().into();
            if got != want {
                return Err(PayloadError::Digest {
                    name: self.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Streams a kernel (an ELF as it is, or a packed kernel section) as (ELF file
    /// offset, bytes) pieces in increasing offset order, then checks the digest.
    /// Returns the ELF's length.
    pub fn stream_kernel(
        &self,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<u64, PayloadError> {
        // SAFETY: `place` names no memory.
        unsafe { self.stream_kernel_placed(|_, _| None, |at, bytes, _| sink(at, bytes)) }
    }

    /// [`stream_kernel`](Self::stream_kernel) with [`stream_placed`](Self::stream_placed)'s
    /// `place`, asked by ELF file offset: bytes of the ELF may be read straight to
    /// where they go, and are then handed to `sink` as placed (`true`).
    ///
    /// # Safety
    /// As for [`stream_placed`](Self::stream_placed).
    pub unsafe fn stream_kernel_placed(
        &self,
        mut place: impl FnMut(u64, usize) -> Option<(*mut u8, usize)>,
        mut sink: impl FnMut(u64, &[u8], bool) -> Result<(), String>,
    ) -> Result<u64, PayloadError> {
        let mut head = [0u8; 8];
        let n = (self.length as usize).min(head.len());
        self.file
            .read_exact_at(&mut head[..n], self.offset)
            .map_err(|source| PayloadError::Read {
                name: self.name.clone(),
                source,
            })?;
        if !kernel::is_packed(&head[..n]) {
            // SAFETY: the caller's promise, passed on.
            unsafe { self.stream_placed(place, sink) }?;
            return Ok(self.length);
        }
        // Asked from the section's offsets (through `place`) and fed the section's bytes
        // (through the sink): one unpacker for both.
        let unpacker = std::cell::RefCell::new(Unpacker::new(self.length));
        let mut failure: Option<PayloadError> = None;
        // A section's bytes go to one extent's ELF bytes at most: asked for the rest of
        // the current extent, `place` answers by ELF offset.
        let place_section = |_: u64, len: usize| {
            let (at, left) = unpacker.borrow().next_run()?;
            place(at, len.min(usize::try_from(left).unwrap_or(usize::MAX)))
        };
        let section_sink = |_: u64, chunk: &[u8], placed: bool| {
            let mut pieces = Vec::new();
            if let Err(source) = unpacker.borrow_mut().push(chunk, &mut pieces) {
                failure = Some(PayloadError::Kernel {
                    name: self.name.clone(),
                    source,
                });
                return Err(String::new());
            }
            pieces
                .into_iter()
                .try_for_each(|(at, b)| sink(at, b, placed))
        };
        // SAFETY: the caller's promise for what `place` returns, passed on.
        let r = unsafe { self.stream_placed(place_section, section_sink) };
        if let Some(f) = failure {
            return Err(f);
        }
        r?;
        let finished = unpacker.borrow().finish();
        finished.map_err(|source| PayloadError::Kernel {
            name: self.name.clone(),
            source,
        })
    }
}
