//! AWS Signature Version 4, checked on the server side.
//!
//! The `aws` CLI and the SDKs sign every service API request: they hash a
//! canonical form of the request (method, path, query, the headers named in
//! `SignedHeaders`, the body's SHA-256), and HMAC it with a key derived from
//! the secret, the date, the region and the service. hearth rebuilds the same
//! canonical request from what arrived and compares signatures in constant
//! time. The request time (`X-Amz-Date`) must be within [`CLOCK_SKEW_MAX`] of
//! the server's clock, so a captured request cannot be replayed later.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::control::auth::constant_time_eq;
use crate::http::parse::Request;
use crate::util::hex::encode as hex;

/// How far a request's `X-Amz-Date` may be from the server's clock.
pub const CLOCK_SKEW_MAX: Duration = Duration::from_secs(15 * 60);

/// The only algorithm the SDKs use for Lambda.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Why a signature was refused; the message is for the client.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

/// The parts of an `Authorization: AWS4-HMAC-SHA256 …` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Authorization<'a> {
    pub access_key_id: &'a str,
    /// `<yyyymmdd>/<region>/<service>/aws4_request`.
    pub scope: &'a str,
    pub date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    pub signed_headers: &'a str,
    pub signature: &'a str,
}

/// Parses a SigV4 `Authorization` header value.
pub fn parse_authorization(value: &str) -> Result<Authorization<'_>, Refused> {
    let bad = || Refused("the Authorization header is not an AWS Signature Version 4".into());
    let rest = value.strip_prefix(ALGORITHM).ok_or_else(bad)?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let (credential, signed_headers, signature) = (
        credential.ok_or_else(bad)?,
        signed.ok_or_else(bad)?,
        signature.ok_or_else(bad)?,
    );
    let (access_key_id, scope) = credential.split_once('/').ok_or_else(bad)?;
    let mut fields = scope.split('/');
    let (Some(date), Some(region), Some(service), Some("aws4_request"), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(bad());
    };
    Ok(Authorization {
        access_key_id,
        scope,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// Checks that `req` carries an `X-Amz-Date` within [`CLOCK_SKEW_MAX`] of
/// `now`, on the day its credential scope names; returns the stamp.
pub fn check_date<'r>(
    req: &'r Request,
    auth: &Authorization<'_>,
    now: SystemTime,
) -> Result<&'r str, Refused> {
    let stamp = req
        .header("x-amz-date")
        .ok_or_else(|| Refused("the request has no X-Amz-Date header".into()))?;
    let when = parse_amz_date(stamp)
        .ok_or_else(|| Refused(format!("X-Amz-Date {stamp:?} is not yyyymmddThhmmssZ")))?;
    let skew = now
        .duration_since(when)
        .or_else(|_| when.duration_since(now))
        .unwrap_or_default();
    let same_day = auth.date.len() == 8 && stamp.starts_with(auth.date);
    if skew > CLOCK_SKEW_MAX || !same_day {
        return Err(Refused(format!(
            "Signature expired or not yet valid: X-Amz-Date {stamp} is more than {} minutes from the server's clock",
            CLOCK_SKEW_MAX.as_secs() / 60
        )));
    }
    Ok(stamp)
}

