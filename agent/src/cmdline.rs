//! microVM settings from the kernel command line (`/proc/cmdline`).
//!
//! Every key starts with `hearth.`; the kernel keeps dotted keys away from
//! init's environment, and other keys are none of our business.
//!
//! | key                  | default                  | meaning                                           |
//! |----------------------|--------------------------|---------------------------------------------------|
//! | `hearth.channel`     | `virtio-port:hearth.agent` | `virtio-port:<name>` (QEMU) or `vsock:<port>` (Firecracker) |
//! | `hearth.runtime`     | `/dev/vda`               | block device of the read-only runtime image (the new root) |
//! | `hearth.code`        | `/dev/vdb`               | block device of the read-only code image, mounted at `/var/task`; `none` to skip |
//! | `hearth.fstype`      | `ext4`                   | filesystem type of both images                    |
//! | `hearth.modules`     | `/modules`               | initramfs directory with `order` and the `.ko` files |
//! | `hearth.tmp_mb`      | `64`                     | size of the tmpfs at `/tmp` (1..=65536)           |
//! | `hearth.wait_ms`     | `5000`                   | how long to wait for devices and the port (<= 60000) |
//! | `hearth.node`        | `/usr/bin/node`          | Node.js binary inside the runtime image           |
//! | `hearth.shim`        | `/hearth/bootstrap.js`   | runtime shim inside the runtime image             |
//! | `hearth.api`         | (none: Node.js)          | `provided` or `python3`: serve the Lambda Runtime API to that runtime instead |
//!
//! Values may be double-quoted. A key given twice takes its last value, as
//! the kernel does; anything after a lone `--` belongs to init's argv and is
//! ignored here.

use std::fmt;
use std::path::PathBuf;

use crate::channel::ChannelSpec;
use crate::rapi::Kind;

/// Upper bound for `hearth.tmp_mb`.
pub const TMP_MB_MAX: u32 = 65536;
/// Upper bound for `hearth.wait_ms`.
pub const WAIT_MS_MAX: u64 = 60_000;

/// Everything the microVM boot needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub channel: ChannelSpec,
    pub runtime_dev: PathBuf,
    pub code_dev: Option<PathBuf>,
    pub fstype: String,
    pub modules_dir: PathBuf,
    pub tmp_mb: u32,
    pub wait_ms: u64,
    pub node: PathBuf,
    pub shim: PathBuf,
    /// Not Node.js: the runtime the agent serves the Runtime API to.
    pub api: Option<Kind>,
}

impl Default for VmConfig {
    fn default() -> VmConfig {
        VmConfig {
            channel: ChannelSpec::VirtioPort("hearth.agent".to_string()),
            runtime_dev: PathBuf::from("/dev/vda"),
            code_dev: Some(PathBuf::from("/dev/vdb")),
            fstype: "ext4".to_string(),
            modules_dir: PathBuf::from("/modules"),
            tmp_mb: 64,
            wait_ms: 5000,
            node: PathBuf::from("/usr/bin/node"),
            shim: PathBuf::from("/hearth/bootstrap.js"),
            api: None,
        }
    }
}

/// A `hearth.*` key with a value the agent cannot use.
#[derive(Debug, PartialEq, Eq)]
pub struct CmdlineError {
    pub key: String,
    pub value: String,
    pub why: &'static str,
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel command line {}={:?}: {}",
            self.key, self.value, self.why
        )
    }
}

impl std::error::Error for CmdlineError {}

/// Parses the command line; unknown `hearth.*` keys come back as warnings.
pub fn parse(cmdline: &str) -> Result<(VmConfig, Vec<String>), CmdlineError> {
    let mut cfg = VmConfig::default();
    let mut warnings = Vec::new();
    for (key, value) in split_params(cmdline) {
        let Some(name) = key.strip_prefix("hearth.") else {
            continue;
        };
        let bad = |why| CmdlineError {
            key: key.clone(),
            value: value.clone().unwrap_or_default(),
            why,
        };
        let Some(value) = value.as_deref() else {
            warnings.push(format!("ignoring {key} without a value"));
            continue;
        };
        let path = |v: &str| {
            if v.starts_with('/') {
                Ok(PathBuf::from(v))
            } else {
                Err(bad("expected an absolute path"))
            }
        };
        match name {
            "channel" => {
                cfg.channel = parse_channel(value)
                    .ok_or_else(|| bad("expected virtio-port:<name> or vsock:<port>"))?
            }
            "runtime" => cfg.runtime_dev = path(value)?,
            "code" => {
                cfg.code_dev = if value == "none" {
                    None
                } else {
                    Some(path(value)?)
                }
            }
            "fstype" if !value.is_empty() => cfg.fstype = value.to_string(),
            "fstype" => return Err(bad("expected a filesystem type")),
            "modules" => cfg.modules_dir = path(value)?,
            "tmp_mb" => {
                cfg.tmp_mb = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=TMP_MB_MAX).contains(n))
                    .ok_or_else(|| bad("expected a size in MiB from 1 to 65536"))?
            }
            "wait_ms" => {
                cfg.wait_ms = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= WAIT_MS_MAX)
                    .ok_or_else(|| bad("expected milliseconds from 0 to 60000"))?
            }
            "node" => cfg.node = path(value)?,
            "shim" => cfg.shim = path(value)?,
            "api" => {
                cfg.api =
                    Some(Kind::parse(value).ok_or_else(|| bad("expected provided or python3"))?)
            }
            _ => warnings.push(format!("ignoring unknown key {key}")),
        }
    }
    Ok((cfg, warnings))
}

