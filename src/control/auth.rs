//! Who may use the control plane and `/metrics`, decided on the request head.
//!
//! The engine calls [`Guard::check`] as soon as a request head is parsed, before
//! any body is read or `100 Continue` is sent, so an unauthorised client cannot
//! make hearth buffer a 50 MiB deploy. Three rules, in order:
//!
//! 1. **Origin**: a browser sends `Origin` (and `Sec-Fetch-Site`) with
//!    cross-site requests. A control request from another origin is refused
//!    (403), whatever it carries: a web page the operator visits must not be
//!    able to deploy code (a multipart POST needs no CORS preflight).
//! 2. **Host**, only when the control plane runs without a token
//!    (`--no-admin-token`, loopback only): the `Host` must name a loopback
//!    address, so a DNS-rebound page (`Host: evil.example`) is refused (403).
//! 3. **Token**: `Authorization: Bearer <admin token>`, compared in constant
//!    time (401 otherwise). `/metrics` also accepts the metrics token.
//!
//! By default `hearth serve` generates the admin token and keeps it in
//! `<state>/admin-token` (mode 0600), where the CLI finds it ([`token_file`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::http::parse::Request;
use crate::util::random::random_hex;

/// What a guarded request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Deploy, list, describe, delete, logs.
    Control,
    /// `GET /metrics`.
    Metrics,
    /// The Lambda service API: SigV4-signed (checked in full once the body is
    /// in, see [`crate::control::lambda`]) or the admin token.
    Service,
}

/// How far a request that passed the head check is known to be allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// The head proved it (a token, or an open loopback control plane).
    Proven,
    /// A SigV4 request (its signature covers the body, so it is checked once
    /// the body is in), or a public route (function URLs): the client may be
    /// anyone, and its body is charged to the core's input budget
    /// ([`crate::engine::conn`]).
    Pending,
}

/// Why a request was refused: the HTTP status, a machine code and a message.
#[derive(Debug, PartialEq, Eq)]
pub struct Denial {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// The tokens and rules the server runs with.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    /// `None`: the control plane is open (loopback only, see module docs).
    pub admin_token: Option<String>,
    /// A second token that grants `/metrics` only.
    pub metrics_token: Option<String>,
    /// The access key id service API requests must be signed with.
    pub access_key_id: String,
}

impl Guard {
    /// Checks `req` against the rules for `scope`.
    pub fn check(&self, scope: Scope, req: &Request) -> Result<Admitted, Denial> {
        check_origin(req)?;
        let Some(admin) = &self.admin_token else {
            return check_loopback_host(req).map(|()| Admitted::Proven);
        };
        let given = bearer(req);
        if scope == Scope::Service && !constant_time_eq(given.as_bytes(), admin.as_bytes()) {
            return self
                .check_signed(req, std::time::SystemTime::now())
                .map(|()| Admitted::Pending);
        }
        let ok = constant_time_eq(given.as_bytes(), admin.as_bytes())
            || (scope == Scope::Metrics
                && self
                    .metrics_token
                    .as_ref()
                    .is_some_and(|m| constant_time_eq(given.as_bytes(), m.as_bytes())));
        if ok {
            Ok(Admitted::Proven)
        } else {
            Err(Denial {
                status: 401,
                code: "unauthorized",
                message: match scope {
                    Scope::Control => "this endpoint needs 'Authorization: Bearer <admin token>' \
                                       (hearth serve keeps it in <state-dir>/admin-token)"
                        .into(),
                    Scope::Metrics => {
                        "/metrics needs 'Authorization: Bearer <admin or metrics token>'".into()
                    }
                    Scope::Service => unreachable!("checked by check_signed"),
                },
            })
        }
    }
}

