//! `hostd build`: spec → image file.
//!
//! The root file system (base directories, the OCI base image when the spec names
//! one ([`crate::oci`]), then packages with their dependency
//! closure, then the system files of [`crate::etc`], then the spec's files) is built in
//! memory as a [`Tree`]. Packages come from the spec's lock file when there is one
//! ([`crate::lock`]), else from resolving the spec's `packages` against the build
//! host's apt lists ([`crate::packages`]); the lock is then written.
//!
//! Where the tree goes depends on the spec's `root`; unset, on its size: a tree whose
//! files and links hold more than [`EROFS_THRESHOLD`] bytes becomes an erofs root,
//! a smaller one stays in the initrd.
//!
//! - `root = "initrd"`: the whole tree, plus guest init at `/init` and
//!   the manifest, is the `initrd` section (cpio newc). The guest runs from RAM.
//! - `root = "erofs"`: the tree becomes the `rootfs` section, a read-only erofs image
//!   ([`crate::erofs`]) padded to 4 KiB, followed by `rootfs-hashes`, the sha256 of each
//!   of its 4 KiB blocks ([`crate::verity`]). The manifest records it (`root`), and the
//!   initrd keeps only what guest init needs before the root is mounted: `/init`, the
//!   manifest, `/dev/console` and the mount points. Volume mount points are created in
//!   the root, since the guest cannot create them on a read-only `/`.
//!
//! Sections are written in this order: `manifest`, `kernel`, `initrd`, then `rootfs`
//! and `rootfs-hashes` when there is a root file system.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::debs;
use crate::erofs;
use crate::etc;
use crate::format::{self, sections};
use crate::input;
use crate::lock::{self, Lock, LockedPackage, LOCK_VERSION};
use crate::manifest::{
    BaseInfo, KernelInfo, Manifest, NetworkInfo, RootInfo, Service, Step, Tmpfs, Volume,
    MANIFEST_PATH_IN_GUEST, MANIFEST_SCHEMA,
};
use crate::packages::{self, index::Index, PackageError};
use crate::progress::Progress;
use crate::rootfs::{Kind, Node, Tree};
use crate::signature::SigningKey;
use crate::spec::{parse_owner, RootKind, Spec, SpecError};
use crate::verity;

/// Where guest init mounts the read-only root before switching to it (a directory of
/// the initrd).
pub const NEW_ROOT_IN_INITRD: &str = "/newroot";

/// An unset `root` puts a root file system holding more than this many bytes (files
/// and symlink targets) into an erofs `rootfs` section rather than the initrd: 8 MiB.
/// Busybox-sized roots stay in RAM; anything with a C library and an interpreter is
/// read from the verified disk instead of being copied into guest memory at boot.
pub const EROFS_THRESHOLD: u64 = 8 << 20;

/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Default stop timeout in seconds.
pub const DEFAULT_STOP_TIMEOUT: u32 = 5;

/// Whether a `[[files]]` entry can go at `path` without losing what the tree has: no
/// ancestor may be a file or a symbolic link (the entry would turn it into a directory:
/// a file lost, or a link such as usrmerge's /bin -> usr/bin broken), and a directory
/// that holds anything may not be replaced by a file or a link.
fn check_file_place(tree: &Tree, path: &str, kind: &Kind) -> Result<(), String> {
    let path = path.trim_end_matches('/');
    let mut at = String::new();
    let comps: Vec<&str> = path[1..].split('/').collect();
    for comp in &comps[..comps.len() - 1] {
        at.push('/');
        at.push_str(comp);
        match tree.get(&at).map(|n| &n.kind) {
            Some(Kind::Symlink(t)) => {
                return Err(format!(
                    "`{at}` is a symbolic link to `{t}` in the image; give the path through \
                     its target instead"
                ))
            }
            Some(Kind::File(_)) => {
                return Err(format!(
                    "`{at}` is a file in the image; a path cannot go below it"
                ))
            }
            _ => {}
        }
    }
    if !matches!(kind, Kind::Dir) && matches!(tree.get(path).map(|n| &n.kind), Some(Kind::Dir)) {
        let prefix = format!("{path}/");
        if tree.iter().any(|(p, _)| p.starts_with(&prefix)) {
            return Err(format!(
                "`{path}` is a directory with contents in the image; an entry that is not \
                 a directory would replace it and all it holds"
            ));
        }
    }
    Ok(())
}

