//! Maps a request's method and path to what serves it.

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `GET /healthz`
    Health,
    /// `GET /metrics`
    Metrics,
    /// `POST /deploy`
    Deploy,
    /// `GET /functions`
    ListFunctions,
    /// `GET /functions/<id>`
    GetFunction(&'a str),
    /// `DELETE /functions/<id>`
    DeleteFunction(&'a str),
    /// `GET /functions/<id>/logs`
    Logs(&'a str),
    /// `GET /functions/<id>/async/failed`
    AsyncFailed(&'a str),
    /// `ANY /f/<id>[/<path>]`; `path` is what follows the id (`/` when empty).
    Invoke { id: &'a str, path: &'a str },
    /// The Lambda service API (`/2015-03-31/functions…` and its siblings).
    Lambda(LambdaOp<'a>),
    /// A known path with the wrong method; carries the allowed methods.
    MethodNotAllowed(&'static str),
    /// Nothing here.
    NotFound,
}

/// A Lambda service API operation; the string is the `FunctionName` path
/// parameter as sent (percent-encoded: a name or an ARN).
#[derive(Debug, PartialEq, Eq)]
pub enum LambdaOp<'a> {
    /// `POST /2015-03-31/functions`
    Create,
    /// `GET /2015-03-31/functions/`
    List,
    /// `GET /2015-03-31/functions/{name}`
    Get(&'a str),
    /// `DELETE /2015-03-31/functions/{name}`
    Delete(&'a str),
    /// `GET /2015-03-31/functions/{name}/configuration`
    GetConfiguration(&'a str),
    /// `PUT /2015-03-31/functions/{name}/configuration`
    UpdateConfiguration(&'a str),
    /// `PUT /2015-03-31/functions/{name}/code`
    UpdateCode(&'a str),
    /// `POST /2015-03-31/functions/{name}/invocations`
    Invoke(&'a str),
    /// `POST /2021-11-15/functions/{name}/response-streaming-invocations`
    InvokeStream(&'a str),
    /// `PUT /2017-10-31/functions/{name}/concurrency`
    PutConcurrency(&'a str),
    /// `GET /2019-09-30/functions/{name}/concurrency`
    GetConcurrency(&'a str),
    /// `POST /2015-03-31/functions/{name}/versions`
    PublishVersion(&'a str),
    /// `GET /2015-03-31/functions/{name}/versions`
    ListVersions(&'a str),
    /// `POST /2015-03-31/functions/{name}/aliases`
    CreateAlias(&'a str),
    /// `GET /2015-03-31/functions/{name}/aliases`
    ListAliases(&'a str),
    /// `GET /2015-03-31/functions/{name}/aliases/{alias}`
    GetAlias(&'a str, &'a str),
    /// `PUT /2015-03-31/functions/{name}/aliases/{alias}`
    UpdateAlias(&'a str, &'a str),
    /// `DELETE /2015-03-31/functions/{name}/aliases/{alias}`
    DeleteAlias(&'a str, &'a str),
    /// `PUT /2019-09-25/functions/{name}/event-invoke-config`
    PutEventInvokeConfig(&'a str),
    /// `POST /2019-09-25/functions/{name}/event-invoke-config`
    UpdateEventInvokeConfig(&'a str),
    /// `GET /2019-09-25/functions/{name}/event-invoke-config`
    GetEventInvokeConfig(&'a str),
    /// `DELETE /2019-09-25/functions/{name}/event-invoke-config`
    DeleteEventInvokeConfig(&'a str),
}

/// Routes the Lambda service API's paths (`rest` follows `/<version>/functions`).
fn lambda_route<'a>(method: &str, version: &str, rest: &'a str) -> Route<'a> {
    use LambdaOp as Op;
    let wrong = Route::MethodNotAllowed;
    let (name, sub) = match rest.strip_prefix('/') {
        None | Some("") => {
            return match (version, method) {
                ("2015-03-31", "POST") => Route::Lambda(Op::Create),
                ("2015-03-31", "GET") => Route::Lambda(Op::List),
                ("2015-03-31", _) => wrong("GET, POST"),
                _ => Route::NotFound,
            }
        }
        Some(r) => match r.split_once('/') {
            Some((n, sub)) => (n, sub),
            None => (r, ""),
        },
    };
    if name.is_empty() {
        return Route::NotFound;
    }
    let op = match (version, sub, method) {
        ("2015-03-31", "", "GET") => Op::Get(name),
        ("2015-03-31", "", "DELETE") => Op::Delete(name),
        ("2015-03-31", "", _) => return wrong("GET, DELETE"),
        ("2015-03-31", "configuration", "GET") => Op::GetConfiguration(name),
        ("2015-03-31", "configuration", "PUT") => Op::UpdateConfiguration(name),
        ("2015-03-31", "configuration", _) => return wrong("GET, PUT"),
        ("2015-03-31", "code", "PUT") => Op::UpdateCode(name),
        ("2015-03-31", "code", _) => return wrong("PUT"),
        ("2015-03-31", "versions", "POST") => Op::PublishVersion(name),
        ("2015-03-31", "versions", "GET") => Op::ListVersions(name),
        ("2015-03-31", "versions", _) => return wrong("GET, POST"),
        ("2015-03-31", "aliases", "POST") => Op::CreateAlias(name),
        ("2015-03-31", "aliases", "GET") => Op::ListAliases(name),
        ("2015-03-31", "aliases", _) => return wrong("GET, POST"),
        ("2015-03-31", sub, _)
            if sub.starts_with("aliases/") && sub.len() > 8 && !sub[8..].contains('/') =>
        {
            let alias = &sub[8..];
            match method {
                "GET" => Op::GetAlias(name, alias),
                "PUT" => Op::UpdateAlias(name, alias),
                "DELETE" => Op::DeleteAlias(name, alias),
                _ => return wrong("GET, PUT, DELETE"),
            }
        }
        ("2015-03-31", "invocations", "POST") => Op::Invoke(name),
        ("2015-03-31", "invocations", _) => return wrong("POST"),
        ("2021-11-15", "response-streaming-invocations", "POST") => Op::InvokeStream(name),
        ("2021-11-15", "response-streaming-invocations", _) => return wrong("POST"),
        ("2017-10-31", "concurrency", "PUT") => Op::PutConcurrency(name),
        ("2017-10-31", "concurrency", _) => return wrong("PUT"),
        ("2019-09-30", "concurrency", "GET") => Op::GetConcurrency(name),
        ("2019-09-30", "concurrency", _) => return wrong("GET"),
        ("2019-09-25", "event-invoke-config", m) => match m {
            "PUT" => Op::PutEventInvokeConfig(name),
            "POST" => Op::UpdateEventInvokeConfig(name),
            "GET" => Op::GetEventInvokeConfig(name),
            "DELETE" => Op::DeleteEventInvokeConfig(name),
            _ => return wrong("GET, PUT, POST, DELETE"),
        },
        _ => return Route::NotFound,
    };
    Route::Lambda(op)
}

/// Routes `method` + `path` (the target without its query).
pub fn route<'a>(method: &str, path: &'a str) -> Route<'a> {
    let get = method == "GET" || method == "HEAD";
    for version in [
        "2015-03-31",
        "2017-10-31",
        "2019-09-30",
        "2019-09-25",
        "2021-11-15",
    ] {
        if let Some(rest) = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(version))
            .and_then(|p| p.strip_prefix("/functions"))
        {
            if rest.is_empty() || rest.starts_with('/') {
                return lambda_route(method, version, rest);
            }
        }
    }
    if let Some(rest) = path.strip_prefix("/f/") {
        let (id, sub) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        return if id.is_empty() {
            Route::NotFound
        } else {
            Route::Invoke { id, path: sub }
        };
    }
    match path {
        "/healthz" => {
            return if get {
                Route::Health
            } else {
                Route::MethodNotAllowed("GET, HEAD")
            }
        }
        "/metrics" => {
            return if get {
                Route::Metrics
            } else {
                Route::MethodNotAllowed("GET, HEAD")
            }
        }
        "/deploy" => {
            return if method == "POST" {
                Route::Deploy
            } else {
                Route::MethodNotAllowed("POST")
            }
        }
        "/functions" | "/functions/" => {
            return if get {
                Route::ListFunctions
            } else {
                Route::MethodNotAllowed("GET, HEAD")
            }
        }
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/functions/") {
        if let Some(id) = rest.strip_suffix("/async/failed") {
            if !id.contains('/') && !id.is_empty() {
                return if get {
                    Route::AsyncFailed(id)
                } else {
                    Route::MethodNotAllowed("GET, HEAD")
                };
            }
        }
        if let Some(id) = rest.strip_suffix("/logs") {
            if !id.contains('/') && !id.is_empty() {
                return if get {
                    Route::Logs(id)
                } else {
                    Route::MethodNotAllowed("GET, HEAD")
                };
            }
        } else if !rest.contains('/') {
            return match method {
                "GET" | "HEAD" => Route::GetFunction(rest),
                "DELETE" => Route::DeleteFunction(rest),
                _ => Route::MethodNotAllowed("GET, HEAD, DELETE"),
            };
        }
    }
    Route::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_paths_split_id_and_rest() {
        assert_eq!(
            route("POST", "/f/abc/greet/x"),
            Route::Invoke {
                id: "abc",
                path: "/greet/x"
            }
        );
        assert_eq!(
            route("GET", "/f/abc"),
            Route::Invoke {
                id: "abc",
                path: "/"
            }
        );
        assert_eq!(
            route("GET", "/f/abc/"),
            Route::Invoke {
                id: "abc",
                path: "/"
            }
        );
        assert_eq!(route("GET", "/f/"), Route::NotFound);
    }

    #[test]
    fn control_routes_check_methods() {
        assert_eq!(route("GET", "/healthz"), Route::Health);
        assert_eq!(
            route("POST", "/healthz"),
            Route::MethodNotAllowed("GET, HEAD")
        );
        assert_eq!(route("DELETE", "/functions/x"), Route::DeleteFunction("x"));
        assert_eq!(route("GET", "/functions/x/logs"), Route::Logs("x"));
        assert_eq!(
            route("GET", "/functions/x/async/failed"),
            Route::AsyncFailed("x")
        );
        assert_eq!(route("GET", "/nope"), Route::NotFound);
    }

    #[test]
    fn lambda_service_paths_route_to_operations() {
        use LambdaOp as Op;
        let l = |m, p| route(m, p);
        assert_eq!(
            l("POST", "/2015-03-31/functions"),
            Route::Lambda(Op::Create)
        );
        assert_eq!(l("GET", "/2015-03-31/functions/"), Route::Lambda(Op::List));
        assert_eq!(
            l("GET", "/2015-03-31/functions/f"),
            Route::Lambda(Op::Get("f"))
        );
        assert_eq!(
            l("DELETE", "/2015-03-31/functions/f"),
            Route::Lambda(Op::Delete("f"))
        );
        assert_eq!(
            l("PUT", "/2015-03-31/functions/f/configuration"),
            Route::Lambda(Op::UpdateConfiguration("f"))
        );
        assert_eq!(
            l("PUT", "/2015-03-31/functions/f/code"),
            Route::Lambda(Op::UpdateCode("f"))
        );
        assert_eq!(
            l("POST", "/2015-03-31/functions/f/invocations"),
            Route::Lambda(Op::Invoke("f"))
        );
        assert_eq!(
            l("PUT", "/2017-10-31/functions/f/concurrency"),
            Route::Lambda(Op::PutConcurrency("f"))
        );
        assert_eq!(
            l("PUT", "/2015-03-31/functions/f"),
            Route::MethodNotAllowed("GET, DELETE")
        );
        assert_eq!(l("GET", "/2015-03-31/functions/f/nope"), Route::NotFound);
        assert_eq!(
            l("POST", "/2015-03-31/functions/f/versions"),
            Route::Lambda(Op::PublishVersion("f"))
        );
        assert_eq!(
            l("PUT", "/2015-03-31/functions/f/aliases/live"),
            Route::Lambda(Op::UpdateAlias("f", "live"))
        );
        assert_eq!(
            l("GET", "/2015-03-31/functions/f/aliases/a/b"),
            Route::NotFound
        );
        assert_eq!(l("GET", "/2015-03-31/functionsx"), Route::NotFound);
        assert_eq!(
            l("POST", "/2019-09-25/functions/f/event-invoke-config"),
            Route::Lambda(Op::UpdateEventInvokeConfig("f"))
        );
        assert_eq!(
            l("PATCH", "/2019-09-25/functions/f/event-invoke-config"),
            Route::MethodNotAllowed("GET, PUT, POST, DELETE")
        );
    }
}
