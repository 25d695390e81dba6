"""Runs the PyPI `atproto` JetstreamClient (Jetstream v2) against a sluice and reports
what it received, as one JSON object on stdout.

Driven by tests/wire/atproto_client.rs. The client is used as its users use it: constructed with
its defaults (compression on unless --no-compress), started, and stopped from its own
message callback once `--expect` events have arrived. The only addition is a count of the
raw websocket messages by type, so the test can tell compressed (binary) delivery from the
client's silent fallback to text.

Exit status: 0 when every expected event arrived, 1 otherwise (the JSON says why), 2 when
the `atproto` package is missing.
"""

import argparse
import json
import sys
import threading

try:
    from atproto import JetstreamClient
except ImportError as e:  # pragma: no cover - the test wants this loud
    print(f'the PyPI package atproto is required (pip install atproto): {e}', file=sys.stderr)
    sys.exit(2)


class CountingClient(JetstreamClient):
    """JetstreamClient that also counts the raw messages it decodes, by type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.binary_messages = 0
        self.text_messages = 0

    def _decode_frame(self, raw_frame):
        if isinstance(raw_frame, (bytes, bytearray)):
            self.binary_messages += 1
        else:
            self.text_messages += 1
        return super()._decode_frame(raw_frame)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--base-uri', required=True, help='e.g. ws://127.0.0.1:6008/xrpc')
    parser.add_argument('--cursor', type=int, required=True)
    parser.add_argument('--expect', type=int, required=True, help='events to wait for')
    parser.add_argument('--timeout', type=float, default=30.0)
    parser.add_argument('--no-compress', action='store_true')
    args = parser.parse_args()

    client = CountingClient(
        params={'cursor': args.cursor},
        base_uri=args.base_uri,
        compress=not args.no_compress,
        recv_timeout=args.timeout,
    )
    events = []
    infos = []

    def on_message(message):
        seq = getattr(message, 'seq', None)
        if seq is None:
            infos.append(getattr(message, 'name', None))
            return
        events.append([seq, message.did, message.py_type])
        if len(events) >= args.expect:
            client.stop()

    timer = threading.Timer(args.timeout, client.stop)
    timer.start()
    error = None
    try:
        client.start(on_message)
    except Exception as e:  # noqa: BLE001 - reported, the test decides
        error = f'{type(e).__name__}: {e}'
    finally:
        timer.cancel()

    report = {
        'events': events,
        'infos': infos,
        'compressed': client.compressed,
        'binary_messages': client.binary_messages,
        'text_messages': client.text_messages,
        'error': error,
    }
    print(json.dumps(report))
    return 0 if error is None and len(events) >= args.expect else 1


if __name__ == '__main__':
    sys.exit(main())
