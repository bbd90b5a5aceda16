# A small Python function of the usual shape: a few standard-library imports at load, one
# handler. perf/runtime-api-bench.sh times its cold start against `python3 -c 'import app'`.
import base64
import datetime
import json
import logging
import urllib.parse
import uuid

log = logging.getLogger(__name__)


def handler(event, context):
    query = urllib.parse.parse_qs(event.get("rawQueryString", ""))
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({
            "id": str(uuid.uuid4()),
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "query": query,
            "echo": base64.b64encode(b"hello").decode(),
        }),
    }
