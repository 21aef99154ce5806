#!/usr/bin/env python3
"""Sends the same sequence of DCRF requests to two servers and shows where their answers
differ: a quick wire-compatibility check between dcrf-demo and the Python baseline.

Both servers should be freshly started with the same seed (5 todos or more), e.g.

    target/debug/dcrf-demo --bind 127.0.0.1:8000 --database sqlite::memory: --seed 5
    bench/python/run.sh --bind 127.0.0.1:8001 --seed 5
    bench/python/.venv/bin/python bench/parity.py ws://127.0.0.1:8000 ws://127.0.0.1:8001

Every request is sent, then every frame that arrives within --quiet seconds is collected
(replies and pushes, in arrival order). Exit status 1 if any step differs.
"""
import argparse
import json
import sys

from websockets.sync.client import connect

STEPS = [
    ("echo", [
        {"action": "echo", "request_id": 1, "a": 1, "b": [1, 2], "c": {"d": None}},
        {"action": "echo", "request_id": "str-id"},
        {"action": "whoami", "request_id": 2},
        {"request_id": 3, "x": 1},
        {"action": "nope", "request_id": 4},
    ]),
    ("todos", [
        {"action": "list", "request_id": 10},
        {"action": "list", "request_id": 11, "limit": 2, "offset": 1},
        {"action": "list", "request_id": 12, "offset": 99},
        {"action": "retrieve", "request_id": 13, "pk": 1},
        {"action": "retrieve", "request_id": 14, "pk": 999},
        {"action": "create", "request_id": 15, "data": {"title": "new"}},
        {"action": "create", "request_id": 16, "data": {}},
        {"action": "create", "request_id": 17, "data": {"title": "x" * 201}},
        {"action": "create", "request_id": 18, "data": {"title": ""}},
        {"action": "update", "request_id": 19, "pk": 2, "data": {"title": "two"}},
        {"action": "update", "request_id": 20, "pk": 2, "data": {"done": True}},
        {"action": "patch", "request_id": 21, "pk": 2, "data": {"done": True}},
        {"action": "patch", "request_id": 22, "pk": 999, "data": {"done": True}},
        {"action": "delete", "request_id": 23, "pk": 3},
        {"action": "delete", "request_id": 24, "pk": 3},
        {"action": "subscribe_instance", "request_id": "s1", "pk": 1},
        {"action": "subscribe_instance", "request_id": "s2", "pk": 999},
        {"action": "patch", "request_id": 25, "pk": 1, "data": {"title": "watched"}},
        {"action": "patch", "request_id": 26, "pk": 4, "data": {"title": "not watched"}},
        {"action": "unsubscribe_instance", "request_id": "s1", "pk": 1},
        {"action": "patch", "request_id": 27, "pk": 1, "data": {"title": "unwatched"}},
        {"action": "subscribe_to_all", "request_id": "all"},
        {"action": "create", "request_id": 28, "data": {"title": "seen by all"}},
        {"action": "patch", "request_id": 29, "pk": 1, "data": {"done": True}},
        {"action": "bulk_set_done", "request_id": 30, "ids": [1, 2], "done": False},
        {"action": "delete", "request_id": 31, "pk": 4},
        {"action": "unsubscribe_from_all", "request_id": "all"},
        {"action": "patch", "request_id": 32, "pk": 1, "data": {"done": True}},
    ]),
]


def collect(ws, quiet):
    frames = []
    while True:
        try:
            frames.append(json.loads(ws.recv(timeout=quiet)))
        except TimeoutError:
            return frames


def run(base, quiet):
    out = []
    for path, requests in STEPS:
        with connect(f"{base}/ws/{path}/", open_timeout=10) as ws:
            for req in requests:
                ws.send(json.dumps(req))
                out.append((req, collect(ws, quiet)))
    return out


def canon(frames):
    # Ids of rows created during the run may differ; everything else must match.
    return json.dumps(frames, sort_keys=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="base URL of the first server, e.g. ws://127.0.0.1:8000")
    ap.add_argument("b", help="base URL of the second server")
    ap.add_argument("--quiet", type=float, default=0.3,
                    help="seconds without a frame that end a step (default 0.3)")
    ap.add_argument("--all", action="store_true", help="print matching steps too")
    args = ap.parse_args()
    ra, rb = run(args.a, args.quiet), run(args.b, args.quiet)
    differ = 0
    for (req, fa), (_, fb) in zip(ra, rb):
        same = canon(fa) == canon(fb)
        differ += not same
        if same and not args.all:
            continue
        print(("same  " if same else "DIFF  ") + json.dumps(req))
        for name, frames in ((args.a, fa), (args.b, fb)) if not same else ((args.a, fa),):
            print(f"  {name}:")
            for f in frames or ["(nothing)"]:
                print(f"    {json.dumps(f)}")
    print(f"{len(ra) - differ} steps match, {differ} differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
