#!/usr/bin/env python3
"""Writes the hand-made seed inputs under fuzz/regressions/<target>/seed-*: one valid,
meaningful input per target (a full request, a proper bring-up, a real image header...)
so that the fuzzer starts past the first checks. The files are committed; run this
again only when a target's input layout changes (see each harness's documentation)."""
import hashlib
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "regressions")


def save(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


class Mem:
    """Guest memory contents being laid out."""

    def __init__(self):
        self.b = bytearray()

    def put(self, addr, data):
        if len(self.b) < addr + len(data):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr:addr + len(data)] = data

    def desc(self, table, i, addr, length, flags, nxt=0):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def avail(self, ring, heads):
        self.put(ring, struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads))


NEXT, WRITE = 1, 2

# block_chain: [flags][guest memory]; 16 descriptors at 0, avail 0x100, used 0x200.
for kind, name in [(0, "read"), (1, "write")]:
    m = Mem()
    m.desc(0, 0, 0x1000, 16, NEXT, 1)
    m.desc(0, 1, 0x2000, 512, NEXT | (WRITE if kind == 0 else 0), 2)
    m.desc(0, 2, 0x3000, 1, WRITE)
    m.avail(0x100, [0])
    m.put(0x1000, struct.pack("<IIQ", kind, 0, 3))
    m.put(0x2000, bytes(range(256)) * 2)
    m.put(0x3000, b"\xff")
    save("block_chain", name, bytes([0x12 | (1 if kind == 0 else 0)]) + bytes(m.b))

# net_chain: [features][rx size][tx size][n frames][lens][guest memory]; rx rings at 0,
# tx at 0x800. Features 3: version 1 with every offload and mergeable buffers.
m = Mem()
m.desc(0, 0, 0x2000, 1526, WRITE)
m.avail(0x200, [0])
m.desc(0x800, 0, 0x1000, 12 + 60, 0)
m.avail(0xa00, [0])
m.put(0x1000, bytes(12) + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(46))
save("net_chain", "tx-and-rx", bytes([0, 15, 15, 1]) + struct.pack("<H", 64) + bytes(m.b))
# A TCP/IPv4 segment with a partial checksum, as a Linux guest sends it with TSO.
m.put(0x1000, bytes([1, 1]) + struct.pack("<HHHHH", 54, 1448, 34, 16, 0) + b"\xff" * 6
      + b"\x02" * 6 + b"\x08\x00" + bytes(46))
save("net_chain", "tso", bytes([3, 15, 15, 1]) + struct.pack("<H", 64) + bytes(m.b))


def vsock_hdr(op, src_port, dst_port, payload=b"", src=3, dst=2, buf_alloc=65536, fwd=0):
    return struct.pack("<QQIIIHHIII", src, dst, src_port, dst_port, len(payload), 1, op, 0, buf_alloc, fwd) + payload


# vsock_chain: [rx size][tx size][n][per packet: u16 len, bytes]...[guest memory].
REQUEST, RW = 1, 5
pkts = [vsock_hdr(REQUEST, 5000, 1026), vsock_hdr(RW, 5000, 1026, b"ping"), vsock_hdr(REQUEST, 5001, 1025)]
head = bytes([15, 15, len(pkts)]) + b"".join(struct.pack("<H", len(p)) + p for p in pkts)
m = Mem()
m.desc(0, 0, 0x2000, 44 + 256, WRITE)
m.avail(0x200, [0])
m.desc(0x800, 0, 0x1000, 44 + 4, 0)
m.avail(0xa00, [0])
m.put(0x1000, vsock_hdr(RW, 5000, 1026, b"pong"))
save("vsock_chain", "echo-and-secrets", head + bytes(m.b))

# virtio_mmio: [flags][n ops][ops: kind, offset u16, width, value u32][guest memory];
# flags bit 0: bring-up with queue size (flags >> 1) + 1 and rings at 0x1000/0x2000/0x3000.
m = Mem()
m.desc(0x1000, 0, 0x4000, 16, WRITE)
m.avail(0x2000, [0])
ops = [(1, 0x050, 2, 0), (0, 0x060, 2, 0), (1, 0x064, 2, 1), (1, 0x070, 2, 0)]
save("virtio_mmio", "bring-up-and-notify",
     bytes([1 | (3 << 1), len(ops)]) + b"".join(struct.pack("<BHBI", *o) for o in ops) + bytes(m.b))


