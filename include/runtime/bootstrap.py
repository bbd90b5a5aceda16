"""hearth's Python runtime: a Lambda Runtime API client.

Started by the guest agent (runtime-API mode) as `/usr/bin/python3
/hearth/bootstrap.py` with the Lambda environment. It imports the handler
`_HANDLER` (`module.function`, the module path relative to LAMBDA_TASK_ROOT,
`/` or `.` separated), then loops: GET /runtime/invocation/next, call
handler(event, context), POST the JSON result to .../response, or an error
document ({errorMessage, errorType, stackTrace}) to .../error. An import
failure is posted to /runtime/init/error and ends the process, as Lambda's
Python runtime does. Standard library only.
"""

import decimal
import http.client
import importlib
import json
import logging
import os
import sys
import time
import traceback

API = os.environ.get("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
PREFIX = "/2018-06-01/runtime"


class Api:
    """One keep-alive HTTP connection to the Runtime API, reopened when it breaks."""

    def __init__(self, address):
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.conn = None

    def call(self, method, path, body=None, headers=None):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port)
            try:
                self.conn.request(method, PREFIX + path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                return resp.status, resp.headers, resp.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post_json(self, path, doc, headers=None):
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        return self.call("POST", path, json.dumps(doc).encode(), h)


class LambdaContext:
    """The context object Lambda's Python runtime passes to handlers."""

    def __init__(self, request_id, deadline_ms, arn, client_context=None, identity=None):
        self.aws_request_id = request_id
        self.invoked_function_arn = arn
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME")
        self.client_context = client_context
        self.identity = identity
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self):
        return max(int(self._deadline_ms - time.time() * 1000), 0)

    def log(self, msg):
        sys.stdout.write(str(msg))
        sys.stdout.flush()


class RequestIdFilter(logging.Filter):
    """Puts the running invocation's request id on every log record."""

    request_id = ""

    def filter(self, record):
        record.aws_request_id = RequestIdFilter.request_id
        return True


def setup_logging():
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n",
            "%Y-%m-%dT%H:%M:%S",
        )
    )
    handler.formatter.converter = time.gmtime
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def error_doc(exc, error_type=None):
    tb = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    return {
        "errorMessage": str(exc),
        "errorType": error_type or type(exc).__name__,
        "requestId": RequestIdFilter.request_id,
        "stackTrace": [line.rstrip("\n") for line in traceback.format_list(tb)],
    }


def log_error(doc):
    sys.stdout.write("[ERROR] %s: %s\n" % (doc["errorType"], doc["errorMessage"]))
    if doc.get("stackTrace"):
        sys.stdout.write("Traceback (most recent call last):\n")
        for line in doc["stackTrace"]:
            sys.stdout.write(line + "\n")
    sys.stdout.flush()


class InitError(Exception):
    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type


def load_handler(handler):
    module_path, _, function = handler.rpartition(".")
    if not module_path or not function:
        raise InitError("Runtime.MalformedHandlerName", "Bad handler '%s': not enough values to unpack" % handler)
    module_name = module_path.replace("/", ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InitError("Runtime.ImportModuleError", "Unable to import module '%s': %s" % (module_path, e)) from e
    except SyntaxError as e:
        raise InitError("Runtime.UserCodeSyntaxError", "Syntax error in module '%s': %s" % (module_path, e)) from e
    fn = getattr(module, function, None)
    if fn is None:
        raise InitError("Runtime.HandlerNotFound", "Handler '%s' missing on module '%s'" % (function, module_path))
    return fn


def to_json(value):
    def default(o):
        if isinstance(o, decimal.Decimal):
            return int(o) if o == o.to_integral_value() else float(o)
        raise TypeError("Object of type %s is not JSON serializable" % type(o).__name__)

    return json.dumps(value, default=default).encode()


def main():
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    task_root = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
    sys.path.insert(0, task_root)
    setup_logging()
    api = Api(API)
    try:
        handler = load_handler(os.environ.get("_HANDLER", ""))
    except Exception as e:  # noqa: BLE001 - every init failure is reported
        doc = error_doc(e, getattr(e, "error_type", None))
        log_error(doc)
        api.post_json("/init/error", doc, {"Lambda-Runtime-Function-Error-Type": doc["errorType"]})
        sys.exit(1)

    while True:
        status, headers, body = api.call("GET", "/invocation/next")
        if status != 200:
            sys.stderr.write("hearth python runtime: /next answered %d: %r\n" % (status, body[:200]))
            sys.exit(1)
        request_id = headers.get("Lambda-Runtime-Aws-Request-Id", "")
        RequestIdFilter.request_id = request_id
        trace = headers.get("Lambda-Runtime-Trace-Id")
        if trace:
            os.environ["_X_AMZN_TRACE_ID"] = trace
        else:
            os.environ.pop("_X_AMZN_TRACE_ID", None)
        context = LambdaContext(
            request_id,
            int(headers.get("Lambda-Runtime-Deadline-Ms", "0") or 0),
            headers.get("Lambda-Runtime-Invoked-Function-Arn", ""),
            json.loads(headers["Lambda-Runtime-Client-Context"]) if headers.get("Lambda-Runtime-Client-Context") else None,
            json.loads(headers["Lambda-Runtime-Cognito-Identity"]) if headers.get("Lambda-Runtime-Cognito-Identity") else None,
        )
        path = "/invocation/%s" % request_id
        try:
            event = json.loads(body) if body else None
            result = handler(event, context)
            try:
                payload = to_json(result)
            except (TypeError, ValueError) as e:
                raise InitError("Runtime.MarshalError", "Unable to marshal response: %s" % e) from e
        except Exception as e:  # noqa: BLE001 - the handler's failure is the invocation's
            doc = error_doc(e, getattr(e, "error_type", None))
            log_error(doc)
            sys.stderr.flush()
            api.post_json(path + "/error", doc, {"Lambda-Runtime-Function-Error-Type": doc["errorType"]})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        api.call("POST", path + "/response", payload, {"Content-Type": "application/json"})


if __name__ == "__main__":
    main()
