//! The asynchronous side of the Lambda service API: `Invoke` with
//! `X-Amz-Invocation-Type: Event` (checked here on the core that received it,
//! then stored by the committer of [`crate::functions::async_events`], which
//! answers 202 once the event is on disk), the `…EventInvokeConfig`
//! operations, and hearth's own list of failed events
//! (`GET /functions/<id>/async/failed`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::control::lambda::{
    self, function_name, invalid, lambda_error, query_qualifier, ACCOUNT_ID, REGION_DEFAULT,
};
use crate::control::plane::{Answer, Done, Plane};
use crate::control::sigv4;
use crate::functions::async_events::config::{
    EventConfig, EVENT_AGE_S_MAX, EVENT_AGE_S_MIN, RETRIES_MAX,
};
use crate::functions::async_events::failed::Listing;
use crate::functions::async_events::queue::AppendError;
use crate::functions::async_events::EVENT_BYTES_MAX;
use crate::functions::{Function, Registry};
use crate::http::parse::Request;
use crate::http::reply::Reply;
use crate::routes::LambdaOp;

fn not_found(what: &str) -> Answer {
    lambda_error(
        404,
        "ResourceNotFoundException",
        &format!(
            "Function not found: arn:aws:lambda:{REGION_DEFAULT}:{ACCOUNT_ID}:function:{what}"
        ),
    )
}

/// The function `raw` (and `?Qualifier=`) names, the key it was found by,
/// and the qualifier as given.
fn target(
    plane: &Plane,
    raw: &str,
    req: &Request,
) -> Result<(std::sync::Arc<Function>, String, String), Answer> {
    let (key, qualifier) = target_key(raw, req)?;
    let f = plane.functions.get(&key).ok_or_else(|| not_found(&key))?;
    let qualifier = qualifier_of(&f, qualifier);
    Ok((f, key, qualifier))
}

/// The qualifier an event for `f`, named with `qualifier`, runs and is
/// configured with: a published version named by its id alone is that
/// version (its number), not `$LATEST`.
fn qualifier_of(f: &Function, qualifier: String) -> String {
    match f.spec.service.version {
        Some(v) if qualifier.is_empty() => v.to_string(),
        _ => qualifier,
    }
}

/// The key of the function `raw` (and `?Qualifier=`) names, and the qualifier as given.
fn target_key(raw: &str, req: &Request) -> Result<(String, String), Answer> {
    let (name, qualifier) = function_name(raw)?;
    let qualifier = qualifier
        .or_else(|| query_qualifier(req.query()))
        .filter(|q| q != "$LATEST")
        .unwrap_or_default();
    let key = if qualifier.is_empty() {
        name.clone()
    } else {
        format!("{name}:{qualifier}")
    };
    Ok((key, qualifier))
}

/// Accepts an `Event` invocation: checks it, hands it to the committer, and
/// lets `done` carry the answer (202 once stored). `Err` is the answer now.
pub(super) fn accept(
    plane: &Plane,
    raw: &str,
    req: &Request,
    body: Vec<u8>,
    done: Done,
) -> Result<(), Answer> {
    plane.service_auth.check(req, &body)?;
    let (f, found_by, qualifier) = target(plane, raw, req)?;
    if body.len() > EVENT_BYTES_MAX {
        return Err(lambda_error(
            413,
            "RequestTooLargeException",
            &format!(
                "the payload of an asynchronous invocation is {} bytes; at most {EVENT_BYTES_MAX} are allowed",
                body.len()
            ),
        ));
    }
    if !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return Err(lambda_error(
            400,
            "InvalidRequestContentException",
            "Could not parse request body into json: the payload must be JSON",
        ));
    }
    let request_id = uuid();
    let key = Registry::async_key(&f).to_string();
    // Its function's queue, while the function is still there: an event
    // accepted as its function is deleted is refused by the committer (or
    // here), never stored for a function created anew under the name.
    let still_there = || {
        plane
            .functions
            .get(&found_by)
            .is_some_and(|g| Registry::async_key(&g) == key)
    };
    let events = plane
        .functions
        .async_events
        .queue_for(&key, still_there)
        .map_err(|e| lambda_error(500, "ServiceException", &e.to_string()))?
        .ok_or_else(|| not_found(&found_by))?;
    // Asked again as the event is stored: an event accepted as its version
    // or alias is deleted is dropped with it or refused, never stored for an
    // alias made anew under the name.
    let (functions, stored_key) = (plane.functions.clone(), key.clone());
    let still_there = Box::new(move || {
        functions
            .get(&found_by)
            .is_some_and(|g| Registry::async_key(&g) == stored_key)
    });
    let rid = request_id.clone();
    let key_name = key.clone();
    let answered = Box::new(move |stored: Result<(), AppendError>| {
        done(match stored {
            Ok(()) => {
                let mut r = Reply::new(202, "application/json", Vec::new());
                r.headers.push((Cow::Borrowed("x-amzn-requestid"), Cow::Owned(rid)));
                r
            }
            Err(AppendError::Full { bytes_max }) => too_many(&format!(
                "the function's queue of asynchronous events holds its limit of {bytes_max} bytes; retry later"
            )),
            Err(AppendError::DiskFull { bytes_max }) => too_many(&format!(
                "the server's disk for asynchronous events (all functions' queues and failed events) \
                 holds its limit of {bytes_max} bytes; retry later"
            )),
            Err(AppendError::TooManyQueued { events_max }) => too_many(&format!(
                "the server holds its limit of {events_max} queued asynchronous events; retry later"
            )),
            Err(AppendError::Removed) => not_found(&key_name),
            Err(AppendError::Io(e)) => lambda_error(
                500,
                "ServiceException",
                &format!("the event could not be stored: {e}"),
            ),
        })
    });
    plane
        .functions
        .async_events
        .submit(events, qualifier, request_id, body, answered, still_there)
        .map_err(|_| {
            too_many(
            "too many asynchronous events (or bytes of them) are waiting to be stored; retry later",
        )
        })
}