impl Guard {
    /// The head check of a service API request: a SigV4 `Authorization` made
    /// with the server's access key id, dated within the clock-skew window
    /// (so a stale or undated request is refused before its body is read).
    /// The signature itself covers the body, so it is verified later.
    fn check_signed(&self, req: &Request, now: std::time::SystemTime) -> Result<(), Denial> {
        let refuse = |message: String| Denial {
            status: 403,
            code: "UnrecognizedClientException",
            message,
        };
        let header = req.header("authorization").unwrap_or("");
        let auth = crate::control::sigv4::parse_authorization(header).map_err(|_| {
            refuse(
                "the Lambda API needs requests signed with AWS Signature Version 4 \
                 (access key id 'hearth', secret: the admin token) or the admin token as a bearer"
                    .into(),
            )
        })?;
        if !constant_time_eq(auth.access_key_id.as_bytes(), self.access_key_id.as_bytes()) {
            return Err(refuse(
                "The security token included in the request is invalid (unknown access key id)"
                    .into(),
            ));
        }
        crate::control::sigv4::check_date(req, &auth, now)
            .map(|_| ())
            .map_err(|r| Denial {
                status: 403,
                code: "InvalidSignatureException",
                message: r.0,
            })
    }
}

/// The bearer credential of a request, or "".
fn bearer(req: &Request) -> &str {
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
}

/// Compares without leaking where the first difference is.
pub fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
    // Time depends only on the token's length, not on where a guess goes wrong.
    let mut diff = given.len() ^ token.len();
    for (i, t) in token.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ t);
    }
    diff == 0
}

fn forbidden(code: &'static str, message: String) -> Denial {
    Denial {
        status: 403,
        code,
        message,
    }
}

/// Refuses requests a browser marks as coming from another origin.
fn check_origin(req: &Request) -> Result<(), Denial> {
    if let Some(site) = req.header("sec-fetch-site") {
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Err(forbidden(
                "forbidden_origin",
                format!("control requests from another site ({site}) are refused"),
            ));
        }
    }
    let Some(origin) = req.header("origin") else {
        return Ok(());
    };
    let host = req.header("host").unwrap_or("");
    let same = origin_authority(origin).is_some_and(|a| a.eq_ignore_ascii_case(host));
    if same {
        Ok(())
    } else {
        Err(forbidden(
            "forbidden_origin",
            format!("control requests from origin {origin:?} are refused (not this server's)"),
        ))
    }
}

/// `host[:port]` of an `Origin` value (`scheme://host[:port]`), with the
/// scheme's default port left out as browsers leave it out of `Host`.
fn origin_authority(origin: &str) -> Option<&str> {
    let (scheme, rest) = origin.split_once("://")?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    let default = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    Some(rest.strip_suffix(default).unwrap_or(rest))
}

