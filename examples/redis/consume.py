#!/usr/bin/env python3
"""Read one sluice collection stream from Redis and resume after a restart.

    pip install redis
    python3 consume.py --stream sluice:c:app.bsky.feed.like --cursor-file like.cursor

Each entry's id is its cursor: the id of the last entry handled is saved to a file after
every batch, and the next run reads from there (XREAD returns entries after the id given),
so stopping and starting this script, sluice or Redis loses nothing and repeats nothing.
Count by the event's own `time_us` (source time), never by the clock: after a catch-up,
a day's events arrive late but still belong to their day.

Writes one line per event to stdout: `<entry id> <event JSON>`.
"""
import argparse
import json
import os
import sys
import time

import redis


def load_cursor(path, start):
    try:
        with open(path) as f:
            return f.read().strip() or start
    except FileNotFoundError:
        return start


def save_cursor(path, entry_id):
    # Write then rename: a crash leaves the old cursor or the new one, never half of one.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(entry_id)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--stream", default="sluice:c:app.bsky.feed.like")
    p.add_argument("--cursor-file", default="sluice.cursor")
    p.add_argument("--start", default="0-0",
                   help="where a first run starts: 0-0 = oldest entry kept, $ = only new ones")
    p.add_argument("--max", type=int, default=0, help="stop after this many events (0 = never)")
    p.add_argument("--idle-exit", type=float, default=0,
                   help="stop after this many seconds without an event (0 = never)")
    args = p.parse_args()

    cursor = load_cursor(args.cursor_file, args.start)
    seen, idle_since = 0, time.monotonic()
    r = redis.Redis.from_url(args.url, socket_timeout=10)
    while True:
        try:
            count = 500 if args.max == 0 else min(500, args.max - seen)
            reply = r.xread({args.stream: cursor}, count=count, block=1000)
        except redis.exceptions.ConnectionError as e:
            # Redis restarting: wait and read again from the same cursor.
            print(f"redis unavailable ({e}); retrying", file=sys.stderr)
            time.sleep(0.5)
            continue
        if cursor == "$" and not reply:
            continue
        entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            entry_id = entry_id.decode()
            event = json.loads(fields[b"event"])
            # fields also has b"time_us", b"seq" and b"did" for consumers that skip the JSON.
            sys.stdout.write(f"{entry_id} {json.dumps(event, separators=(',', ':'))}\n")
            cursor = entry_id
            seen += 1
        if entries:
            sys.stdout.flush()
            save_cursor(args.cursor_file, cursor)
            idle_since = time.monotonic()
        if args.max and seen >= args.max:
            return
        if args.idle_exit and time.monotonic() - idle_since > args.idle_exit:
            return


if __name__ == "__main__":
    main()