/// Every user a service or boot step runs as by name is in the image's /etc/passwd
/// (packages', `[[users]]` and `[[files]]` included): guest init would refuse to start
/// it, after the whole boot.
fn check_users(spec: &Spec, tree: &Tree) -> Result<(), (String, String)> {
    let passwd = match tree.get("/etc/passwd") {
        Some(Node {
            kind: Kind::File(d),
            ..
        }) => String::from_utf8_lossy(d).into_owned(),
        _ => String::new(),
    };
    // Guest init knows `root` and `nobody` without /etc/passwd.
    let known = |name: &str| {
        matches!(name, "root" | "nobody")
            || passwd.lines().any(|l| l.split(':').next() == Some(name))
    };
    let by_name = |u: &Option<String>| {
        u.as_deref()
            .filter(|u| !u.starts_with(|c: char| c.is_ascii_digit()))
            .filter(|u| !known(u))
            .map(str::to_owned)
    };
    let steps = spec
        .boot
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("boot[{i}].user"), &b.user));
    let services = spec
        .services
        .iter()
        .map(|(n, s)| (format!("services.{n}.user"), &s.user));
    for (field, user) in steps.chain(services) {
        if let Some(u) = by_name(user) {
            return Err((
                field,
                format!(
                    "no user `{u}` in the image's /etc/passwd: declare it in [[users]], \
                     add the package that makes it, or give `uid:gid`"
                ),
            ));
        }
    }
    Ok(())
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The spec is malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A package could not be fetched or unpacked.
    #[error("{file}")]
    Package {
        /// The spec file.
        file: PathBuf,
        /// What went wrong.
        source: debs::DebError,
    },
    /// The OCI base image could not be read.
    #[error("{file}: field `base`")]
    Base {
        /// The spec file.
        file: PathBuf,
        /// What went wrong.
        source: crate::oci::OciError,
    },
    /// The package closure could not be computed.
    #[error("{file}: field `packages`")]
    Closure {
        /// The spec file.
        file: PathBuf,
        /// What went wrong.
        source: PackageError,
    },
    /// The lock file could not be read or written.
    #[error("lock file")]
    Lock {
        /// What went wrong.
        #[source]
        source: lock::LockError,
    },
    /// An input file (kernel, `files[].source`) could not be read.
    #[error("{file}: field `{field}`: cannot read {path}: {message}")]
    Input {
        /// The spec file.
        file: PathBuf,
        /// The field naming the input.
        field: String,
        /// The input's path.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
    /// The root file system holds an entry the guest's kernel could not create (from
    /// `files`, a package or the base image).
    #[error("{file}: {message} (from `files`, a package or the base image)")]
    Tree {
        /// The spec file.
        file: PathBuf,
        /// Which entry and why.
        message: String,
    },
    /// The read-only root file system could not be made.
    #[error("{file}: the erofs root (`root = \"erofs\"`, or `root` unset and over 8 MiB)")]
    Rootfs {
        /// The spec file.
        file: PathBuf,
        /// What went wrong.
        source: erofs::ErofsError,
    },
    /// Signing failed.
    #[error("--sign")]
    Sign {
        /// Why.
        source: crate::signature::SignatureError,
    },
    /// Writing the output failed.
    #[error("cannot write {path}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Debug)]
pub struct BuildOptions<'a> {
    /// The spec file.
    pub spec: &'a Path,
    /// Where to write the image.
    pub output: &'a Path,
    /// The guest init binary placed at /init.
    pub init: &'a [u8],
    /// The kernel used for `kernel = "default"`.
    pub default_kernel: &'a Path,
    /// Cache directory for downloaded packages.
    pub cache: &'a Path,
    /// The only directory a spec's relative paths (`kernel`, `files[].source`) may
    /// reach into, symlinks resolved [default: the spec's directory].
    pub context: Option<&'a Path>,
    /// Sign the image with this key (a `signature` section, last).
    pub sign: Option<&'a SigningKey>,
    /// Resolve the packages again and rewrite the lock file.
    pub update_lock: bool,
    /// Where progress of downloads and unpacking goes.
    pub progress: &'a dyn Progress,
}

