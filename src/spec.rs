//! [`FunctionSpec`]: a deployed function's settings as plain data.
//!
//! Nearly a leaf (it names a [`crate::runtime::RuntimeKind`]): the control plane builds it at deploy, the registry stores it as `meta.json`
//! ([`crate::functions::store`]), the backends in [`crate::sandbox`] start instances from it.
//! It lives apart from all three so the backends need not import the function registry.

use serde::{Deserialize, Serialize};

use crate::runtime::RuntimeKind;

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
    /// A unique name (Lambda's `FunctionName`); `/f/<name>/…` serves it like its id.
    /// Deploying under a taken name replaces that function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the Lambda service API stores and shows but hearth does not act on.
    #[serde(default)]
    pub service: ServiceMeta,
    /// The language runtime (absent in `meta.json`: Node.js).
    #[serde(default, skip_serializing_if = "RuntimeKind::is_nodejs")]
    pub runtime: RuntimeKind,
}

impl FunctionSpec {
    /// A Node.js function limited to one instance: where hearth places
    /// instances beside their worker (`ServeConfig::instances_beside`), its
    /// instance's main threads run on the CPU after its worker's, and its
    /// collector's helper threads on the worker's
    /// (`functions::sched::SchedConfig::instance_cpus`). The one rule both the
    /// scheduler (placement) and the process backend (Node's flags at spawn,
    /// before any core holds the instance) read.
    pub fn runs_beside_its_worker(&self) -> bool {
        self.concurrency == 1 && self.runtime.is_nodejs()
    }
}

/// Lambda configuration fields kept for the service API (`Runtime`, `Role`, …).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceMeta {
    /// `Runtime` as given, e.g. `nodejs20.x` (what runs is [`FunctionSpec::runtime`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// `Role`: an IAM role ARN, stored as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `Description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `CodeSha256`: base64 of the SHA-256 of the deployed zip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_sha256: Option<String>,
    /// The published version this function is (`None`: `$LATEST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}
