"""python -m bench PROFILE [options]: hubcore/hubserver benchmarks, side by side with peers.

profiles:
  codec    encode and parse throughput of the typical event (ReceiveMessage with
           one ~320-byte JSON text) in hubcore and aiosignalr, JSON and
           MessagePack, plus hubcore's encode-once broadcast; seeded, no sockets,
           no event loop (bench/core/codec.py)

  fanout   C WebSocket connections over S sites, events through the publish API
           (rate, burst or batches): deliveries/s, latency percentiles, exact
           lost/duplicated counts, server CPU and RSS, load-client CPU, for
           hubserver beside aiosignalr, python-socketio and a raw "ceiling"
  connect  N clients connecting at once (TCP, upgrade, JWT, handshake): conn/s, p99
  idle     RSS per idle connection at 10,000 connections with keep-alive running
  soak     N minutes (default 10) of connection churn, publishing, slow readers and
           garbage clients against one hubserver: RSS over time and its slope,
           deliveries lost, handler crashes, p99 of the well-behaved clients; a
           PASS/FAIL verdict (not run in CI)

Every profile prints its parameters and the machine, then its table; --json FILE
also writes all of it, with every sample, as JSON. A progress line on stderr
shows what is running (-q hides it).

examples:
  python -m bench codec
  python -m bench codec --rounds 9 --seconds-per-run 0.5 --json codec.json
  python -m bench codec --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from bench.environment import describe_environment
from bench.profile import BenchError, Profile
from bench.report import Progress, render_header, render_outcome, to_json, write_json

__all__ = ["PROFILE_MODULES", "build_parser", "load_profiles", "main"]

#: One module per profile, each defining ``PROFILE``; a new profile is one more line.
PROFILE_MODULES: Final = (
    "bench.core.codec",
    "bench.server.fanout",
    "bench.server.connect",
    "bench.server.idle",
    "bench.server.soak",
)


def load_profiles(modules: Sequence[str] = PROFILE_MODULES) -> dict[str, Profile]:
    """Import each profile module and index its ``PROFILE`` by name."""
    profiles: dict[str, Profile] = {}
    for module_name in modules:
        profile = getattr(importlib.import_module(module_name), "PROFILE", None)
        if not isinstance(profile, Profile):
            raise TypeError(f"{module_name} defines no PROFILE = Profile(...)")
        if profile.name in profiles:
            raise ValueError(f"two profiles are called {profile.name!r}")
        profiles[profile.name] = profile
    return profiles


def build_parser(profiles: dict[str, Profile]) -> argparse.ArgumentParser:
    """The command line: one subcommand per profile, with the common options on each."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the result to FILE as JSON"
    )
    common.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    subparsers = parser.add_subparsers(dest="profile", required=True, metavar="PROFILE")
    for profile in profiles.values():
        subparser = subparsers.add_parser(
            profile.name, parents=[common], help=profile.summary, description=profile.summary
        )
        profile.add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one profile; 0 when it ran (whatever the bar says), 2 when its result is void."""
    profiles = load_profiles()
    args = build_parser(profiles).parse_args(argv)
    profile = profiles[args.profile]
    try:
        run = profile.prepare(args)
    except ValueError as exc:  # an option out of range, as argparse would say it
        print(f"python -m bench {profile.name}: error: {exc}", file=sys.stderr)
        return 2
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    environment = describe_environment()
    print(render_header(profile.name, run.parameters, environment), flush=True)

    progress = Progress(None if args.quiet else sys.stderr)
    try:
        outcome = run.execute(progress)
    except BenchError as exc:
        print(f"python -m bench {profile.name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        progress.clear()
    print()
    print(render_outcome(outcome), flush=True)

    if args.json is not None:
        document = to_json(
            profile=profile.name,
            started_at=started_at,
            parameters=run.parameters,
            environment=environment,
            outcome=outcome,
        )
        write_json(args.json, document)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
