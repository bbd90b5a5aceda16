//! The settings a deploy may carry, from the query string or the form's text fields.
//!
//! Keys: `handler`, `memory_mb`, `timeout_ms`, `concurrency`, `env` (a JSON object of strings),
//! `runtime` (`nodejs`, `provided`, `python3` or one of Lambda's names for them).
//! Anything else, or a key given twice, is refused rather than ignored, so a typo never deploys
//! with a silently different setting.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::runtime::RuntimeKind;

/// Memory a function may ask for, in MiB, and the default.
pub const MEMORY_MB_MIN: u32 = 64;
pub const MEMORY_MB_MAX: u32 = 10240;
pub const MEMORY_MB_DEFAULT: u32 = 128;
/// Invocation timeout, in milliseconds, and the default.
pub const TIMEOUT_MS_MIN: u64 = 100;
pub const TIMEOUT_MS_MAX: u64 = 900_000;
pub const TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Instances running at once, and the default.
pub const CONCURRENCY_MIN: u32 = 1;
pub const CONCURRENCY_MAX: u32 = 1000;
pub const CONCURRENCY_DEFAULT: u32 = 10;
/// Total size of the environment: the bytes of every name and value (Lambda's 4 KiB).
pub const ENV_BYTES_MAX: usize = 4096;
/// Names with this prefix are set by hearth itself.
const RESERVED_ENV_PREFIX: &str = "HEARTH_";

/// Settings of one deploy, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploySettings {
    /// Handler as given (`<file>.<export>`); `None` lets the handler resolution guess.
    pub handler: Option<String>,
    /// Memory per instance, MiB.
    pub memory_mb: u32,
    /// Longest an invocation may run, ms.
    pub timeout_ms: u64,
    /// Most instances at once.
    pub concurrency: u32,
    /// Environment variables, in the order given.
    pub env: Vec<(String, String)>,
    /// A unique name besides the id (see [`check_name`]); deploying under a
    /// taken name replaces that function.
    pub name: Option<String>,
    /// The language runtime.
    pub runtime: RuntimeKind,
}

impl Default for DeploySettings {
    fn default() -> Self {
        DeploySettings {
            handler: None,
            memory_mb: MEMORY_MB_DEFAULT,
            timeout_ms: TIMEOUT_MS_DEFAULT,
            concurrency: CONCURRENCY_DEFAULT,
            env: Vec::new(),
            name: None,
            runtime: RuntimeKind::Nodejs,
        }
    }
}

/// Builds the settings from key/value pairs (query string and form text fields, without the
/// `code` file part); the error is the message for a 400 with code "bad_setting".
pub fn parse_settings(pairs: &[(String, String)]) -> Result<DeploySettings, String> {
    let mut settings = DeploySettings::default();
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in pairs {
        if seen.contains(&key.as_str()) {
            return Err(format!("setting '{key}' is given more than once"));
        }
        match key.as_str() {
            "handler" if value.is_empty() => return Err("handler must not be empty".into()),
            "handler" => settings.handler = Some(value.clone()),
            "memory_mb" => settings.memory_mb = number(key, value, MEMORY_MB_MIN, MEMORY_MB_MAX)?,
            "timeout_ms" => settings.timeout_ms = number(key, value, TIMEOUT_MS_MIN, TIMEOUT_MS_MAX)?,
            "concurrency" => settings.concurrency = number(key, value, CONCURRENCY_MIN, CONCURRENCY_MAX)?,
            "env" => settings.env = parse_env(value)?,
            "name" => settings.name = Some(check_name(value)?.to_string()),
            "runtime" => settings.runtime = RuntimeKind::parse(value)?,
            _ => {
                return Err(format!(
                    "unknown setting '{}'; known settings are name, handler, memory_mb, timeout_ms, concurrency, env, runtime",
                    key.escape_debug()
                ))
            }
        }
        seen.push(key);
    }
    Ok(settings)
}

/// Longest function name (Lambda's limit).
pub const NAME_BYTES_MAX: usize = 64;

/// Checks a function name as Lambda does: 1 to 64 letters, digits, `-` and
/// `_`. A name may not look like a hearth id (16 hex digits), so `/f/<x>`
/// always means one thing.
pub fn check_name(name: &str) -> Result<&str, String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !ok_chars {
        return Err(format!(
            "function name '{}' is not valid: use 1 to {NAME_BYTES_MAX} letters, digits, '-' and '_'",
            name.escape_debug()
        ));
    }
    if crate::functions::valid_id(name) {
        return Err(format!(
            "function name '{name}' looks like a function id (16 hex digits); choose another"
        ));
    }
    Ok(name)
}

/// A whole number within `min..=max`, written in plain decimal digits.
fn number<T>(key: &str, value: &str, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let out_of_range = || {
        format!(
            "{key} must be a whole number from {min} to {max}, got '{}'",
            value.escape_debug()
        )
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(out_of_range());
    }
    match value.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(out_of_range()),
    }
}