def pvh_elf():
    """A minimal ELF64 vmlinux: one PT_LOAD at 1 MiB and a XEN_ELFNOTE_PHYS32_ENTRY note."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000)
    code = b"\xf4" * 16  # hlt
    ehsize, phsize = 64, 56
    off_note = ehsize + 2 * phsize
    off_code = off_note + len(note)
    eh = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    eh += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, ehsize, 0, 0, ehsize, phsize, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, off_code, 0x100000, 0x100000, len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, off_note, 0, 0, len(note), len(note), 4)
    return eh + load + pnote + note + code


def image(sections):
    """An image as images/src/format.rs writes it."""
    block, table = 4096, []
    offset = block
    for name, data in sections:
        table.append((name, offset, len(data), hashlib.sha256(data).digest()))
        offset = (offset + len(data) + block - 1) // block * block
    out = bytearray(offset)
    out[0:8] = b"HOSTDIMG"
    out[8:24] = struct.pack("<IIQ", 1, len(table), offset)
    for i, (name, off, length, digest) in enumerate(table):
        e = 64 + 64 * i
        out[e:e + len(name)] = name.encode()
        out[e + 16:e + 64] = struct.pack("<QQ", off, length) + digest
    out[block - 32:block] = hashlib.sha256(out[:block - 32]).digest()
    for (name, data), (_, off, length, _) in zip(sections, table):
        out[off:off + length] = data
    return bytes(out)


MANIFEST = {
    "schema": 1,
    "name": "web",
    "hostname": "web",
    "vcpus": 2,
    "memory_mib": 256,
    "cmdline": "quiet",
    "kernel": {"format": "elf", "sha256": "00" * 32},
    "packages": [{"name": "busybox-static", "version": "1:1.35.0-4+b3", "sha256": "11" * 32}],
    "boot": [{"name": "mkdirs", "argv": ["/bin/mkdir", "-p", "/data/www"], "env": {"PATH": "/bin"}, "user": "root"}],
    "services": {
        "db": {"argv": ["/bin/db"], "env": {}, "user": "1000:1000", "workdir": "/data", "restart": "always",
               "depends_on": [], "main": False, "secrets": ["db_password"]},
        "web": {"argv": ["/bin/busybox", "httpd", "-f"], "env": {"PORT": "80"}, "user": "www-data", "workdir": "/",
                "restart": "on-failure", "depends_on": ["db"], "main": True, "secrets": []},
    },
    "volumes": [{"name": "data", "size_mib": 64, "mount": "/data"}],
    "stop_timeout_secs": 5,
    "root": {"fs": "erofs", "size": 8192, "block_size": 4096, "sha256": "22" * 32},
}
manifest = (json.dumps(MANIFEST, indent=2) + "\n").encode()
save("manifest_json", "full", manifest)
MANIFEST.pop("root")
save("manifest_json", "initrd-root", json.dumps(MANIFEST).encode())

elf = pvh_elf()
save("image_and_kernel", "pvh.elf", elf)
save("image_and_kernel", "image-head.img", image([("manifest", manifest), ("kernel", elf), ("initrd", b"07070100")])[:8192])

os.makedirs(os.path.join(OUT, "spec_toml"), exist_ok=True)
for ex in ["hello.toml", "web.toml"]:
    shutil.copy(os.path.join(HERE, "..", "images", "examples", ex), os.path.join(OUT, "spec_toml", "seed-" + ex))
save("spec_toml", "everything.toml", b'''name = "all.of-it"
hostname = "all"
kernel = "default"
cmdline = "quiet"
vcpus = 2
memory = "1G"
stop_timeout = 10
packages = ["busybox-static", "ca-certificates=20230311"]
root = "erofs"

[[files]]
path = "/etc/motd"
contents = "hi\\n"
mode = "0644"
owner = "0:0"

[[files]]
path = "/srv"
directory = true

[[files]]
path = "/bin/sh"
symlink = "busybox"

[[boot]]
name = "prepare"
command = "/bin/busybox"
args = ["mkdir", "-p", "/data/www"]
env = { PATH = "/bin" }
user = "root"

[services.db]
command = "/bin/db"
user = "1000:1000"
workdir = "/data"
restart = "always"
secrets = ["db_password"]

[services.web]
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "80"]
env = { PORT = "80" }
restart = "on-failure"
depends_on = ["db"]
main = true

[[volumes]]
name = "data"
size = "64M"
mount = "/data"
''')

# vhost_user_frontend: header, then operations (see harness/vhost_user_frontend.rs).
RING = (1 << 28) | (1 << 29)
header = bytes([7]) + struct.pack("<QQ", RING, 0) + bytes([1, 2, 0, 8]) + bytes(range(8))
BRING_UP, RESET, NOTIFY, CONTROL = 2, 4, 5, 6
bring_up = bytes([BRING_UP]) + struct.pack("<Q", (1 << 64) - 1) + bytes([0b11, 4, 4])
ops = bring_up + bytes([CONTROL, NOTIFY, 0, RESET, CONTROL]) + bring_up + bytes([CONTROL, NOTIFY, 1])
save("vhost_user_frontend", "bring-up-reset-bring-up", header + ops)
header_dies = bytes([7]) + struct.pack("<QQ", RING, 0) + bytes([1, 2, 12, 0])
save("vhost_user_frontend", "backend-dies", header_dies + bring_up + bytes([CONTROL]))


def oci_archive_seed():
    """A valid two-layer OCI archive (one gzip layer, one plain with a whiteout)."""
    import gzip
    import hashlib
    import io
    import json
    import tarfile

    def tar_of(entries):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    blobs = {}

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return "sha256:" + d, len(data)

    l1 = gzip.compress(tar_of([("etc/a", b"a\n"), ("etc/b", b"b\n")]), mtime=0)
    l2 = tar_of([("etc/.wh.a", b""), ("etc/c", b"c\n")])
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cd, cs = blob(cfg)
    d1, s1 = blob(l1)
    d2, s2 = blob(l2)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d1, "size": s1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d2, "size": s2},
        ],
    }).encode()
    md, ms = blob(manifest)
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    entries = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
    entries += [("blobs/sha256/" + d, data) for d, data in sorted(blobs.items())]
    return tar_of(entries)


save("oci_archive", "two-layers.tar", oci_archive_seed())
# debian_packages/seed-apt-stanzas is `apt-cache show --no-all-versions busybox-static
# libc6 libgcc-s1 gcc-12-base` from a Debian 12 host; lock_toml/seed-redis.lock is
# images/examples/redis.lock.
