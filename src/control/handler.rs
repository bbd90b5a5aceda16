//! Which function in the unpacked code answers invocations: the Lambda-style handler string.
//!
//! A handler is `<file>.<export>`: `app.handler` is the export `handler` of `app.js` (or `.mjs`,
//! `.cjs`), `src/api.main` the export `main` of `src/api.js`. The last '.' splits the two, so a
//! file name may itself contain dots (`my.module.handler`). Other runtimes check their own
//! entry points ([`RuntimeKind::check_code`]); [`resolve`] picks.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::runtime::RuntimeKind;
use crate::sandbox::Backend;

/// Longest handler string accepted (Lambda's limit).
pub const HANDLER_BYTES_MAX: usize = 128;
/// Source extensions tried, in order, for the file part of a handler.
const EXTENSIONS: [&str; 3] = ["js", "mjs", "cjs"];
/// Largest `package.json` read when guessing the handler from its `main`.
const PACKAGE_JSON_BYTES_MAX: u64 = 1024 * 1024;
/// Export used when the handler is guessed.
const DEFAULT_EXPORT: &str = "handler";

/// Why no handler could be resolved; deploy answers 400 with code "bad_handler".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What is wrong and what to do about it.
    pub message: String,
}

impl HandlerError {
    fn new(message: String) -> Self {
        HandlerError { message }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

/// The handler to record for a function of `runtime` whose code is unpacked at `code_dir`:
/// Node.js handlers are resolved by [`resolve_handler`], other runtimes check their own
/// entry point. The error is a deploy's 400 (code, message), also when `backend` does not
/// run `runtime`.
pub fn resolve(
    runtime: RuntimeKind,
    backend: &dyn Backend,
    code_dir: &Path,
    explicit: Option<&str>,
) -> Result<String, (&'static str, String)> {
    if !backend.runs(runtime) {
        let msg = format!(
            "the {} backend does not run the runtime '{runtime}' yet (the process and qemu backends do)",
            backend.name()
        );
        return Err(("bad_setting", msg));
    }
    match runtime {
        RuntimeKind::Nodejs => resolve_handler(code_dir, explicit).map_err(|e| e.message),
        other => other.check_code(code_dir, explicit),
    }
    .map_err(|msg| ("bad_handler", msg))
}

/// Resolves the handler for the code unpacked at `code_dir`.
///
/// With `explicit`, checks its format (relative path, no "..", an identifier after the last
/// '.') and that `<file>.js`, `.mjs` or `.cjs` exists. Without, takes the first that exists of
/// `app.handler`, `index.handler`, and `package.json`'s `main` (extension and "./" stripped)
/// with the export `handler`. Returns the handler string to record.
pub fn resolve_handler(code_dir: &Path, explicit: Option<&str>) -> Result<String, HandlerError> {
    if let Some(handler) = explicit {
        let (file, _) = split_handler(handler)?;
        find_source(code_dir, file).ok_or_else(|| {
            HandlerError::new(format!(
                "handler '{handler}' needs one of {} in the code, and none exists",
                candidates(file)
            ))
        })?;
        return Ok(handler.to_string());
    }
    for file in ["app", "index"] {
        if find_source(code_dir, file).is_some() {
            return Ok(format!("{file}.{DEFAULT_EXPORT}"));
        }
    }
    match main_from_package_json(code_dir)? {
        Some(file) => {
            let handler = format!("{file}.{DEFAULT_EXPORT}");
            split_handler(&handler)
                .map_err(|e| HandlerError::new(format!("package.json \"main\" gives no usable handler: {e}")))?;
            if find_source(code_dir, &file).is_none() {
                return Err(HandlerError::new(format!(
                    "package.json \"main\" points at '{file}', but none of {} exists",
                    candidates(&file)
                )));
            }
            Ok(handler)
        }
        None => Err(HandlerError::new(
            "no handler given and none found: add app.js or index.js exporting 'handler', set \"main\" in \
             package.json, or pass handler=<file>.<export>"
                .into(),
        )),
    }
}

/// Checks a handler's format and splits it into file and export.
fn split_handler(handler: &str) -> Result<(&str, &str), HandlerError> {
    let bad = |why: &str| HandlerError::new(format!("handler '{}' {why}", handler.escape_debug()));
    if handler.len() > HANDLER_BYTES_MAX {
        return Err(bad(&format!("is longer than {HANDLER_BYTES_MAX} bytes")));
    }
    if handler
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(bad("contains whitespace, a control character or '\\'"));
    }
    let (file, export) = handler
        .rsplit_once('.')
        .ok_or_else(|| bad("is not of the form <file>.<export>, e.g. app.handler"))?;
    if !is_identifier(export) {
        return Err(bad(&format!(
            "names the export '{export}', which is not a JavaScript identifier"
        )));
    }
    if file.is_empty() {
        return Err(bad("has no file before the '.'"));
    }
    if file.starts_with('/') {
        return Err(bad(
            "must name a file relative to the code root, not an absolute path",
        ));
    }
    for component in file.split('/') {
        match component {
            "" => return Err(bad("has an empty path component")),
            "." | ".." => return Err(bad("must not contain '.' or '..' path components")),
            _ => {}
        }
    }
    Ok((file, export))
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// The first existing regular file `<file>.js`, `.mjs`, `.cjs` under `code_dir`.
fn find_source(code_dir: &Path, file: &str) -> Option<String> {
    EXTENSIONS
        .iter()
        .map(|ext| format!("{file}.{ext}"))
        .find(|name| fs::metadata(code_dir.join(name)).is_ok_and(|m| m.is_file()))
}

fn candidates(file: &str) -> String {
    EXTENSIONS
        .iter()
        .map(|ext| format!("{file}.{ext}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `main` from `package.json`, as a handler file part; `None` without the file or the field.
fn main_from_package_json(code_dir: &Path) -> Result<Option<String>, HandlerError> {
    let path = code_dir.join("package.json");
    let Ok(meta) = fs::metadata(&path) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.len() > PACKAGE_JSON_BYTES_MAX {
        return Err(HandlerError::new(format!(
            "package.json is {} bytes, over the {PACKAGE_JSON_BYTES_MAX} bytes read to find \"main\"",
            meta.len()
        )));
    }
    let bytes =
        fs::read(&path).map_err(|e| HandlerError::new(format!("cannot read package.json: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| HandlerError::new(format!("package.json is not valid JSON: {e}")))?;
    let Some(main) = json.get("main") else {
        return Ok(None);
    };
    let main = main.as_str().ok_or_else(|| {
        HandlerError::new(format!(
            "package.json \"main\" is {main}, expected a string"
        ))
    })?;
    let mut file = main.trim();
    while let Some(rest) = file.strip_prefix("./") {
        file = rest;
    }
    for ext in EXTENSIONS {
        if let Some(stem) = file.strip_suffix(&format!(".{ext}")) {
            file = stem;
            break;
        }
    }
    Ok(Some(file.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A code directory holding the given files, removed when the test ends.
    struct Code(PathBuf);

    impl Code {
        fn with(files: &[(&str, &str)]) -> Code {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hearth-handler-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            for (name, text) in files {
                let path = dir.join(name);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(path, text).unwrap();
            }
            Code(dir)
        }

        fn resolve(&self, explicit: Option<&str>) -> Result<String, String> {
            resolve_handler(&self.0, explicit).map_err(|e| e.message)
        }
    }

    impl Drop for Code {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A backend that runs Node.js only (the trait's default), as Firecracker does.
    struct NodeOnly;

    impl Backend for NodeOnly {
        fn name(&self) -> &'static str {
            "firecracker"
        }
        fn prepare(
            &self,
            _spec: &crate::spec::FunctionSpec,
            _dir: &Path,
        ) -> Result<crate::sandbox::InitLogs, crate::sandbox::StartError> {
            Err(crate::sandbox::StartError::ShuttingDown)
        }
        fn start(
            &self,
            _spec: &crate::spec::FunctionSpec,
            _dir: &Path,
            _cpus: crate::sandbox::InstanceCpus,
        ) -> Result<
            (Box<dyn crate::sandbox::Instance>, crate::sandbox::InitLogs),
            crate::sandbox::StartError,
        > {
            Err(crate::sandbox::StartError::ShuttingDown)
        }
    }

    #[test]
    fn other_runtimes_are_refused_by_backends_that_do_not_run_them() {
        let code = Code::with(&[("app.js", ""), ("lambda_function.py", "")]);
        assert_eq!(
            resolve(RuntimeKind::Nodejs, &NodeOnly, &code.0, None).unwrap(),
            "app.handler"
        );
        let (kind, msg) = resolve(RuntimeKind::Python3, &NodeOnly, &code.0, None).unwrap_err();
        assert_eq!(kind, "bad_setting");
        assert!(
            msg.contains("firecracker backend does not run the runtime 'python3'"),
            "{msg}"
        );
    }

    #[test]
    fn explicit_handler_is_checked_against_the_files() {
        let code = Code::with(&[
            ("src/api.mjs", ""),
            ("lib/my.module.cjs", ""),
            ("index.js", ""),
        ]);
        assert_eq!(code.resolve(Some("src/api.main")).unwrap(), "src/api.main");
        assert_eq!(
            code.resolve(Some("lib/my.module.handler")).unwrap(),
            "lib/my.module.handler"
        );
        assert_eq!(code.resolve(Some("index.$h_1")).unwrap(), "index.$h_1");
        let err = code.resolve(Some("src/missing.handler")).unwrap_err();
        assert!(
            err.contains("src/missing.js, src/missing.mjs, src/missing.cjs"),
            "{err}"
        );
    }

    #[test]
    fn explicit_handler_must_not_name_a_directory() {
        let code = Code::with(&[("app.js/inner.js", "")]);
        assert!(code.resolve(Some("app.handler")).is_err());
    }

    #[test]
    fn malformed_handlers_are_refused() {
        let code = Code::with(&[("index.js", "")]);
        for (handler, why) in [
            ("index", "<file>.<export>"),
            ("index.", "not a JavaScript identifier"),
            ("index.1st", "not a JavaScript identifier"),
            ("index.my-fn", "not a JavaScript identifier"),
            (".handler", "no file"),
            ("/index.handler", "absolute"),
            ("../index.handler", "'..'"),
            ("a/../index.handler", "'..'"),
            ("./index.handler", "'.'"),
            ("a//index.handler", "empty path component"),
            ("in dex.handler", "whitespace"),
            ("lib\\index.handler", "'\\'"),
            ("index.handler\0", "control"),
        ] {
            let err = code.resolve(Some(handler)).unwrap_err();
            assert!(err.contains(why), "{handler:?}: {err}");
        }
        let long = format!("{}.handler", "a".repeat(HANDLER_BYTES_MAX));
        assert!(code
            .resolve(Some(&long))
            .unwrap_err()
            .contains("longer than 128"));
    }

    #[test]
    fn default_prefers_app_then_index_then_package_main() {
        let all = Code::with(&[
            ("app.cjs", ""),
            ("index.js", ""),
            ("package.json", r#"{"main":"server.js"}"#),
        ]);
        assert_eq!(all.resolve(None).unwrap(), "app.handler");
        let index = Code::with(&[
            ("index.mjs", ""),
            ("package.json", r#"{"main":"server.js"}"#),
            ("server.js", ""),
        ]);
        assert_eq!(index.resolve(None).unwrap(), "index.handler");
        let main = Code::with(&[
            ("package.json", r#"{"main":"./dist/server.js"}"#),
            ("dist/server.js", ""),
        ]);
        assert_eq!(main.resolve(None).unwrap(), "dist/server.handler");
        let bare = Code::with(&[
            ("package.json", r#"{"main":"lib/entry"}"#),
            ("lib/entry.cjs", ""),
        ]);
        assert_eq!(bare.resolve(None).unwrap(), "lib/entry.handler");
    }

    #[test]
    fn express_fixture_resolves_to_app_handler() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/express-app");
        assert_eq!(resolve_handler(&fixture, None).unwrap(), "app.handler");
    }

    #[test]
    fn default_fails_with_advice_when_nothing_fits() {
        let empty = Code::with(&[("README.md", "")]);
        assert!(empty
            .resolve(None)
            .unwrap_err()
            .contains("add app.js or index.js"));
        let no_main = Code::with(&[("package.json", r#"{"name":"x"}"#)]);
        assert!(no_main
            .resolve(None)
            .unwrap_err()
            .contains("no handler given"));
        let missing = Code::with(&[("package.json", r#"{"main":"gone.js"}"#)]);
        assert!(missing
            .resolve(None)
            .unwrap_err()
            .contains("points at 'gone'"));
        let escaping = Code::with(&[("package.json", r#"{"main":"../outside.js"}"#)]);
        assert!(escaping.resolve(None).unwrap_err().contains("'..'"));
        let typescript = Code::with(&[
            ("package.json", r#"{"main":"src/index.ts"}"#),
            ("src/index.ts", ""),
        ]);
        assert!(typescript.resolve(None).is_err());
        let broken = Code::with(&[("package.json", "{not json")]);
        assert!(broken.resolve(None).unwrap_err().contains("not valid JSON"));
        let number = Code::with(&[("package.json", r#"{"main":3}"#)]);
        assert!(number
            .resolve(None)
            .unwrap_err()
            .contains("expected a string"));
    }
}
