//! Secrets as handles (`hostd:capabilities/secrets`). The manifest names each
//! secret and where the host reads it (a file or an environment variable of
//! the `hostd` process); the value itself never appears in the manifest. A
//! function can open only granted names, and a handle is an index into its own
//! store's resource table: it cannot be forged or carried to another request.

use wasmtime::component::Resource;

use super::bindings::hostd::capabilities::secrets;
use super::CapsView;
use crate::manifest::SecretSource;

/// An opened, granted secret.
#[derive(Debug)]
pub struct SecretHandle {
    name: String,
    source: SecretSource,
}

impl secrets::Host for CapsView<'_> {}

impl secrets::HostSecret for CapsView<'_> {
    fn open(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<SecretHandle>, secrets::Error>> {
        let Some(source) = self.caps.grants.secrets.get(&name) else {
            tracing::warn!(function = %self.caps.name, capability = %"secret", secret = %name, "denied: secret not granted");
            return Ok(Err(secrets::Error::NotGranted));
        };
        let handle = SecretHandle {
            name,
            source: source.clone(),
        };
        Ok(Ok(self.table.push(handle)?))
    }

    fn reveal(
        &mut self,
        s: Resource<SecretHandle>,
    ) -> wasmtime::Result<Result<Vec<u8>, secrets::Error>> {
        let handle = self.table.get(&s)?;
        let value = match &handle.source {
            SecretSource::File(path) => {
                crate::input::read_regular("secret", path, crate::input::MAX_SECRET_BYTES)
                    .map_err(|e| e.to_string())
            }
            SecretSource::Env(var) => std::env::var_os(var)
                .map(|v| v.into_encoded_bytes())
                .ok_or_else(|| format!("environment variable {var} is not set")),
        };
        Ok(value.map_err(|msg| {
            tracing::warn!(function = %self.caps.name, capability = %"secret", secret = %handle.name, "secret unavailable: {msg}");
            secrets::Error::Unavailable(format!("secret {:?} is unavailable on the host", handle.name))
        }))
    }

    fn drop(&mut self, s: Resource<SecretHandle>) -> wasmtime::Result<()> {
        self.table.delete(s)?;
        Ok(())
    }
}
