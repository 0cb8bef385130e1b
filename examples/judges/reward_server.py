#!/usr/bin/env python3
"""A tiny reward server in OpenRLHF's remote protocol, dependency-free:
    python3 examples/judges/reward_server.py --port 8000
    candor ... --judge http://127.0.0.1:8000/score

POST /score {"query": [prompt+response, ...], "prompts": [prompt, ...], "labels": [label, ...]}
         -> {"rewards": [score, ...]}
`labels` carries the prompt line's `reference`; the response is the query after its prompt.
It scores as candor's built-in `reference` judge (reference_judge.py holds the rule).
"""
import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_judge import score  # noqa: E402


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves a whole run
    disable_nagle_algorithm = True  # headers and body go as two writes; don't hold the second

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rewards = [
            score(q[len(p):], label)
            for q, p, label in zip(body["query"], body["prompts"], body["labels"])
        ]
        answer = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):  # quiet: one line per request is noise in a run
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = ap.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    # the bound port on stdout first, so a caller that asked for port 0 can find it
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
