//! `hostd cap …`: capabilities on the wire (wiring only; the work is in `caps/`).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use hostd_caps::{CapStore, Capability};

/// Where the cap store is: `--state-dir` (the same as `hostd fn serve`'s) + `/caps`.
#[derive(Debug, clap::Args)]
pub struct StoreArg {
    /// State directory of the `hostd fn serve` that serves or uses the capabilities
    /// [default: ~/.local/state/hostd/fn]; the cap store is its `caps/` directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl StoreArg {
    fn store(&self) -> Result<CapStore> {
        let dir = self
            .state_dir
            .clone()
            .or_else(hostd_sandbox::engine::default_state_dir)
            .context("no state directory: pass --state-dir")?;
        Ok(CapStore::new(dir.join("caps")))
    }
}

/// Subcommands of `hostd cap`.
#[derive(Debug, Subcommand)]
pub enum CapCommand {
    /// Mint a new capability for SERVICE (its key pair is made on first use) and
    /// print it: whoever holds the printed value can call the service.
    New {
        /// The service: a function with `service = "SERVICE"` in its manifest.
        service: String,
        /// Where callers reach the service's `--cap-listen` address (HOST:PORT).
        #[arg(long)]
        location: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the services with their capabilities (ids only), and the capabilities held.
    Ls {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Revoke one capability by its id (or 6+ leading digits of it); the others stay valid.
    Revoke {
        /// The capability's id, as `hostd cap ls` shows it.
        id: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Hold a capability under NAME, so functions granted `capabilities = ["NAME"]`
    /// can call `http://NAME/…`.
    Add {
        /// The name functions use.
        name: String,
        /// The `hostd-cap:` value, or `-` to read it from standard input.
        cap: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// (Internal: started by `hostd run`.) Relays the vsock backend's capability
    /// connections to the capabilities held as NAMES; the listening socket is stdin.
    #[command(hide = true)]
    Relay {
        /// The capabilities, in port order.
        names: Vec<String>,
        /// The file holding this run's capability token (guest init sends it first on
        /// every capability connection).
        #[arg(long)]
        token_file: PathBuf,
        #[command(flatten)]
        store: StoreArg,
    },
}

fn out(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

/// Runs a `hostd cap` subcommand; returns the exit code.
pub fn run(cmd: CapCommand) -> Result<i32> {
    match cmd {
        CapCommand::New {
            service,
            location,
            store,
        } => {
            let cap = store
                .store()?
                .mint(&service, &location)
                .with_context(|| format!("minting a capability for {service}"))?;
            eprintln!("capability {} minted", cap.id());
            out(&format!("{}\n", cap.reveal()));
            Ok(0)
        }
        CapCommand::Ls { store } => {
            let store = store.store()?;
            let mut s = format!(
                "{:<20} {:<16} {:<8} {}\n",
                "SERVICE", "ID", "STATE", "LOCATION"
            );
            for svc in store.list()? {
                if svc.caps.is_empty() {
                    s.push_str(&format!(
                        "{:<20} {:<16} {:<8} -\n",
                        svc.service, "-", "no caps"
                    ));
                }
                for c in &svc.caps {
                    s.push_str(&format!(
                        "{:<20} {:<16} {:<8} {}\n",
                        svc.service,
                        c.id,
                        if c.revoked { "revoked" } else { "valid" },
                        c.location
                    ));
                }
            }
            let held = store.list_held()?;
            if !held.is_empty() {
                s.push_str(&format!(
                    "\n{:<20} {:<16} {:<20} {}\n",
                    "HELD AS", "ID", "SERVICE", "LOCATION"
                ));
                for (name, c) in held {
                    s.push_str(&format!(
                        "{:<20} {:<16} {:<20} {}\n",
                        name,
                        c.id(),
                        c.service,
                        c.location
                    ));
                }
            }
            out(&s);
            Ok(0)
        }
        CapCommand::Relay {
            names,
            token_file,
            store,
        } => crate::cap_relay::serve(&store.store()?, &names, &token_file),
        CapCommand::Revoke { id, store } => {
            let (service, full) = store.store()?.revoke(&id)?;
            out(&format!("{service}: capability {full} revoked\n"));
            Ok(0)
        }
        CapCommand::Add { name, cap, store } => {
            let text = if cap == "-" {
                let mut t = String::new();
                std::io::stdin()
                    .take(4096)
                    .read_to_string(&mut t)
                    .context("reading the capability from standard input")?;
                t
            } else {
                cap
            };
            let cap = Capability::parse(&text)?;
            store.store()?.hold(&name, &cap)?;
            out(&format!("holding {cap} as {name}\n"));
            Ok(0)
        }
    }
}
