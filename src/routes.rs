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
    /// `ANY /f/<id>[/<path>]`; `path` is what follows the id (`/` when empty).
    Invoke { id: &'a str, path: &'a str },
    /// A known path with the wrong method; carries the allowed methods.
    MethodNotAllowed(&'static str),
    /// Nothing here.
    NotFound,
}

/// Routes `method` + `path` (the target without its query).
pub fn route<'a>(method: &str, path: &'a str) -> Route<'a> {
    let get = method == "GET" || method == "HEAD";
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
        assert_eq!(route("GET", "/nope"), Route::NotFound);
    }
}