/// What the package step did.
#[derive(Debug)]
pub struct PackagesReport {
    /// How many packages were unpacked (the closure).
    pub count: usize,
    /// Their .deb files' total size in bytes.
    pub deb_bytes: u64,
    /// The lock file.
    pub lock: PathBuf,
    /// Whether the lock file was written (a first build or `--update-lock`) rather
    /// than followed.
    pub lock_written: bool,
    /// Choices made while resolving (virtual packages, dropped relations).
    pub notes: Vec<String>,
}

/// What was built.
#[derive(Debug)]
pub struct BuildReport {
    /// Image id (sha256 of the file).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// The manifest that was written.
    pub manifest: Manifest,
    /// Packages, when the spec has any.
    pub packages: Option<PackagesReport>,
}

/// Detects the kernel format from its first bytes: `elf` or `bzimage`.
pub fn kernel_format(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x7fELF") {
        Some("elf")
    } else if bytes.get(0x202..0x206) == Some(b"HdrS") {
        Some("bzimage")
    } else {
        None
    }
}

/// Builds an image. The output is replaced atomically, and only on success.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let file = opts.spec.to_path_buf();
    let output_err = |e: std::io::Error| BuildError::Output {
        path: opts.output.to_path_buf(),
        source: e,
    };
    input::check_output(opts.output).map_err(output_err)?;
    if input::same_file(opts.spec, opts.output) {
        return Err(output_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is the spec itself; choose another output path",
        )));
    }
    let spec = Spec::load(opts.spec)?;
    // The lock beside the spec, when the spec has packages.
    let lock_path = (!spec.packages.is_empty()).then(|| lock::path_for(opts.spec));
    if let Some(lock_path) = &lock_path {
        // The lock is written beside the spec: it must be neither the spec nor the image.
        if input::same_path(lock_path, opts.spec) {
            return Err(BuildError::Input {
                file: file.clone(),
                field: "packages".into(),
                path: lock_path.clone(),
                message: "the spec's lock file (the spec's name with `.lock`) would be the spec \
                          itself; name the spec NAME.toml"
                    .into(),
            });
        }
        if input::same_path(lock_path, opts.output) {
            return Err(output_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "it is where the spec's lock file goes; choose another output path",
            )));
        }
    }
    let base = match opts.spec.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let input_err = |field: &str, path: &Path, message: String| BuildError::Input {
        file: file.clone(),
        field: field.to_string(),
        path: path.to_path_buf(),
        message,
    };
    let context_dir = opts.context.unwrap_or(base);
    let context = std::fs::canonicalize(context_dir)
        .and_then(|c| {
            if c.is_dir() {
                Ok(c)
            } else {
                Err(std::io::Error::other("not a directory"))
            }
        })
        .map_err(|e| {
            input_err(
                "(build context)",
                context_dir,
                format!("{e} (the build context must be an existing directory)"),
            )
        })?;
    // A relative path of the spec, resolved (symlinks too) and confined to the context.
    let confined = |field: &str, rel: &Path| -> Result<PathBuf, BuildError> {
        let joined = base.join(rel);
        let real =
            std::fs::canonicalize(&joined).map_err(|e| input_err(field, &joined, e.to_string()))?;
        if !real.starts_with(&context) {
            return Err(input_err(
                field,
                &joined,
                format!(
                    "it resolves to {}, outside the build context {}; a spec reads only files \
                     under its context (move the file there, or give `hostd build --context DIR`)",
                    real.display(),
                    context.display()
                ),
            ));
        }
        if input::same_file(&real, opts.output) {
            return Err(output_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "it is an input of the build (field `{field}`); choose another output path"
                ),
            )));
        }
        Ok(real)
    };
    // The lock beside the spec is read like any input: a symlink must not lead out of
    // the context (the build would read, as root, whatever it names).
    if let Some(lock_path) = &lock_path {
        if lock_path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            if let Some(name) = lock_path.file_name() {
                confined("packages", Path::new(name))?;
            }
        }
    }

    // Kernel.
    let kernel_path = match spec.kernel.as_deref() {
        None | Some("default") => opts.default_kernel.to_path_buf(),
        Some(p) => confined("kernel", Path::new(p))?,
    };
    if input::same_file(&kernel_path, opts.output) {
        return Err(output_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is the kernel the image is built from; choose another output path",
        )));
    }
    let kernel = input::read_regular(&kernel_path, input::MAX_KERNEL).map_err(|e| {
        let hint = if spec.kernel.as_deref().unwrap_or("default") == "default" {
            " (the kernel for `kernel = \"default\"` comes from --kernel, $HOSTD_KERNEL or \
             hostd's cache: build it with guest/kernel/build.sh)"
        } else {
            ""
        };
        input_err("kernel", &kernel_path, format!("{e}{hint}"))
    })?;
    let kformat = kernel_format(&kernel).ok_or_else(|| {
        input_err(
            "kernel",
            &kernel_path,
            "neither an ELF vmlinux nor a bzImage".into(),
        )
    })?;
    // An ELF kernel is carried packed (no padding, no zero pages: crate::kernel); one
    // whose headers do not parse is kept as it is, for the runner to refuse.
    let kernel = match kformat {
        "elf" => crate::kernel::pack(&kernel).unwrap_or(kernel),
        _ => kernel,
    };

    let kernel_sha: [u8; 32] = Sha256::digest(&kernel).into();

    // Root file system: packages first, then files (files win), then hostd's own.
    let mut tree = Tree::new();
    for dir in [
        "/proc", "/sys", "/dev", "/run", "/etc", "/root", "/var", "/mnt",
    ] {
        tree.insert(
            dir,
            Node {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
        );
    }
    tree.insert(
        "/tmp",
        Node {
            kind: Kind::Dir,
            mode: 0o1777,
            uid: 0,
            gid: 0,
        },
    );
    // An OCI base first: packages and files go on top.
    let base_info = match spec.base.as_deref().and_then(crate::spec::base_source) {
        None => None,
        Some((kind, rel)) => {
            let path = confined("base", Path::new(rel))?;
            // An OCI layout is a directory: the output may not go inside it (it would
            // replace its index or a blob, and the next build would fail).
            if path.is_dir() {
                let out_dir = opts
                    .output
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if std::fs::canonicalize(out_dir).is_ok_and(|d| d.starts_with(&path)) {
                    return Err(output_err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "it is inside the OCI layout the image is built from (field `base`); \
                         choose another output path",
                    )));
                }
            }
            let (digest, layers) =
                crate::oci::apply(&path, kind, &mut tree).map_err(|source| BuildError::Base {
                    file: file.clone(),
                    source,
                })?;
            Some(BaseInfo { digest, layers })
        }
    };
    let (packages, packages_report, new_lock) = if spec.packages.is_empty() {
        (Vec::new(), None, None)
    } else {
        closure(&spec, opts, &mut tree)?
    };
    let hostname = spec.hostname.clone().unwrap_or_else(|| spec.name.clone());
    etc::write(&mut tree, &spec, &hostname);
    for (i, f) in spec.files.iter().enumerate() {
        let (uid, gid) = f.owner.as_deref().and_then(parse_owner).unwrap_or((0, 0));
        let mode = |default: u32| {
            f.mode
                .as_deref()
                .and_then(|m| u32::from_str_radix(m, 8).ok())
                .unwrap_or(default)
        };
        let node = if let Some(src) = &f.source {
            let field = format!("files[{i}].source");
            let path = confined(&field, src)?;
            let data = input::read_regular(&path, input::MAX_SOURCE_FILE)
                .map_err(|e| input_err(&field, &path, e.to_string()))?;
            Node {
                kind: Kind::File(data),
                mode: mode(0o644),
                uid,
                gid,
            }
        } else if let Some(c) = &f.contents {
            Node {
                kind: Kind::File(c.clone().into_bytes()),
                mode: mode(0o644),
                uid,
                gid,
            }
        } else if let Some(t) = &f.symlink {
            Node {
                kind: Kind::Symlink(t.clone()),
                mode: 0o777,
                uid,
                gid,
            }
        } else {
            Node {
                kind: Kind::Dir,
                mode: mode(0o755),
                uid,
                gid,
            }
        };
        check_file_place(&tree, &f.path, &node.kind).map_err(|message| {
            BuildError::Spec(SpecError::Invalid {
                file: file.clone(),
                field: format!("files[{i}].path"),
                message,
            })
        })?;
        tree.insert_over(&f.path, node);
    }
    check_users(&spec, &tree).map_err(|(field, message)| {
        BuildError::Spec(SpecError::Invalid {
            file: file.clone(),
            field,
            message,
        })
    })?;
    let tmpfs = tmpfs_mounts(&spec, &mut tree);
    if let Some(message) = tree.unrepresentable() {
        return Err(BuildError::Tree {
            file: file.clone(),
            message,
        });
    }

    // A read-only root: the whole tree goes into the `rootfs` section.
    let root = spec.root.unwrap_or_else(|| {
        let bytes: u64 = tree
            .iter()
            .map(|(_, n)| match &n.kind {
                Kind::File(d) => d.len() as u64,
                Kind::Symlink(t) => t.len() as u64,
                _ => 0,
            })
            .sum();
        if bytes > EROFS_THRESHOLD {
            RootKind::Erofs
        } else {
            RootKind::Initrd
        }
    });
    let rootfs = match root {
        RootKind::Initrd => None,
        RootKind::Erofs => {
            for v in &spec.volumes {
                tree.insert(&v.mount, dir_node(0o755));
            }
            let bytes = erofs::build(&tree).map_err(|source| BuildError::Rootfs {
                file: file.clone(),
                source,
            })?;
            // Two passes over tens of MiB, one per core: the section's sha256 (for the
            // manifest and the header) and the per-block list.
            let (sha, hashes) = std::thread::scope(|s| {
                let blocks = s.spawn(|| verity::block_hashes(&bytes));
                let sha: [u8; 32] = Sha256::digest(&bytes).into();
                let hashes = blocks
                    .join()
                    .unwrap_or_else(|_| verity::block_hashes(&bytes));
                (sha, hashes)
            });
            Some((bytes, sha, hashes))
        }
    };

    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        name: spec.name.clone(),
        hostname,
        vcpus: spec.vcpus.unwrap_or(1),
        memory_mib: spec.memory.map(|m| m.0).unwrap_or(DEFAULT_MEMORY_MIB),
        cmdline: spec.cmdline.trim().to_string(),
        kernel: KernelInfo {
            format: kformat.to_string(),
            sha256: format::digest_hex(&kernel_sha),
        },
        packages,
        boot: spec
            .boot
            .iter()
            .map(|s| Step {
                name: s.name.clone(),
                argv: std::iter::once(s.command.clone())
                    .chain(s.args.iter().cloned())
                    .collect(),
                env: s.env.clone(),
                user: s.user.clone().unwrap_or_else(|| "root".into()),
            })
            .collect(),
        services: spec
            .services
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    Service {
                        argv: std::iter::once(s.command.clone())
                            .chain(s.args.iter().cloned())
                            .collect(),
                        env: s.env.clone(),
                        user: s.user.clone().unwrap_or_else(|| "root".into()),
                        workdir: s.workdir.clone().unwrap_or_else(|| "/".into()),
                        restart: s.restart,
                        depends_on: s.depends_on.clone(),
                        main: s.main,
                        secrets: s.secrets.clone(),
                        capabilities: s.capabilities.clone(),
                    },
                )
            })
            .collect(),
        volumes: spec
            .volumes
            .iter()
            .map(|v| Volume {
                name: v.name.clone(),
                size_mib: v.size.0,
                mount: v.mount.clone(),
            })
            .collect(),
        stop_timeout_secs: spec.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT),
        root: rootfs.as_ref().map(|(bytes, sha, _)| RootInfo {
            fs: "erofs".into(),
            size: bytes.len() as u64,
            block_size: verity::BLOCK_SIZE as u32,
            sha256: format::digest_hex(sha),
        }),
        base: base_info,
        tmpfs,
        network: (!spec.network.dns.is_empty() || !spec.network.search.is_empty()).then(|| {
            NetworkInfo {
                dns: spec.network.dns.clone(),
                search: spec.network.search.clone(),
            }
        }),
    };
    let manifest_json = manifest.to_canonical_json();

    if rootfs.is_some() {
        // The initrd only carries guest init up to the switch to the real root.
        tree = Tree::new();
        for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", NEW_ROOT_IN_INITRD] {
            tree.insert(dir, dir_node(0o755));
        }
    }
    tree.insert(
        "/init",
        Node {
            kind: Kind::File(opts.init.to_vec()),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    );
    tree.insert(
        MANIFEST_PATH_IN_GUEST,
        Node {
            kind: Kind::File(manifest_json.clone()),
            mode: 0o444,
            uid: 0,
            gid: 0,
        },
    );
    // The kernel opens /dev/console for init before anything is mounted.
    tree.insert(
        "/dev/console",
        Node {
            kind: Kind::CharDev(5, 1),
            mode: 0o600,
            uid: 0,
            gid: 0,
        },
    );
    let initrd = tree.to_cpio();

    let mut parts: Vec<format::SectionInput> = vec![
        (sections::MANIFEST, &manifest_json, None),
        (sections::KERNEL, &kernel, Some(kernel_sha)),
        (sections::INITRD, &initrd, None),
    ];
    if let Some((bytes, sha, hashes)) = &rootfs {
        parts.push((sections::ROOTFS, bytes, Some(*sha)));
        parts.push((sections::ROOTFS_HASHES, hashes, None));
    }
    let mut image =
        format::write_image_hashed(&parts).map_err(|e| output_err(std::io::Error::other(e)))?;
    if let Some(key) = opts.sign {
        let header = format::parse_header(&image, image.len() as u64)
            .map_err(|(_, e)| output_err(std::io::Error::other(e)))?;
        let signature = key
            .sign(&header, &manifest.name)
            .map_err(|source| BuildError::Sign { source })?;
        parts.push((sections::SIGNATURE, &signature, None));
        image =
            format::write_image_hashed(&parts).map_err(|e| output_err(std::io::Error::other(e)))?;
    }
    // The image id (a pass over the whole file) while the file is written.
    let (id, written) = std::thread::scope(|s| {
        let id = s.spawn(|| -> [u8; 32] { Sha256::digest(&image).into() });
        let written = format::write_atomically(opts.output, &image);
        let id = id.join().unwrap_or_else(|_| Sha256::digest(&image).into());
        (id, written)
    });
    written.map_err(|source| BuildError::Output {
        path: opts.output.to_path_buf(),
        source,
    })?;
    // The lock is written only once the image it describes exists.
    if let (Some(new_lock), Some(r)) = (new_lock, &packages_report) {
        new_lock
            .save(&r.lock)
            .map_err(|source| BuildError::Lock { source })?;
    }
    Ok(BuildReport {
        id: format::digest_hex(&id),
        size: image.len() as u64,
        manifest,
        packages: packages_report,
    })
}

