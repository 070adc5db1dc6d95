//! Real services from real Debian packages: a spec names only the packages it wants,
//! hostd pulls in their dependency closure from the build host's apt lists, and the
//! programs run in the guest. Assertions are on what a user sees: the service's
//! output and the VM's exit code.

mod common;

use common::{
    build, hostd, kvm_usable, require, require_qemu_guest, run_image_with, run_with_deadline,
};
use std::process::Command;
use std::time::Duration;

/// mkfs.erofs packs roots above the size threshold; apt must know the packages.
#[must_use]
fn require_packages(names: &[&str]) -> bool {
    require(
        "mkfs.erofs",
        Command::new("mkfs.erofs").arg("--help").output().is_ok(),
        "apt-get install erofs-utils",
    ) && names.iter().all(|n| {
        require(
            &format!("package {n} in the apt lists"),
            Command::new("apt-cache")
                .args(["show", "--", n])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty()),
            "apt-get update",
        )
    })
}

/// Only `python3`: its C library, loader, shared libraries and standard library come
/// from the closure. json, sqlite3 (a C extension over libsqlite3) and hashlib (over
/// libssl) all load.
const PYTHON: &str = r#"
name = "py"
packages = ["python3"]

[services.main]
command = "/usr/bin/python3"
args = ["-c", """
import json, sqlite3, hashlib
db = sqlite3.connect(':memory:')
db.execute('create table t (v text)')
db.execute('insert into t values (?)', (json.dumps({'answer': 42}),))
row = db.execute('select v from t').fetchone()[0]
print('python says', json.loads(row)['answer'], hashlib.sha256(b'abc').hexdigest()[:16], 'sqlite', sqlite3.sqlite_version)
"""]
main = true
"#;

fn python_runs_under(vmm: &str) {
    let (_dir, image) = build(PYTHON);
    let out = if vmm == "kvm" {
        // Measured here: guest init after 13-100 s (depending on the host's load),
        // python's start-up and queries about 6 minutes more.
        let mut cmd = hostd();
        cmd.args(["run", "--vmm", "kvm", "--timings", "--timeout", "1800"])
            .arg(&image);
        run_with_deadline(cmd, Duration::from_secs(1900))
    } else {
        run_image_with(vmm, &image, &[])
    };
    assert!(
        out.stdout
            .contains("[main] python says 42 ba7816bf8f01cfea sqlite 3."),
        "{}",
        out.all()
    );
    assert_eq!(out.code(), Some(0), "{}", out.all());
    // Over the size threshold, the root is the verified erofs disk, not RAM.
    assert!(
        out.stdout.contains("(erofs, read-only) mounted"),
        "{}",
        out.all()
    );
}

#[test]
fn python3_from_its_package_alone_runs_under_qemu() {
    if !require_qemu_guest() || !require_packages(&["python3"]) {
        return;
    }
    python_runs_under("qemu");
}

/// The same image under hostd's own VMM. On a nested PVM host every guest system call
/// and page fault goes through KVM's instruction emulator (docs/pvm.md), so this takes
/// minutes (about 8 measured here); the deadline is generous.
#[test]
fn python3_from_its_package_alone_runs_under_the_builtin_vmm() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM")
        || !require_qemu_guest()
        || !require_packages(&["python3"])
    {
        return;
    }
    python_runs_under("kvm");
}

/// redis-server runs as the account the spec declares (maintainer scripts, which would
/// have made it, do not run); a second service's redis-cli reaches it.
const REDIS: &str = r#"
name = "redis"
packages = ["redis-server", "redis-tools", "dash"]
# init-system-helpers depends on `usrmerge | usr-is-merged`; usrmerge brings perl.
exclude = ["usrmerge"]

[[users]]
name = "redis"
uid = 999
gid = 999
home = "/var/lib/redis"

[services.redis]
command = "/usr/bin/redis-server"
args = ["--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", "/tmp"]
user = "redis"

[services.check]
command = "/bin/dash"
args = ["-c", '''
n=0
until [ "$(redis-cli ping 2>/dev/null)" = PONG ]; do
  n=$((n+1)); [ $n -gt 5000 ] && { echo redis never answered; exit 1; }
done
echo "ping: $(redis-cli ping)"
redis-cli set greeting "hello from redis-cli" >/dev/null
echo "get: $(redis-cli get greeting)"
pid=$(redis-cli info server | while IFS=: read k v; do [ "$k" = process_id ] && echo "${v%?}"; done)
while read k v rest; do [ "$k" = Uid: ] && echo "redis-server uid: $v"; done < /proc/$pid/status
grep_user() { while IFS=: read n x uid rest; do [ "$n" = redis ] && echo "passwd: redis $uid"; done < /etc/passwd; }
grep_user
exit 0
''']
main = true
depends_on = ["redis"]
"#;

#[test]
fn redis_runs_as_its_declared_user_and_answers_redis_cli() {
    if !require_qemu_guest() || !require_packages(&["redis-server", "redis-tools", "dash"]) {
        return;
    }
    let (dir, image) = build(REDIS);
    let out = run_image_with("qemu", &image, &[]);
    for want in [
        "[redis] ",
        "Ready to accept connections",
        "[check] ping: PONG",
        "[check] get: hello from redis-cli",
        "[check] redis-server uid: 999",
        "[check] passwd: redis 999",
    ] {
        assert!(
            out.stdout.contains(want),
            "missing {want:?}:\n{}",
            out.all()
        );
    }
    assert_eq!(out.code(), Some(0), "{}", out.all());
    // The exclusion held: the lock names usr-is-merged, not usrmerge or perl.
    let lock = std::fs::read_to_string(dir.path().join("app.lock")).expect("app.lock");
    assert!(lock.contains("name = \"usr-is-merged\""), "{lock}");
    assert!(!lock.contains("name = \"usrmerge\""), "{lock}");
    assert!(!lock.contains("name = \"perl\""), "{lock}");
}
