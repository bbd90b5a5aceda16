//! Which language runtime a function uses (the deploy setting `runtime`): Node.js through
//! the framed shim, or a program speaking the Lambda Runtime API that the guest agent serves
//! (`provided`, `python3`). Lambda's runtime names are accepted as aliases.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A function's runtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Node.js, through hearth's framed shim (the fast path).
    #[default]
    Nodejs,
    /// The function's own executable `bootstrap` (Lambda's `provided.al2023`).
    Provided,
    /// hearth's Python bootstrap calling a `file.function` handler.
    Python3,
}

/// What the `runtime` setting accepts, for messages.
pub const SUPPORTED: &str = "nodejs (aliases nodejs18.x, nodejs20.x, nodejs22.x, …), provided \
     (provided.al2023, provided.al2), python3 (python3.9 … python3.13; the host's /usr/bin/python3 runs them)";

/// Handler recorded for a Python function deployed without one (the Lambda console's).
pub const PYTHON_DEFAULT_HANDLER: &str = "lambda_function.lambda_handler";
/// Handler recorded for a `provided` function deployed without one (`_HANDLER` is the
/// bootstrap's to interpret).
pub const PROVIDED_DEFAULT_HANDLER: &str = "bootstrap";

impl RuntimeKind {
    /// Reads a runtime name: hearth's own or one of Lambda's identifiers.
    pub fn parse(name: &str) -> Result<RuntimeKind, String> {
        let versioned = |prefix: &str| {
            name.strip_prefix(prefix).is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .split('.')
                        .all(|p| p.bytes().all(|b| b.is_ascii_digit()) || p == "x")
            })
        };
        match name {
            "nodejs" => Ok(RuntimeKind::Nodejs),
            "provided" | "provided.al2" | "provided.al2023" => Ok(RuntimeKind::Provided),
            "python3" => Ok(RuntimeKind::Python3),
            n if versioned("nodejs") && n.ends_with(".x") => Ok(RuntimeKind::Nodejs),
            n if versioned("python3.") && !n.ends_with(".x") => Ok(RuntimeKind::Python3),
            _ => Err(format!(
                "runtime '{}' is not supported; supported: {SUPPORTED}",
                name.escape_debug()
            )),
        }
    }

    /// hearth's name for it.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Nodejs => "nodejs",
            RuntimeKind::Provided => "provided",
            RuntimeKind::Python3 => "python3",
        }
    }

    /// The Runtime API session kind serving this runtime; `None` for Node.js.
    pub fn api_kind(self) -> Option<hearth_rapi::api::Kind> {
        match self {
            RuntimeKind::Nodejs => None,
            RuntimeKind::Provided => Some(hearth_rapi::api::Kind::Provided),
            RuntimeKind::Python3 => Some(hearth_rapi::api::Kind::Python3),
        }
    }

    /// Whether this is the default, Node.js (not written to `meta.json`).
    pub fn is_nodejs(&self) -> bool {
        *self == RuntimeKind::Nodejs
    }

    /// For runtimes other than Node.js: checks the unpacked code for what the runtime will
    /// start and returns the handler to record (`explicit` or a default).
    pub fn check_code(self, code_dir: &Path, explicit: Option<&str>) -> Result<String, String> {
        match self {
            RuntimeKind::Nodejs => Err("Node.js handlers are resolved by control::handler".into()),
            RuntimeKind::Provided => {
                let bootstrap = code_dir.join("bootstrap");
                match std::fs::metadata(&bootstrap) {
                    Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                    Ok(m) if m.is_file() => {
                        return Err(
                            "the runtime 'provided' runs the file 'bootstrap' at the top of \
                                    the zip, and it is not executable (zip it with mode 0755)"
                                .into(),
                        )
                    }
                    _ => {
                        return Err(
                            "the runtime 'provided' runs an executable 'bootstrap' at the \
                                    top of the zip, and there is none"
                                .into(),
                        )
                    }
                }
                Ok(explicit.unwrap_or(PROVIDED_DEFAULT_HANDLER).to_string())
            }
            RuntimeKind::Python3 => {
                let handler = explicit.unwrap_or(PYTHON_DEFAULT_HANDLER);
                let bad = |why: &str| format!("handler '{}' {why}", handler.escape_debug());
                let (module, function) = handler
                    .rsplit_once('.')
                    .filter(|(m, f)| !m.is_empty() && !f.is_empty())
                    .ok_or_else(|| bad("is not of the form <module>.<function>, e.g. lambda_function.lambda_handler"))?;
                if module.split(['/', '.']).any(|p| p.is_empty() || p == "..")
                    || !function
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(bad("is not a usable Python module path and function name"));
                }
                let rel = module.replace('.', "/");
                let file = code_dir.join(format!("{rel}.py"));
                let package = code_dir.join(&rel).join("__init__.py");
                if !file.is_file() && !package.is_file() {
                    return Err(bad(&format!("needs {rel}.py in the code, and none exists")));
                }
                Ok(handler.to_string())
            }
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_names_are_aliases() {
        for (name, kind) in [
            ("nodejs", RuntimeKind::Nodejs),
            ("nodejs20.x", RuntimeKind::Nodejs),
            ("nodejs18.x", RuntimeKind::Nodejs),
            ("provided", RuntimeKind::Provided),
            ("provided.al2023", RuntimeKind::Provided),
            ("provided.al2", RuntimeKind::Provided),
            ("python3", RuntimeKind::Python3),
            ("python3.12", RuntimeKind::Python3),
            ("python3.9", RuntimeKind::Python3),
        ] {
            assert_eq!(RuntimeKind::parse(name), Ok(kind), "{name}");
        }
        for bad in [
            "",
            "java21",
            "ruby3.3",
            "go1.x",
            "python2.7",
            "python3.",
            "python3.x",
            "nodejs20",
            "nodejsx",
            "PYTHON3",
        ] {
            let err = RuntimeKind::parse(bad).unwrap_err();
            assert!(err.contains("supported: nodejs"), "{bad}: {err}");
        }
    }

    #[test]
    fn serde_names_are_hearths() {
        assert_eq!(
            serde_json::to_string(&RuntimeKind::Python3).unwrap(),
            "\"python3\""
        );
        let k: RuntimeKind = serde_json::from_str("\"provided\"").unwrap();
        assert_eq!(k, RuntimeKind::Provided);
    }

    #[test]
    fn code_is_checked_per_runtime() {
        let dir = std::env::temp_dir().join(format!("hearth-kind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pkg/sub")).unwrap();
        let p = RuntimeKind::Provided;
        assert!(p
            .check_code(&dir, None)
            .unwrap_err()
            .contains("there is none"));
        std::fs::write(dir.join("bootstrap"), "#!/bin/sh\n").unwrap();
        assert!(p
            .check_code(&dir, None)
            .unwrap_err()
            .contains("not executable"));
        std::fs::set_permissions(
            dir.join("bootstrap"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(p.check_code(&dir, None).unwrap(), "bootstrap");
        assert_eq!(p.check_code(&dir, Some("x.y")).unwrap(), "x.y");

        let py = RuntimeKind::Python3;
        assert!(py
            .check_code(&dir, None)
            .unwrap_err()
            .contains("lambda_function.py"));
        std::fs::write(dir.join("lambda_function.py"), "").unwrap();
        assert_eq!(py.check_code(&dir, None).unwrap(), PYTHON_DEFAULT_HANDLER);
        std::fs::write(dir.join("pkg/sub/app.py"), "").unwrap();
        assert!(py.check_code(&dir, Some("pkg/sub/app.handler")).is_ok());
        assert!(py.check_code(&dir, Some("pkg.sub.app.handler")).is_ok());
        for bad in [
            "nodot",
            "../x.h",
            "a.",
            ".h",
            "lambda_function.bad-name",
            "missing.handler",
        ] {
            assert!(py.check_code(&dir, Some(bad)).is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