/// What the package step gives: the manifest's entries, the report, and the lock to
/// write once the image exists (when one was resolved).
type Unpacked = (
    Vec<crate::manifest::PackageInfo>,
    Option<PackagesReport>,
    Option<Lock>,
);

/// The package step: the closure from the lock (or resolved, then a new lock to
/// write), fetched, checked and unpacked into `tree` in name order.
fn closure(spec: &Spec, opts: &BuildOptions, tree: &mut Tree) -> Result<Unpacked, BuildError> {
    let file = opts.spec.to_path_buf();
    let lock_path = lock::path_for(opts.spec);
    let lock_err = |source| BuildError::Lock { source };
    let existing = if opts.update_lock {
        None
    } else {
        Lock::load(&lock_path).map_err(lock_err)?
    };
    let (locked, notes, new_lock) = match existing {
        Some(l) => {
            l.check_matches(&lock_path, &spec.packages, &spec.exclude)
                .map_err(lock_err)?;
            (l.locked, Vec::new(), None)
        }
        None => {
            let closure_err = |source| BuildError::Closure {
                file: file.clone(),
                source,
            };
            let index = Index::load_host().map_err(closure_err)?;
            let c = packages::resolve::resolve(&index, &spec.packages, &spec.exclude)
                .map_err(closure_err)?;
            let locked: Vec<LockedPackage> = c
                .packages
                .iter()
                .map(|p| LockedPackage {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    architecture: p.architecture.clone(),
                    sha256: p.sha256.clone(),
                    size: p.size,
                })
                .collect();
            let new_lock = Lock {
                version: LOCK_VERSION,
                packages: spec.packages.clone(),
                exclude: spec.exclude.clone(),
                locked: locked.clone(),
            };
            (locked, c.notes, Some(new_lock))
        }
    };
    let pkg_err = |source| BuildError::Package {
        file: file.clone(),
        source,
    };
    let debs = debs::fetch(&locked, opts.cache, opts.progress).map_err(pkg_err)?;
    opts.progress.begin(
        &format!("unpacking {} package(s)", locked.len()),
        locked.len() as u64,
        false,
    );
    let named: Vec<(String, PathBuf)> = locked.iter().map(|p| p.name.clone()).zip(debs).collect();
    let tars = debs::data_tars(&named).map_err(pkg_err)?;
    for (p, tar) in locked.iter().zip(&tars) {
        debs::unpack(&p.name, tar, tree).map_err(pkg_err)?;
        opts.progress.advance(1, &p.name);
    }
    opts.progress.end();
    let infos = locked
        .iter()
        .map(|p| crate::manifest::PackageInfo {
            name: p.name.clone(),
            version: p.version.clone(),
            sha256: p.sha256.clone(),
        })
        .collect();
    let report = PackagesReport {
        count: locked.len(),
        deb_bytes: locked.iter().map(|p| p.size).sum(),
        lock: lock_path,
        lock_written: new_lock.is_some(),
        notes,
    };
    Ok((infos, Some(report), new_lock))
}