/// Parses and checks `env`: a JSON object whose values are all strings.
fn parse_env(json: &str) -> Result<Vec<(String, String)>, String> {
    let EnvPairs(pairs) = serde_json::from_str(json).map_err(|e| {
        format!("env must be a JSON object of string values, like {{\"NAME\":\"value\"}}: {e}")
    })?;
    // The size limit is checked as the pairs are read, so a huge env is
    // refused after at most ENV_BYTES_MAX bytes of pairs, whatever it holds
    // further on; the set keeps the duplicate check linear.
    let mut total_bytes = 0;
    let mut seen: HashSet<&str> = HashSet::new();
    for (name, value) in &pairs {
        total_bytes += name.len() + value.len();
        if total_bytes > ENV_BYTES_MAX {
            return Err(format!(
                "env is at least {total_bytes} bytes (names plus values), over the limit of {ENV_BYTES_MAX}"
            ));
        }
        if !is_env_name(name) {
            return Err(format!(
                "env name '{}' is not valid: use letters, digits and '_', not starting with a digit",
                name.escape_debug()
            ));
        }
        if name.starts_with(RESERVED_ENV_PREFIX) {
            return Err(format!("env name '{name}' is reserved: names starting with {RESERVED_ENV_PREFIX} are set by hearth"));
        }
        if !seen.insert(name) {
            return Err(format!("env name '{name}' is given more than once"));
        }
        if value.contains('\0') {
            return Err(format!("env value of '{name}' contains a NUL character"));
        }
    }
    Ok(pairs)
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A JSON object read as ordered pairs, so that duplicate names are seen instead of merged.
struct EnvPairs(Vec<(String, String)>);

impl<'de> Deserialize<'de> for EnvPairs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor;

        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = EnvPairs;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of string values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(EnvPairs(pairs))
            }
        }

        deserializer.deserialize_map(PairsVisitor)
    }
}

/// Splits a query string (without the '?') into decoded pairs: '+' is a space, `%XX` a byte,
/// a malformed escape is kept as written, bytes that are not UTF-8 become U+FFFD (as browsers'
/// `URLSearchParams` does). Empty segments are skipped; a key without '=' has an empty value.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let (key, value) = segment.split_once('=').unwrap_or((segment, ""));
            (decode_component(key), decode_component(value))
        })
        .collect()
}