/// Refuses a `Host` that does not name a loopback address (DNS rebinding).
fn check_loopback_host(req: &Request) -> Result<(), Denial> {
    let host = req.header("host").unwrap_or("");
    if is_loopback_host(host) {
        Ok(())
    } else {
        Err(forbidden(
            "forbidden_host",
            format!(
                "Host {host:?} is not a loopback address; without an admin token the control \
                 plane answers only requests addressed to localhost"
            ),
        ))
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with an optional port.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || is_port(port) => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

fn is_port(s: &str) -> bool {
    s.strip_prefix(':').unwrap_or(s).parse::<u16>().is_ok()
}

/// Where `hearth serve` keeps the admin token it generated.
pub fn token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin-token")
}

/// Reads the stored admin token, or creates one (256 random bits, hex, mode
/// 0600; written to a temporary name and renamed, so a reader never sees half).
pub fn load_or_create_token(state_dir: &Path) -> Result<String, String> {
    let path = token_file(state_dir);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.len() < 16 {
                return Err(format!(
                    "{} holds no usable token (at least 16 characters); remove it to get a new one",
                    path.display()
                ));
            }
            // Never readable by others, whoever wrote it.
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
            return Ok(token);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let token = random_hex(32);
    let tmp = state_dir.join(format!(".admin-token.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })?;
    Ok(token)
}

/// The token a client command should send: the one given, else the one
/// `hearth serve` stored in `state_dir` (if readable).
pub fn client_token(given: Option<String>, state_dir: &Path) -> Option<String> {
    given.filter(|t| !t.is_empty()).or_else(|| {
        fs::read_to_string(token_file(state_dir))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse::{parse_head, Limits};

    fn req(headers: &str) -> Request {
        let text = format!("POST /deploy HTTP/1.1\r\n{headers}\r\n");
        let limits = Limits {
            head_bytes_max: 64 * 1024,
            headers_max: 100,
            body_bytes_max: 1 << 20,
        };
        parse_head(text.as_bytes(), &limits).unwrap().unwrap().0
    }

    fn guard(token: Option<&str>) -> Guard {
        Guard {
            admin_token: token.map(str::to_string),
            metrics_token: Some("metrics-secret-token".into()),
            access_key_id: "hearth".into(),
        }
    }

    #[test]
    fn token_compare_is_exact() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secrets", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"Secret", b"secret"));
    }

    #[test]
    fn foreign_origins_are_refused_even_with_the_token() {
        let g = guard(Some("admin-secret-token"));
        let r = req("Host: 127.0.0.1:3000\r\nOrigin: http://evil.example\r\nAuthorization: Bearer admin-secret-token\r\n");
        assert_eq!(g.check(Scope::Control, &r).unwrap_err().status, 403);
        let r = req("Host: 127.0.0.1:3000\r\nOrigin: null\r\n");
        assert_eq!(
            g.check(Scope::Control, &r).unwrap_err().code,
            "forbidden_origin"
        );
        let r = req(
            "Host: h\r\nSec-Fetch-Site: cross-site\r\nAuthorization: Bearer admin-secret-token\r\n",
        );
        assert_eq!(g.check(Scope::Control, &r).unwrap_err().status, 403);
        let same = req("Host: 127.0.0.1:3000\r\nOrigin: http://127.0.0.1:3000\r\nAuthorization: Bearer admin-secret-token\r\n");
        assert!(g.check(Scope::Control, &same).is_ok());
        let default_port = req("Host: hearth.example\r\nOrigin: https://hearth.example\r\nAuthorization: Bearer admin-secret-token\r\n");
        assert!(g.check(Scope::Control, &default_port).is_ok());
    }

    #[test]
    fn tokens_are_required_and_scoped() {
        let g = guard(Some("admin-secret-token"));
        let none = req("Host: x\r\n");
        assert_eq!(g.check(Scope::Control, &none).unwrap_err().status, 401);
        let metrics = req("Host: x\r\nAuthorization: Bearer metrics-secret-token\r\n");
        assert!(g.check(Scope::Metrics, &metrics).is_ok());
        assert_eq!(g.check(Scope::Control, &metrics).unwrap_err().status, 401);
        let admin = req("Host: x\r\nAuthorization: Bearer admin-secret-token\r\n");
        assert!(g.check(Scope::Metrics, &admin).is_ok());
        assert!(g.check(Scope::Control, &admin).is_ok());
    }

    #[test]
    fn an_open_control_plane_answers_loopback_hosts_only() {
        let g = guard(None);
        for host in [
            "localhost",
            "localhost:3000",
            "127.0.0.1:80",
            "127.1.2.3",
            "[::1]:3000",
            "[::1]",
        ] {
            assert!(
                g.check(Scope::Control, &req(&format!("Host: {host}\r\n")))
                    .is_ok(),
                "{host}"
            );
        }
        for host in [
            "evil.example",
            "evil.example:3000",
            "10.0.0.1:3000",
            "localhost.evil",
            "[::1]x",
            "",
        ] {
            let d = g
                .check(Scope::Control, &req(&format!("Host: {host}\r\n")))
                .unwrap_err();
            assert_eq!((d.status, d.code), (403, "forbidden_host"), "{host}");
        }
    }

    #[test]
    fn the_token_file_is_private_and_stable() {
        let dir = std::env::temp_dir().join(format!("hearth-auth-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let a = load_or_create_token(&dir).unwrap();
        let b = load_or_create_token(&dir).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        let mode = fs::metadata(token_file(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(client_token(None, &dir), Some(a.clone()));
        assert_eq!(
            client_token(Some("given".into()), &dir),
            Some("given".into())
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn service_requests_need_a_signature_with_our_key_id_or_the_admin_token() {
        let g = guard(Some("admin-secret-token"));
        // Signed now: admitted on the head, the signature still to check.
        let (day, stamp) = amz_now();
        let signed = |key: &str| {
            format!(
                "Host: 127.0.0.1\r\nX-Amz-Date: {stamp}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={key}/{day}/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=00\r\n"
            )
        };
        assert_eq!(
            g.check(Scope::Service, &req(&signed("hearth"))),
            Ok(Admitted::Pending)
        );
        let other = g
            .check(Scope::Service, &req(&signed("AKIDOTHER")))
            .unwrap_err();
        assert_eq!(
            (other.status, other.code),
            (403, "UnrecognizedClientException")
        );
        let none = g
            .check(Scope::Service, &req("Host: 127.0.0.1\r\n"))
            .unwrap_err();
        assert_eq!(none.status, 403);
        let bearer = "Host: 127.0.0.1\r\nAuthorization: Bearer admin-secret-token\r\n";
        assert_eq!(g.check(Scope::Service, &req(bearer)), Ok(Admitted::Proven));
        // A foreign origin is refused whatever it carries.
        let foreign = format!("{}Origin: http://evil.example\r\n", signed("hearth"));
        assert_eq!(
            g.check(Scope::Service, &req(&foreign)).unwrap_err().status,
            403
        );
        // Without an admin token: open, on loopback Host names only.
        let open = guard(None);
        assert_eq!(
            open.check(Scope::Service, &req("Host: 127.0.0.1:3000\r\n")),
            Ok(Admitted::Proven)
        );
        assert_eq!(
            open.check(Scope::Service, &req("Host: evil.example\r\n"))
                .unwrap_err()
                .code,
            "forbidden_host"
        );
    }

    /// Today's SigV4 scope date and request stamp, from the system clock.
    fn amz_now() -> (String, String) {
        let stamp = crate::control::sigv4::format_amz_date(std::time::SystemTime::now());
        (stamp[..8].to_string(), stamp)
    }

    #[test]
    fn a_service_request_dated_outside_the_window_is_refused_on_its_head() {
        let g = guard(Some("admin-secret-token"));
        let head = |stamp: &str| {
            req(&format!(
                "Host: 127.0.0.1\r\nX-Amz-Date: {stamp}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=hearth/20261130/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=00\r\n"
            ))
        };
        let at = |h: u64, m: u64| {
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(1_795_996_800 + h * 3600 + m * 60)
        };
        // 2026-11-30T12:00:00Z, checked at 12:14 and 12:16.
        let r = head("20261130T120000Z");
        assert_eq!(g.check_signed(&r, at(12, 14)), Ok(()));
        let late = g.check_signed(&r, at(12, 16)).unwrap_err();
        assert_eq!((late.status, late.code), (403, "InvalidSignatureException"));
        assert!(
            late.message.contains("Signature expired"),
            "{}",
            late.message
        );
        // No date, a malformed one, or one on another day than the scope names.
        let undated = req("Host: 127.0.0.1\r\nAuthorization: AWS4-HMAC-SHA256 Credential=hearth/20261130/us-east-1/lambda/aws4_request, SignedHeaders=host, Signature=00\r\n");
        assert_eq!(g.check_signed(&undated, at(12, 0)).unwrap_err().status, 403);
        assert!(g.check_signed(&head("yesterday"), at(12, 0)).is_err());
        assert!(g
            .check_signed(&head("20261201T000100Z"), at(23, 59))
            .is_err());
        // An empty scope date matches no day.
        let no_day = req("Host: 127.0.0.1\r\nX-Amz-Date: 20261130T120000Z\r\nAuthorization: AWS4-HMAC-SHA256 Credential=hearth//us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=00\r\n");
        assert!(g.check_signed(&no_day, at(12, 0)).is_err());
    }
}
