//! [`FunctionSpec`]: a deployed function's settings as plain data.
//!
//! A leaf: the control plane builds it at deploy, the registry stores it as `meta.json`
//! ([`crate::functions::store`]), the backends in [`crate::sandbox`] start instances from it.
//! It lives apart from all three so the backends need not import the function registry.

use serde::{Deserialize, Serialize};

/// A deployed function's settings, stored as `meta.json` in its directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// 16 lower-case hex digits.
    pub id: String,
    /// `file.export` of the handler, relative to the code directory.
    pub handler: String,
    /// Memory limit of one instance.
    pub memory_mb: u32,
    /// Longest an invocation may run.
    pub timeout_ms: u64,
    /// Most instances alive at once, over all cores.
    pub concurrency: u32,
    /// Environment variables given to the handler, in deploy order.
    pub env: Vec<(String, String)>,
    /// When it was deployed, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Bytes of the unpacked code.
    pub code_bytes: u64,
    /// Name of the backend that runs it (`process`, `qemu`).
    pub backend: String,
}
