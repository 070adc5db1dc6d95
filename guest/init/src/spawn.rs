//! Starting a program for a boot step or service: user, environment, working
//! directory, its own process group, output to the console relay.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Resolves `root`, `uid`, `uid:gid`, or a name from `passwd` (the text of /etc/passwd).
pub fn resolve_user(spec: &str, passwd: &str) -> Result<User, String> {
    if spec == "root" {
        return Ok(User {
            uid: 0,
            gid: 0,
            home: "/root".into(),
        });
    }
    let numeric = |s: &str| s.parse::<u32>().ok();
    if let Some((u, g)) = spec.split_once(':') {
        if let (Some(uid), Some(gid)) = (numeric(u), numeric(g)) {
            return Ok(User {
                uid,
                gid,
                home: "/".into(),
            });
        }
    }
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && (f[0] == spec || Some(f[2]) == Some(spec)) {
            if let (Some(uid), Some(gid)) = (numeric(f[2]), numeric(f[3])) {
                return Ok(User {
                    uid,
                    gid,
                    home: f[5].to_string(),
                });
            }
        }
    }
    if let Some(uid) = numeric(spec) {
        return Ok(User {
            uid,
            gid: uid,
            home: "/".into(),
        });
    }
    if spec == "nobody" {
        return Ok(User {
            uid: 65534,
            gid: 65534,
            home: "/".into(),
        });
    }
    Err(format!(
        "unknown user `{spec}` (not in /etc/passwd; use `uid:gid`)"
    ))
}

/// A pipe, both ends close-on-exec: (read, write).
pub(crate) fn pipe() -> std::io::Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let read = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

/// Starts `argv` as `user` in its own process group with stdout and stderr relayed to
/// the console as `[name] …`. Returns the pid and the output relay. With `secrets`
/// (set once secrets were delivered), the program runs in a mount and a PID namespace
/// of its own whose /run/secrets is the given store directory (None: an empty one)
/// and, with `caps` (set once capability sockets were offered), whose /run/hostd/caps
/// is the given socket directory (None: nothing); see `isolate.rs`.
pub fn spawn(
    name: &str,
    argv: &[String],
    env: &BTreeMap<String, String>,
    user: &str,
    workdir: &str,
    secrets: Option<Option<&str>>,
    caps: Option<Option<&str>>,
) -> Result<(i32, crate::console::Relay), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let user = resolve_user(user, &passwd)?;
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let (read, write) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let write2 = write.try_clone().map_err(|e| format!("pipe: {e}"))?;
    if secrets.is_none() && user.uid == 0 && user.gid == 0 {
        // As root and outside the namespaces: without a fork (vspawn.rs).
        let mut vars = BTreeMap::new();
        vars.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        vars.insert("HOME".to_string(), user.home.clone());
        vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let pid = crate::vspawn::spawn(program, args, &vars, workdir, &write, &write2)
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        // Close our copies of the write ends so the relay sees EOF when the child exits.
        drop((write, write2));
        return Ok((pid, crate::console::relay(name, read)));
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &user.home)
        .envs(env)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2))
        .process_group(0);
    match secrets {
        Some(granted) => {
            // The mounts need root: the namespaced child changes uid and gid itself
            // afterwards, and clears its signal mask.
            let view = crate::isolate::SecretsView {
                granted: granted.map(str::to_string),
                caps: caps.map(|c| c.map(str::to_string)),
                uid: user.uid,
                gid: user.gid,
            };
            crate::isolate::child_isolated(
                &mut cmd,
                &view,
                hostd_images::abi::SECRETS_DIR,
                crate::secrets::STORE,
            )
            .map_err(|e| format!("secrets: {e}"))?;
        }
        None => {
            crate::sys::child_unblocks_signals(&mut cmd);
            cmd.uid(user.uid).gid(user.gid);
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    // Close our copies of the write ends so the relay sees EOF when the child exits.
    drop(cmd);
    let relay = crate::console::relay(name, read);
    // The child is reaped by the supervisor's waitpid(-1); dropping `Child` neither
    // waits nor kills.
    Ok((child.id() as i32, relay))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/false\n";

    #[test]
    fn users() {
        assert_eq!(
            resolve_user("root", ""),
            Ok(User {
                uid: 0,
                gid: 0,
                home: "/root".into()
            })
        );
        assert_eq!(
            resolve_user("www", PASSWD).map(|u| (u.uid, u.gid)),
            Ok((33, 34))
        );
        assert_eq!(
            resolve_user("1000:1001", "").map(|u| (u.uid, u.gid)),
            Ok((1000, 1001))
        );
        assert_eq!(
            resolve_user("1000", "").map(|u| (u.uid, u.gid)),
            Ok((1000, 1000))
        );
        assert_eq!(resolve_user("nobody", "").map(|u| u.uid), Ok(65534));
        assert!(resolve_user("ghost", PASSWD).is_err());
    }
}