/// Checks `req`'s signature over `body` against the key pair, at `now`.
pub fn verify(
    req: &Request,
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    now: SystemTime,
) -> Result<(), Refused> {
    let header = req
        .header("authorization")
        .ok_or_else(|| Refused("the request is not signed (no Authorization header)".into()))?;
    let auth = parse_authorization(header)?;
    if !constant_time_eq(auth.access_key_id.as_bytes(), access_key_id.as_bytes()) {
        return Err(Refused(
            "The security token included in the request is invalid (unknown access key id)".into(),
        ));
    }
    let stamp = check_date(req, &auth, now)?;
    if !auth.signed_headers.split(';').any(|h| h == "host") {
        return Err(Refused("the signature must cover the Host header".into()));
    }
    let canonical = canonical_request(req, body, auth.signed_headers)?;
    let to_sign = format!(
        "{ALGORITHM}\n{stamp}\n{}\n{}",
        auth.scope,
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    for part in [auth.region, auth.service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let expected = hex(&hmac(&key, to_sign.as_bytes()));
    if constant_time_eq(auth.signature.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(Refused(
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method."
                .into(),
        ))
    }
}

/// The canonical request: method, path, query, signed headers, body hash.
fn canonical_request(req: &Request, body: &[u8], signed: &str) -> Result<String, Refused> {
    let mut out = String::with_capacity(256);
    out.push_str(&req.method);
    out.push('\n');
    // The path as sent is already percent-encoded once; the SDKs encode it
    // again for the signature (every service but S3).
    encode_into(&mut out, req.path().as_bytes(), true);
    out.push('\n');
    let mut pairs: Vec<(String, String)> = req
        .query()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let mut pair = (String::new(), String::new());
            encode_into(&mut pair.0, &percent_decode(k), false);
            encode_into(&mut pair.1, &percent_decode(v), false);
            pair
        })
        .collect();
    pairs.sort();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out.push('\n');
    for name in signed.split(';') {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(Refused(format!("signed header {name:?} is missing")));
        }
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(signed);
    out.push('\n');
    out.push_str(&payload_hash(req, body)?);
    Ok(out)
}

/// The body's SHA-256 for the canonical request, always computed from the
/// body received.
///
/// `X-Amz-Content-Sha256` is only the client's claim: taking it as it is would
/// let a captured request be replayed with another body under the same
/// signature. So when it is sent it must match, and `UNSIGNED-PAYLOAD` (or a
/// streaming form) is refused, since every service API body is read whole.
fn payload_hash(req: &Request, body: &[u8]) -> Result<String, Refused> {
    let actual = hex(&Sha256::digest(body));
    match req.header("x-amz-content-sha256") {
        Some(claimed) if !claimed.trim().eq_ignore_ascii_case(&actual) => Err(Refused(format!(
            "X-Amz-Content-Sha256 {:?} is not the SHA-256 of the body received; \
             the signature must cover the body",
            claimed.trim()
        ))),
        _ => Ok(actual),
    }
}