/// The spec's tmpfs mounts, each taking the mode and owner the spec gives, else those
/// of the directory it covers in the tree (what the package made, e.g.
/// `/var/log/lighttpd` 0750 www-data), else 0755 root. The mount point is made a
/// directory in the tree (a read-only root cannot grow one at boot).
fn tmpfs_mounts(spec: &Spec, tree: &mut Tree) -> Vec<Tmpfs> {
    spec.tmpfs
        .iter()
        .map(|t| {
            let under = tree
                .get(&t.path)
                .filter(|n| matches!(n.kind, Kind::Dir))
                .map(|n| (n.mode, n.uid, n.gid));
            let (dmode, duid, dgid) = under.unwrap_or((0o755, 0, 0));
            let mode = t
                .mode
                .as_deref()
                .and_then(|m| u32::from_str_radix(m, 8).ok())
                .unwrap_or(dmode);
            let (uid, gid) = t
                .owner
                .as_deref()
                .and_then(parse_owner)
                .unwrap_or((duid, dgid));
            if under.is_none() {
                tree.insert(&t.path, dir_node(0o755));
            }
            Tmpfs {
                path: t.path.clone(),
                size_mib: t.size.map(|s| s.0),
                mode,
                uid,
                gid,
            }
        })
        .collect()
}

fn dir_node(mode: u32) -> Node {
    Node {
        kind: Kind::Dir,
        mode,
        uid: 0,
        gid: 0,
    }
}