fn decode_component(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(at + 1).and_then(hex_value),
                bytes.get(at + 2).and_then(hex_value),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    at += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: &u8) -> Option<u8> {
    char::from(*digit).to_digit(16).map(|value| value as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_settings_gives_the_defaults() {
        assert_eq!(
            parse_settings(&[]).unwrap(),
            DeploySettings {
                handler: None,
                memory_mb: 128,
                timeout_ms: 30_000,
                concurrency: 10,
                env: vec![],
                name: None,
                runtime: RuntimeKind::Nodejs,
            }
        );
    }

    #[test]
    fn runtime_takes_lambda_names_and_refuses_others() {
        for (name, kind) in [
            ("python3.12", RuntimeKind::Python3),
            ("provided.al2023", RuntimeKind::Provided),
            ("nodejs20.x", RuntimeKind::Nodejs),
        ] {
            let s = parse_settings(&pairs(&[("runtime", name)])).unwrap();
            assert_eq!(s.runtime, kind, "{name}");
        }
        let err = parse_settings(&pairs(&[("runtime", "java21")])).unwrap_err();
        assert!(
            err.contains("'java21' is not supported") && err.contains("python3"),
            "{err}"
        );
    }

    #[test]
    fn every_setting_is_read() {
        let settings = parse_settings(&pairs(&[
            ("handler", "src/app.main"),
            ("memory_mb", "512"),
            ("timeout_ms", "900000"),
            ("concurrency", "1"),
            ("env", r#"{"B":"2","A":"x=y&z","_under":""}"#),
            ("name", "my-fn_2"),
        ]))
        .unwrap();
        assert_eq!(settings.handler.as_deref(), Some("src/app.main"));
        assert_eq!(settings.name.as_deref(), Some("my-fn_2"));
        assert_eq!(
            (
                settings.memory_mb,
                settings.timeout_ms,
                settings.concurrency
            ),
            (512, 900_000, 1)
        );
        assert_eq!(
            settings.env,
            pairs(&[("B", "2"), ("A", "x=y&z"), ("_under", "")])
        );
    }

    #[test]
    fn names_follow_lambda_rules_and_never_look_like_ids() {
        for good in ["a", "my-fn", "A_b-9", &"x".repeat(64)] {
            assert_eq!(check_name(good), Ok(good));
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "a:b",
            "é",
            &"x".repeat(65),
            "0123456789abcdef",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn numbers_outside_their_range_are_refused() {
        for (key, value) in [
            ("memory_mb", "63"),
            ("memory_mb", "10241"),
            ("memory_mb", "1e3"),
            ("memory_mb", "-128"),
            ("memory_mb", " 128"),
            ("memory_mb", "+128"),
            ("memory_mb", ""),
            ("timeout_ms", "99"),
            ("timeout_ms", "900001"),
            ("timeout_ms", "99999999999999999999999"),
            ("concurrency", "0"),
            ("concurrency", "1001"),
            ("concurrency", "ten"),
        ] {
            let err = parse_settings(&pairs(&[(key, value)])).unwrap_err();
            assert!(
                err.starts_with(&format!("{key} must be a whole number from")),
                "{key}={value}: {err}"
            );
        }
        for (key, value) in [
            ("memory_mb", "64"),
            ("memory_mb", "10240"),
            ("timeout_ms", "100"),
            ("concurrency", "1000"),
        ] {
            parse_settings(&pairs(&[(key, value)])).unwrap();
        }
    }

    #[test]
    fn unknown_empty_and_repeated_settings_are_refused() {
        assert!(parse_settings(&pairs(&[("memory", "256")]))
            .unwrap_err()
            .contains("unknown setting 'memory'"));
        assert!(parse_settings(&pairs(&[("handler", "")]))
            .unwrap_err()
            .contains("must not be empty"));
        let twice = pairs(&[("handler", "a.b"), ("memory_mb", "256"), ("handler", "c.d")]);
        assert!(parse_settings(&twice)
            .unwrap_err()
            .contains("'handler' is given more than once"));
    }

    #[test]
    fn bad_env_is_refused() {
        for (env, why) in [
            ("", "JSON object"),
            ("[]", "JSON object"),
            (r#"{"A":1}"#, "JSON object"),
            (r#"{"A":null}"#, "JSON object"),
            (r#"{"1A":"x"}"#, "not valid"),
            (r#"{"A-B":"x"}"#, "not valid"),
            (r#"{"":"x"}"#, "not valid"),
            (r#"{"HEARTH_ID":"x"}"#, "reserved"),
            (r#"{"A":"1","A":"2"}"#, "more than once"),
            (r#"{"A":"a\u0000b"}"#, "NUL"),
        ] {
            let err = parse_settings(&pairs(&[("env", env)])).unwrap_err();
            assert!(err.contains(why), "{env}: {err}");
        }
        // AWS_ names are the user's to set, as on Lambda for the non-reserved ones.
        assert!(parse_settings(&pairs(&[(
            "env",
            r#"{"AWS_NODEJS_CONNECTION_REUSE_ENABLED":"1"}"#
        )]))
        .is_ok());
    }

    #[test]
    fn env_size_is_limited_to_4_kib() {
        let fits = format!(r#"{{"K":"{}"}}"#, "v".repeat(ENV_BYTES_MAX - 1));
        assert_eq!(
            parse_settings(&pairs(&[("env", &fits)])).unwrap().env[0]
                .1
                .len(),
            ENV_BYTES_MAX - 1
        );
        let over = format!(r#"{{"K":"{}"}}"#, "v".repeat(ENV_BYTES_MAX));
        assert!(parse_settings(&pairs(&[("env", &over)]))
            .unwrap_err()
            .contains("4097 bytes"));
    }

    #[test]
    fn a_large_env_is_refused_at_the_size_limit_before_later_pairs_are_checked() {
        // 5000 distinct names, then one that is invalid and one repeated: the
        // check must stop at the size limit and never look that far.
        let mut env: Vec<String> = (0..5000).map(|i| format!(r#""A{i}":"""#)).collect();
        env.push(r#""1bad":"""#.into());
        env.push(r#""A0":"""#.into());
        let env = format!("{{{}}}", env.join(","));
        let err = parse_settings(&pairs(&[("env", &env)])).unwrap_err();
        assert!(err.contains("over the limit of 4096"), "{err}");
    }

    #[test]
    fn duplicate_env_names_are_refused() {
        let err = parse_settings(&pairs(&[("env", r#"{"A":"1","B":"2","A":"3"}"#)])).unwrap_err();
        assert!(err.contains("'A' is given more than once"), "{err}");
    }

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            parse_query("handler=src%2Fapp.main&memory_mb=256&&flag&env=%7B%22A%22%3A%22x+y%22%7D&bad=%zz%4"),
            pairs(&[
                ("handler", "src/app.main"),
                ("memory_mb", "256"),
                ("flag", ""),
                ("env", r#"{"A":"x y"}"#),
                ("bad", "%zz%4"),
            ])
        );
        assert_eq!(parse_query(""), vec![]);
        assert_eq!(
            parse_query("a=b=c&%C3%A9=%FF"),
            pairs(&[("a", "b=c"), ("é", "\u{FFFD}")])
        );
        assert_eq!(
            parse_query("x=%+1&y=%-1"),
            pairs(&[("x", "% 1"), ("y", "%-1")])
        );
    }

    #[test]
    fn query_settings_flow_into_parse_settings() {
        let settings = parse_settings(&parse_query(
            "concurrency=50&env=%7B%22TZ%22%3A%22UTC%22%7D",
        ))
        .unwrap();
        assert_eq!(
            (settings.concurrency, settings.env),
            (50, pairs(&[("TZ", "UTC")]))
        );
    }

    proptest! {
        /// Whatever is percent-encoded comes back unchanged.
        #[test]
        fn percent_encoding_round_trips(key in "\\PC{0,12}", value in "\\PC{0,40}") {
            let encode = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
            let query = format!("{}={}", encode(&key), encode(&value));
            prop_assert_eq!(parse_query(&query), vec![(key, value)]);
        }
    }
}