/// Percent-encodes all but the unreserved characters (and `/` in a path).
fn encode_into(out: &mut String, bytes: &[u8], keep_slash: bool) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Decodes `%XX` escapes (a stray `%` stays as it is).
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex_at = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (hex_at(i + 1), hex_at(i + 2)) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A time as `yyyymmddThhmmssZ` (an `X-Amz-Date`; its first 8 characters are the
/// credential scope's date). Times before 1970 read as 1970.
pub fn format_amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (y, m, d) = crate::util::time::civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// `yyyymmddThhmmssZ` as a time.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = crate::util::time::days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse::{parse_head, Limits};

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    /// Signed by botocore 1.43 (`SigV4Auth(...).add_auth`) at 2026-11-30T18:00:00Z.
    fn botocore_request(signature: &str) -> Vec<u8> {
        format!(
            "POST /2015-03-31/functions/my-fn%3Aprod/invocations?Qualifier=%24LATEST&b=x%20y HTTP/1.1\r\n\
             Host: 127.0.0.1:3000\r\nX-Amz-Invocation-Type: RequestResponse\r\n\
             Content-Type: application/json\r\nX-Amz-Date: 20261130T180000Z\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261130/us-east-1/lambda/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-invocation-type, Signature={signature}\r\n\
             Content-Length: 7\r\n\r\n"
        )
        .into_bytes()
    }

    const GOOD: &str = "07fdaa1130734377e97cb8b12d9eb04d0c96c1c3a93aedc983236018e4ab2de1";

    fn check(head: &[u8], body: &[u8], secret: &str, now: SystemTime) -> Result<(), Refused> {
        let (req, _) = parse_head(head, &Limits::default())
            .expect("test request parses")
            .expect("whole head");
        verify(&req, body, "AKIDEXAMPLE", secret, now)
    }

    fn at(stamp: &str) -> SystemTime {
        parse_amz_date(stamp).unwrap()
    }

    #[test]
    fn a_botocore_signature_verifies() {
        let now = at("20261130T180500Z");
        assert_eq!(
            check(&botocore_request(GOOD), br#"{"a":1}"#, SECRET, now),
            Ok(())
        );
    }

    #[test]
    fn any_change_breaks_it() {
        let now = at("20261130T180000Z");
        let body = br#"{"a":1}"#;
        assert!(check(&botocore_request(GOOD), br#"{"a":2}"#, SECRET, now).is_err());
        assert!(check(&botocore_request(GOOD), body, "another secret", now).is_err());
        let mut bad = GOOD.to_string();
        bad.replace_range(0..1, "1");
        assert!(check(&botocore_request(&bad), body, SECRET, now).is_err());
        let moved = String::from_utf8(botocore_request(GOOD))
            .unwrap()
            .replace("my-fn%3Aprod", "my-fn%3Aprot");
        assert!(check(moved.as_bytes(), body, SECRET, now).is_err());
    }

    /// The botocore request with an `X-Amz-Content-Sha256` header added, as
    /// an attacker replaying it would add one.
    fn with_content_sha256(value: &str) -> Vec<u8> {
        String::from_utf8(botocore_request(GOOD))
            .unwrap()
            .replace(
                "Content-Length: 7\r\n",
                &format!("X-Amz-Content-Sha256: {value}\r\nContent-Length: 7\r\n"),
            )
            .into_bytes()
    }

    #[test]
    fn a_claimed_body_hash_must_match_the_body() {
        let now = at("20261130T180000Z");
        let signed_body = br#"{"a":1}"#;
        let claimed = hex(&Sha256::digest(signed_body));
        // The header alone does not change the signature when it is true.
        assert_eq!(
            check(&with_content_sha256(&claimed), signed_body, SECRET, now),
            Ok(())
        );
        // Claiming the signed body's hash does not let another body through.
        let err = check(&with_content_sha256(&claimed), br#"{"a":2}"#, SECRET, now).unwrap_err();
        assert!(err.0.contains("X-Amz-Content-Sha256"), "{err:?}");
        for value in ["UNSIGNED-PAYLOAD", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", ""] {
            assert!(
                check(&with_content_sha256(value), signed_body, SECRET, now).is_err(),
                "{value:?}"
            );
        }
    }

    #[test]
    fn stale_or_future_requests_are_refused() {
        let body = br#"{"a":1}"#;
        for now in ["20261130T181501Z", "20261130T174459Z", "20261201T180000Z"] {
            let err = check(&botocore_request(GOOD), body, SECRET, at(now)).unwrap_err();
            assert!(err.0.contains("expired"), "{now}: {err:?}");
        }
    }

    #[test]
    fn headers_parse_and_malformed_ones_are_refused() {
        let a = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AK/20261130/eu-west-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=ab",
        )
        .unwrap();
        assert_eq!(
            (a.access_key_id, a.date, a.region, a.service, a.signature),
            ("AK", "20261130", "eu-west-1", "lambda", "ab")
        );
        for bad in [
            "Bearer x",
            "AWS4-HMAC-SHA256 Credential=AK/20261130/eu-west-1/lambda, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=ab",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn amz_dates_convert() {
        assert_eq!(at("19700101T000000Z"), UNIX_EPOCH);
        assert_eq!(
            at("20261130T180000Z")
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1_796_061_600
        );
        for bad in [
            "2026-11-30T18:00:00Z",
            "20261330T180000Z",
            "20261130T180000",
        ] {
            assert!(parse_amz_date(bad).is_none(), "{bad}");
        }
        for stamp in ["19700101T000000Z", "20261130T180000Z", "20240229T235959Z"] {
            assert_eq!(format_amz_date(at(stamp)), stamp);
        }
    }
}