fn parse_channel(v: &str) -> Option<ChannelSpec> {
    if let Some(name) = v.strip_prefix("virtio-port:") {
        return (!name.is_empty()).then(|| ChannelSpec::VirtioPort(name.to_string()));
    }
    let port: u32 = v.strip_prefix("vsock:")?.parse().ok()?;
    // u32::MAX is VMADDR_PORT_ANY, which is not a port one can be reached on.
    (port != u32::MAX).then_some(ChannelSpec::Vsock(port))
}

/// Splits a command line into `key[=value]` parameters the way the kernel
/// does: whitespace separates, double quotes group and are removed.
fn split_params(cmdline: &str) -> Vec<(String, Option<String>)> {
    let mut params = Vec::new();
    let mut chars = cmdline.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut word = String::new();
        let mut quoted = false;
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() && !quoted {
                break;
            }
            chars.next();
            if c == '"' {
                quoted = !quoted;
            } else {
                word.push(c);
            }
        }
        if word == "--" {
            break;
        }
        params.push(match word.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (word, None),
        });
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_when_no_hearth_keys_are_given() {
        let (cfg, warnings) = parse("console=ttyS0 panic=-1 rdinit=/init quiet\n").unwrap();
        assert_eq!(cfg, VmConfig::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn every_key_is_read() {
        let line = "console=ttyS0 hearth.channel=vsock:5000 hearth.runtime=/dev/vdc hearth.code=none \
                    hearth.fstype=ext2 hearth.modules=/lib/mods hearth.tmp_mb=256 hearth.wait_ms=100 \
                    hearth.node=/opt/node/bin/node \"hearth.shim=/opt/my shim.js\" hearth.api=python3";
        let (cfg, warnings) = parse(line).unwrap();
        assert_eq!(
            cfg,
            VmConfig {
                channel: ChannelSpec::Vsock(5000),
                runtime_dev: "/dev/vdc".into(),
                code_dev: None,
                fstype: "ext2".into(),
                modules_dir: "/lib/mods".into(),
                tmp_mb: 256,
                wait_ms: 100,
                node: "/opt/node/bin/node".into(),
                shim: "/opt/my shim.js".into(),
                api: Some(Kind::Python3),
            }
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn quotes_last_value_wins_and_argv_after_dashes_is_ignored() {
        let (cfg, _) = parse(r#"hearth.channel=virtio-port:"my port" hearth.tmp_mb=8 hearth.tmp_mb=16 -- hearth.tmp_mb=99"#).unwrap();
        assert_eq!(cfg.channel, ChannelSpec::VirtioPort("my port".into()));
        assert_eq!(cfg.tmp_mb, 16);
    }

    #[test]
    fn bad_values_are_errors_and_unknown_keys_warnings() {
        for bad in [
            "hearth.channel=tcp:1",
            "hearth.channel=vsock:x",
            "hearth.channel=vsock:4294967295",
            "hearth.channel=virtio-port:",
            "hearth.tmp_mb=0",
            "hearth.tmp_mb=65537",
            "hearth.wait_ms=600000",
            "hearth.runtime=vda",
            "hearth.fstype=",
            "hearth.api=ruby",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(bad.starts_with(&err.key), "{bad}: {err}");
        }
        let (_, warnings) = parse("hearth.colour=blue hearth.tmp_mb").unwrap();
        assert_eq!(
            warnings,
            vec![
                "ignoring unknown key hearth.colour",
                "ignoring hearth.tmp_mb without a value"
            ]
        );
    }
}