fn too_many(message: &str) -> Answer {
    let mut r = lambda_error(429, "TooManyRequestsException", message);
    r.headers
        .push((Cow::Borrowed("retry-after"), Cow::Borrowed("1")));
    r
}

/// A random request id in the UUID shape Lambda uses.
fn uuid() -> String {
    let h = crate::util::random::random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `Put`/`Update`/`Get`/`DeleteFunctionEventInvokeConfig`.
pub(super) fn event_invoke_config(
    plane: &Plane,
    op: LambdaOp<'_>,
    req: &Request,
    body: &[u8],
) -> Answer {
    let (raw, kind) = match op {
        LambdaOp::PutEventInvokeConfig(n) => (n, 'p'),
        LambdaOp::UpdateEventInvokeConfig(n) => (n, 'u'),
        LambdaOp::GetEventInvokeConfig(n) => (n, 'g'),
        LambdaOp::DeleteEventInvokeConfig(n) => (n, 'd'),
        _ => return lambda_error(500, "ServiceException", "misrouted event invoke config"),
    };
    let run = || -> Result<Answer, Answer> {
        // A change holds the function's name (see `Registry::get_locked`): a
        // delete under way does not leave its queue behind, created again.
        let (key, qualifier) = target_key(raw, req)?;
        let (f, _held) = match kind {
            'g' => (plane.functions.get(&key), None),
            _ => match plane.functions.get_locked(&key) {
                Ok(Some((f, held))) => (Some(f), Some(held)),
                Ok(None) => (None, None),
                Err(e) => return Err(lambda::name_busy(e)),
            },
        };
        let f = f.ok_or_else(|| not_found(&key))?;
        let qualifier = qualifier_of(&f, qualifier);
        let region = req
            .header("authorization")
            .and_then(|h| sigv4::parse_authorization(h).ok())
            .map(|a| a.region.to_string())
            .unwrap_or_else(|| REGION_DEFAULT.to_string());
        let key = Registry::async_key(&f).to_string();
        let arn = match qualifier.as_str() {
            "" => format!("arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{key}"),
            q => format!("arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{key}:{q}"),
        };
        let missing = || {
            lambda_error(
                404,
                "ResourceNotFoundException",
                &format!("The function {arn} doesn't have an EventInvokeConfig"),
            )
        };
        let out = |c: EventConfig| {
            Reply::new(
                200,
                "application/json",
                json!({
                    "LastModified": c.modified_ms as f64 / 1000.0,
                    "FunctionArn": arn,
                    "MaximumRetryAttempts": c.retries_max,
                    "MaximumEventAgeInSeconds": c.event_age_s_max,
                    "DestinationConfig": { "OnSuccess": {}, "OnFailure": {} },
                })
                .to_string()
                .into_bytes(),
            )
        };
        // Reading or deleting settings makes no queue: one that does not
        // exist has none (nor do its events).
        let async_events = &plane.functions.async_events;
        match kind {
            'g' => async_events
                .get(&key)
                .and_then(|events| events.config(&qualifier))
                .map(out)
                .ok_or_else(missing),
            'd' => {
                let events = async_events.get(&key).ok_or_else(missing)?;
                events.config(&qualifier).ok_or_else(missing)?;
                events.edit_config(&qualifier, |_| None).map_err(stored)?;
                Ok(lambda::no_content())
            }
            _ => {
                let input = config_input(body)?;
                // The name is held: the function cannot be deleted meanwhile.
                let events = async_events
                    .queue_for(&key, || true)
                    .map_err(stored)?
                    .ok_or_else(missing)?;
                let now = crate::util::time::unix_time_ms();
                let c = events
                    .edit_config(&qualifier, |old| {
                        // Put replaces (unset fields take their defaults); Update changes what is given.
                        let mut c = match (kind, old) {
                            ('u', Some(old)) => old,
                            _ => EventConfig::default(),
                        };
                        if let Some(r) = input.maximum_retry_attempts {
                            c.retries_max = r as u32;
                        }
                        if let Some(a) = input.maximum_event_age_in_seconds {
                            c.event_age_s_max = a as u64;
                        }
                        c.modified_ms = now;
                        Some(c)
                    })
                    .map_err(stored)?
                    .expect("just set");
                Ok(out(c))
            }
        }
    };
    run().unwrap_or_else(|a| a)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct ConfigInput {
    maximum_retry_attempts: Option<i64>,
    maximum_event_age_in_seconds: Option<i64>,
    destination_config: Option<Value>,
}

/// Reads and checks an event invoke config body as Lambda does.
fn config_input(body: &[u8]) -> Result<ConfigInput, Answer> {
    let input: ConfigInput = lambda::parse(body)?;
    let validation = |field: &str, v: i64, constraint: &str| {
        lambda_error(
            400,
            "ValidationException",
            &format!("1 validation error detected: Value '{v}' at '{field}' failed to satisfy constraint: Member must have value {constraint}"),
        )
    };
    if let Some(r) = input.maximum_retry_attempts {
        if r < 0 {
            return Err(validation(
                "maximumRetryAttempts",
                r,
                "greater than or equal to 0",
            ));
        }
        if r > i64::from(RETRIES_MAX) {
            return Err(validation(
                "maximumRetryAttempts",
                r,
                &format!("less than or equal to {RETRIES_MAX}"),
            ));
        }
    }
    if let Some(a) = input.maximum_event_age_in_seconds {
        if a < EVENT_AGE_S_MIN as i64 {
            return Err(validation(
                "maximumEventAgeInSeconds",
                a,
                &format!("greater than or equal to {EVENT_AGE_S_MIN}"),
            ));
        }
        if a > EVENT_AGE_S_MAX as i64 {
            return Err(validation(
                "maximumEventAgeInSeconds",
                a,
                &format!("less than or equal to {EVENT_AGE_S_MAX}"),
            ));
        }
    }
    let has_destination = |which: &str| {
        input
            .destination_config
            .as_ref()
            .and_then(|d| d.get(which))
            .and_then(|o| o.get("Destination"))
            .is_some()
    };
    if has_destination("OnSuccess") || has_destination("OnFailure") {
        return Err(invalid(
            "hearth has no destinations: failed events are kept and listed at GET /functions/<id>/async/failed \
             (and POSTed to the server's --async-failure-webhook, if set)",
        ));
    }
    Ok(input)
}

fn stored(e: std::io::Error) -> Answer {
    lambda_error(
        500,
        "ServiceException",
        &format!("cannot store the settings: {e}"),
    )
}

/// `GET /functions/<id or name>/async/failed[?skip=<n>]`: a page of the
/// events given up, with their errors, and the queue's state. A page holds
/// at most [`crate::functions::async_events::failed::LIST_BYTES_MAX`] of
/// records; `older` says how many more there are, and `skip` the next page's
/// `skip`.
pub(super) fn failed_list(plane: &Plane, id: &str, query: &str) -> Answer {
    let Some(f) = plane.functions.get(id) else {
        return Reply::error(
            404,
            "function_not_found",
            &format!("no function with id {id}"),
        );
    };
    let mut skip = 0;
    for (k, v) in crate::control::settings::parse_query(query) {
        match (k.as_str(), v.parse::<usize>()) {
            ("skip", Ok(n)) => skip = n,
            _ => {
                return Reply::error(
                    400,
                    "invalid_query",
                    &format!("unknown or invalid parameter {k}={v} (takes skip=<n>)"),
                )
            }
        }
    }
    let key = Registry::async_key(&f);
    let (failed, depth) = match plane.functions.async_events.get(key) {
        None => (Ok(Listing::default()), 0),
        Some(q) => (q.failed(skip), q.queue.depth()),
    };
    match failed {
        Ok(page) => {
            // The records are spliced in as stored (JSON written by the
            // store), not parsed and printed again: the page is the only copy.
            let mut body = serde_json::to_vec(&json!({
                "function": key,
                "queued": depth,
                "older": page.older,
                "skip": skip + page.listed,
            }))
            .expect("json");
            assert_eq!(body.pop(), Some(b'}'));
            body.reserve_exact(page.records.len() + 12);
            body.extend_from_slice(b",\"failed\":");
            body.extend_from_slice(&page.records);
            body.push(b'}');
            Reply::new(200, "application/json", body)
        }
        Err(e) => Reply::error(500, "io", &format!("cannot read the failed events: {e}")),
    }
}
