"""A webhook receiver for keel's tests that verifies Standard Webhooks signatures with the
`standardwebhooks` package (an implementation of the specification independent of keel's).

Usage: webhook_receiver.py PORT SECRET

Every POST is verified with SECRET and recorded; it is answered 204 when the signature is
valid and 401 otherwise. GET /received answers the records as a JSON list of
{"verified", "error", "headers", "body"}.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

PORT = int(sys.argv[1])
WEBHOOK = Webhook(sys.argv[2])
RECEIVED = []
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = {"headers": headers, "body": body.decode("utf-8", "replace")}
        try:
            WEBHOOK.verify(body, headers)
            record["verified"] = True
            record["error"] = None
        except Exception as error:  # any refusal of the library is a failed verification
            record["verified"] = False
            record["error"] = repr(error)
        with LOCK:
            RECEIVED.append(record)
        self.send_response(204 if record["verified"] else 401)
        self.end_headers()

    def do_GET(self):
        with LOCK:
            answer = json.dumps(RECEIVED).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
