"""Live fuzzing: many clients send generated garbage to a real server.

For ``HUBSERVER_FUZZ_SECONDS`` in all (40 in CI, 12 otherwise; half of it
against one process, a quarter against ``--workers 2``, a quarter against
``--workers 2 --backplane redis://...``), ``HUBSERVER_FUZZ_CLIENTS`` clients
(32) each open short-lived connections in a loop, every one bounded by a
timeout, and send what a seeded ``random.Random`` makes of:

- HTTP requests: mutated valid requests (bad request lines, huge, many or
  duplicate headers, bad Content-Length and chunked bodies, bytes flipped),
  delivered at once, in pieces, dribbled, or with a body that never comes;
  keep-alive chains; pipelined bursts never read; resets and half-closes;
- WebSocket frames after a valid upgrade: bad opcodes, reserved bits, unmasked
  frames, lying lengths up to 2**64 - 1, fragmented or oversize control
  frames, bad close codes, invalid UTF-8, random bytes, ping floods; upgrades
  with the handshake and messages in the same write;
- hub messages after a valid handshake (JSON or MessagePack, or a broken
  handshake): random values, wrong types, invocations of unknown targets,
  ``Resume`` with huge, negative, float, string and other arguments,
  StreamInvocation, Close, pings, MessagePack garbage; clients that ask for
  replays, errors and pongs as fast as they can and never read; swarms of
  one subject over its connection limit; negotiate ids used twice;
- publish bodies: invalid JSON, deep nesting, huge numbers, wrong types,
  arrays of mixed validity, bad tokens, valid bursts (some ids repeated);
- and, all the while, a role revoked and granted again every 0.3 s.

Meanwhile two bystanders (JSON and MessagePack) subscribe to a site of their
own, ping as the official clients do, and must receive every event a steady
publisher sends there, exactly once and in order; the publisher retries a
503 with the same ids (the publish API is idempotent on ``id``). A third
bystander drops its connection every second or so (sometimes with a reset)
and resumes from the last seq it read: across all its connections it too
must see every event once, in order, with no Gap.

The server runs as ``python -m hubserver serve``: its RSS is what an operator
would see, a crash of a process cannot hide, and its log (a file) shows every
handler crash ("connection handler failed" and any other ERROR or
traceback). Afterwards it must still answer ``/healthz`` and ``/readyz``,
serve a fresh subscriber, let every subject open its full allowance of hub
connections (no count leaked), and drain on SIGTERM while garbage still
arrives, exiting with 0.

The seed is printed; ``HUBSERVER_FUZZ_SEED=<seed>`` replays a run's inputs
(each client has its own generator, so a client's inputs do not depend on
the timing of the others; the interleaving still does).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.lowlevel

from hubcore import encode_varint
from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey, ensure_dev_key
from hubserver.permissions import Role, SqlitePermissionStore

from .helpers import (
    HANDSHAKE_JSON,
    HANDSHAKE_MSGPACK,
    PING_JSON,
    PING_MSGPACK,
    RS,
    HubClient,
    HubClosed,
    ResponseReader,
    UpgradeRefused,
    WsClient,
    bearer,
    build_request,
    exchange,
    hub_target,
    open_tcp,
    open_ws,
    publish_raw,
    upgrade_headers,
    ws_frame,
)
from .redis_fixture import start_redis_server

IS_CI = bool(os.environ.get("CI")) or os.environ.get("HYPOTHESIS_PROFILE") == "ci"
SECONDS = float(os.environ.get("HUBSERVER_FUZZ_SECONDS") or (40 if IS_CI else 12))
CLIENTS = int(os.environ.get("HUBSERVER_FUZZ_CLIENTS") or 32)

#: The server's default allowance of clock skew on a token's exp.
TOKEN_LEEWAY = 30.0
BYSTANDER_SITE = "bystander-site"
FUZZ_SITE = "fuzz-site"
#: A site with history and no live events: a replay flood there meets no live
#: delivery (which used to be the only output counted against the budget).
QUIET_SITE = "fuzz-quiet"
QUIET_EVENTS = 200
FUZZ_SUBJECTS = 8
#: Events a second the steady publisher sends to the bystanders' site.
STEADY_RATE = 20.0
#: No fuzz connection lives longer than this (each picks a shorter hold).
CONNECTION_CAP = 8.0

# Server limits, small so that the limits are reached often in a short run.
MAX_OUTBOX_BYTES = 64 * 1024
MAX_PUBLISH_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 32 * 1024
HISTORY_SIZE = 200
#: Small, so the fuzzing meets it and the end can check that no count leaked.
MAX_HUBS_PER_SUBJECT = 20
MAX_HISTORY_SITES = 200

#: What the server's processes (all together) may grow by, at most, over their
#: RSS before the fuzzing.
#: Each connection's memory is bounded: its output budget (64 KiB, plus at
#: most one replay of 200 KB past it), one read (64 KiB), its hub message
#: buffer (32 KiB), or an HTTP head (16 KiB) or a publish body (64 KiB, some
#: ten times that once parsed): under 1 MiB, for ~40 connections at a time.
#: History and dedupe ids are bounded too (200 sites x 200 events, 20,000
#: ids). Measured: 4 to 10 MiB of growth. Before the output budget counted
#: replies (issue #9, finding 2) the same run grew by 200 MiB in 10 s.
MAX_RSS_GROWTH_BYTES = 64 << 20

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def _seed() -> int:
    value = os.environ.get("HUBSERVER_FUZZ_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


# -- the server process ------------------------------------------------------------


@dataclass
class Tokens:
    """Tokens minted once (RS256 signing costs ~1 ms): the clients draw from these."""

    hub: list[str]
    publisher: str
    bystander: str
    #: Tokens the server must refuse, or accept with the wrong scope.
    bad: list[str]


@dataclass
class FuzzServer:
    """A ``hubserver serve`` process; duck-types the Harness for the shared helpers."""

    process: trio.Process
    port: int
    key: DevKey
    log_path: Path
    tokens: Tokens
    data_dir: Path
    #: With --workers, from the log at start (a restart is an ERROR in the log).
    worker_pids: list[int] = field(default_factory=list)

    def publisher_token(self) -> str:
        return self.tokens.publisher

    def rss_bytes(self) -> int:
        """The resident memory of all the server's processes."""
        total = 0
        for pid in [self.process.pid, *self.worker_pids]:
            with suppress(FileNotFoundError, ProcessLookupError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):  # absent once a zombie
                        total += int(line.split()[1]) * 1024
        return total

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()


def _mint_tokens(key: DevKey) -> Tokens:
    now = time.time()
    hub = [key.mint(f"fuzz-{i}", [HUB_SCOPE], 3600, now) for i in range(FUZZ_SUBJECTS)]
    publisher = key.mint("backend", [PUBLISH_SCOPE], 3600, now)
    bad = [
        key.mint("fuzz-0", [HUB_SCOPE], 60, now - 7200),  # expired an hour ago
        key.mint("fuzz-0", ["other.scope"], 3600, now),
        key.mint("backend", [PUBLISH_SCOPE], 3600, now + 7200),  # not valid yet
        publisher[:-3] + ("AAA" if not publisher.endswith("AAA") else "BBB"),  # bad signature
        "a.b.c",
        "",
        "x" * 12_000,
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",  # alg none
    ]
    return Tokens(hub, publisher, key.mint("bystander", [HUB_SCOPE], 3600, now), bad)


@asynccontextmanager
async def fuzz_server(
    tmp_path: Path, processes: int, backplane: str | None = None
) -> AsyncIterator[FuzzServer]:
    """The server as the command line runs it: one process, or ``--workers`` (> 1)."""
    data = tmp_path / "data"
    key = ensure_dev_key(data)
    with SqlitePermissionStore.open(data) as store:
        store.grant(BYSTANDER_SITE, "bystander", Role.SITE_ADMIN)
        for i in range(FUZZ_SUBJECTS):
            roles = (Role.SITE_ADMIN, Role.SITE_SUPER_USER, Role.SITE_USER)
            store.grant(FUZZ_SITE, f"fuzz-{i}", roles[i % 3])
            store.grant(QUIET_SITE, f"fuzz-{i}", roles[i % 3])
    # Through the environment (HUBSERVER_<FLAG>), which a server that does not
    # know a flag ignores: the test also runs against older code.
    flags = {
        "max-outbox-bytes": str(MAX_OUTBOX_BYTES),
        "slow-client-timeout": "1",
        "max-publish-bytes": str(MAX_PUBLISH_BYTES),
        "max-message-bytes": str(MAX_MESSAGE_BYTES),
        "request-timeout": "3",
        "http-idle-timeout": "2",
        "handshake-timeout": "2",
        "keepalive-interval": "2",
        # Generous: the bystanders ping every second, on a busy machine.
        "client-timeout": "10",
        "history-size": str(HISTORY_SIZE),
        "max-history-sites": str(MAX_HISTORY_SITES),
        "max-dedupe-ids": "20000",
        "drain-timeout": "3",
        "max-hub-connections-per-subject": str(MAX_HUBS_PER_SUBJECT),
    }
    if backplane is not None:
        flags["backplane"] = backplane
        # The roles churned here are the data directory's SQLite file's; with a
        # backplane they would be read from Redis (issue #12).
        flags["permissions"] = "sqlite"
    command = [sys.executable, "-m", "hubserver", "serve", "--port", "0"]
    command += ["--data-dir", str(data), "--log-level", "info"]
    if processes > 1:
        command += ["--workers", str(processes)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    env |= {"HUBSERVER_" + name.upper().replace("-", "_"): value for name, value in flags.items()}
    env["HUBSERVER_LOG_FORMAT"] = "text"  # read as text lines (a pipe gets JSON by default)
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        # A file, not a pipe: the server never waits for the test to read its log.
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
            cwd=tmp_path,
        )
    try:
        port = 0
        # With --workers, the parent's line comes once it started them, and
        # each worker logs its own "listening on".
        ready = "listening on" if processes == 1 else "workers on"
        with trio.fail_after(20):
            while True:
                await trio.sleep(0.05)
                assert process.poll() is None, log_path.read_text()
                text = log_path.read_text()
                match = re.search(ready + r" http://[\d.]+:(\d+)", text)
                if match and text.count("listening on") >= processes:
                    port = int(match.group(1))
                    break
        server = FuzzServer(process, port, key, log_path, _mint_tokens(key), data)
        server.worker_pids = [int(pid) for pid in re.findall(r"started \(pid (\d+)\)", text)]
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()


# -- fuzz clients ------------------------------------------------------------------

#: What a fuzz client may meet: the server refusing, cutting or closing on it.
EXPECTED_ERRORS = (
    OSError,
    EOFError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    UpgradeRefused,
)


@dataclass
class Tally:
    """What the fuzz clients did and saw, printed at the end and checked in part."""

    scenarios: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    refused_upgrades: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


def _runs(seqs: list[int]) -> str:
    """``1-5, 4-9``: where a list of seqs repeats or skips (short, for a failure message)."""
    runs: list[str] = []
    start = previous = None
    for seq in [*seqs, None]:
        if start is not None and (seq is None or seq != previous + 1):
            runs.append(f"{start}-{previous}")
            start = None
        if start is None:
            start = seq
        previous = seq
    return ", ".join(runs[:20])


def expected_errors(exc: BaseException) -> list[BaseException]:
    """The errors in ``exc`` (a group, from a nursery, or not), if all are expected.

    Raises:
        the rest of ``exc`` (whatever is not an ``EXPECTED_ERRORS``, Cancelled included).
    """
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(EXPECTED_ERRORS)
        if rest is not None:
            raise rest
        return [] if matched is None else list(_leaves(matched))
    if isinstance(exc, EXPECTED_ERRORS):
        return [exc]
    raise exc


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


class Client:
    """One fuzz client: a generator of its own and a loop of short connections."""

    def __init__(self, server: FuzzServer, rng: random.Random, tally: Tally) -> None:
        self.server = server
        self.rng = rng
        self.tally = tally

    # -- building blocks -------------------------------------------------------------

    def any_token(self) -> str:
        rng, tokens = self.rng, self.server.tokens
        return rng.choice([*tokens.hub, tokens.publisher, *tokens.bad])

    async def drain(self, stream: trio.SocketStream, seconds: float) -> bytes:
        """Read what the server says for up to ``seconds`` (its first bytes are kept)."""
        head = b""
        with trio.move_on_after(seconds):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                if len(head) < 64:
                    head += data[:64]
        return head

    def note_status(self, head: bytes) -> None:
        if match := _STATUS.match(head):
            self.tally.statuses[int(match.group(1))] += 1

    async def send_in_pieces(self, stream: trio.SocketStream, data: bytes) -> None:
        """All at once, in a few pieces, or dribbled byte by byte (a slowloris)."""
        rng = self.rng
        how = rng.random()
        if how < 0.6:
            await stream.send_all(data)
        elif how < 0.9:
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 6))))
            start = 0
            for cut in [*cuts, len(data)]:
                await stream.send_all(data[start:cut])
                start = cut
                await trio.sleep(rng.uniform(0, 0.3))
        else:
            for i in range(min(len(data), rng.randint(5, 60))):
                await stream.send_all(data[i : i + 1])
                await trio.sleep(0.05)

    async def upgrade(self, site: str = FUZZ_SITE) -> WsClient:
        rng = self.rng
        hub = rng.choice(["entries", "incidents"])
        subject = rng.randrange(FUZZ_SUBJECTS)
        user = f"fuzz-{subject}" if subject % 3 == 2 or rng.random() < 0.2 else None
        target = hub_target(hub, site, user)
        if rng.random() < 0.1:
            target += f"&since_seq={rng.choice([0, 1, 5, 10**17])}"
        token = self.server.tokens.hub[subject]
        if rng.random() < 0.1:
            # Valid for 1 to 3 s more (within the server's 30 s leeway): the
            # server ends the connection at its expiry, whatever it is doing.
            expires_in = rng.uniform(1, 3) - TOKEN_LEEWAY
            token = self.server.key.mint(f"fuzz-{subject}", [HUB_SCOPE], expires_in, time.time())
        return await open_ws(self.server.port, target, headers=[bearer(token)])

    async def end_rudely(self, stream: trio.SocketStream) -> None:
        """Sometimes end with a half-close or a reset instead of a plain close."""
        how = self.rng.random()
        if how < 0.1:
            with suppress(*EXPECTED_ERRORS):
                await stream.send_eof()  # a half-close: we send no more, but may read
                await self.drain(stream, 0.5)
        elif how < 0.2:
            # SO_LINGER 0: close() sends a RST; writes under way on the server fail.
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def run(self) -> None:
        """Connection after connection, until cancelled."""
        scenarios: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (3, self.http_mutant),
            (1, self.http_pipelined_unread),
            (1, self.http_never_finished),
            (2, self.ws_frames),
            (3, self.hub_messages),
            (1, self.resume_flood_unread),
            (3, self.publish_bodies),
            (1, self.http_keep_alive_chain),
            (1, self.upgrade_with_trailing_data),
            (1, self.negotiate_then_connect),
            (1, self.hub_swarm),
            (1, self.publish_burst),
        ]
        weights = [weight for weight, _ in scenarios]
        while True:
            _, scenario = self.rng.choices(scenarios, weights)[0]
            name = scenario.__name__
            self.tally.scenarios[name] += 1
            with trio.move_on_after(CONNECTION_CAP):
                try:
                    await scenario()
                except BaseException as exc:
                    self.note_errors(exc)

    def note_errors(self, exc: BaseException) -> None:
        """Count what the server's refusals and cuts did to us; re-raise anything else."""
        for leaf in expected_errors(exc):
            if isinstance(leaf, UpgradeRefused):
                self.tally.refused_upgrades[leaf.response.status] += 1
            else:
                self.tally.errors[type(leaf).__name__] += 1

    # -- HTTP ------------------------------------------------------------------------

    def request_parts(self) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        """A request line, headers and body, valid or close to it."""
        rng = self.rng
        site = rng.choice([FUZZ_SITE, "nowhere", "s" * rng.choice([256, 257, 5000]), "%ff", ""])
        target = rng.choice(
            [
                b"/healthz",
                b"/readyz",
                b"/healthz?x=" + b"y" * rng.choice([10, 20_000]),
                f"/v1/hub/entries?site_id={site}".encode(),
                f"/v1/hub/incidents?site_id={FUZZ_SITE}&user_id=fuzz-2".encode(),
                f"/v1/hub/entries/negotiate?site_id={site}&negotiateVersion="
                f"{rng.choice(['1', '0', '²', '-1', '1' * 50, ''])}".encode(),
                b"/v1/hub/entries?site_id=a&site_id=b",
                b"/v1/hub/entries?id=" + os.urandom(8).hex().encode() + b"&site_id=fuzz-site",
                b"/v1/events/entries",
                b"/v1/events/incidents?access_token=" + self.any_token().encode(),
                b"/v1/events/nothing",
                b"*",
                b"http://127.0.0.1/healthz",
                b"/\xff\xfe",
                b"/" + bytes(rng.randrange(33, 127) for _ in range(rng.randint(0, 40))),
            ]
        )
        method = rng.choice(
            [b"GET"] * 4
            + [b"POST"] * 3
            + [b"HEAD", b"PUT", b"OPTIONS", b"get", b"G\x00T", b"X" * 300]
        )
        version = rng.choice([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""])
        line = b" ".join(part for part in (method, target, version) if part or rng.random() < 0.5)
        headers: list[tuple[bytes, bytes]] = [(b"Host", b"127.0.0.1")]
        body = b""
        if rng.random() < 0.4:
            key = rng.choice([b"dGhlIHNhbXBsZSBub25jZQ==", b"short", b""])
            headers += [
                (b"Upgrade", rng.choice([b"websocket", b"WebSocket", b"h2c", b""])),
                (b"Connection", rng.choice([b"Upgrade", b"keep-alive, Upgrade", b"close"])),
                (b"Sec-WebSocket-Key", key),
                (b"Sec-WebSocket-Version", rng.choice([b"13", b"8", b"", b"13, 8"])),
            ]
        if rng.random() < 0.8:
            headers.append((b"Authorization", b"Bearer " + self.any_token().encode()))
        if method == b"POST" or rng.random() < 0.2:
            body = self.publish_body()
            headers.append((b"Content-Type", b"application/json"))
            length = rng.choice(
                [str(len(body)).encode()] * 6
                + [b"-1", b"abc", b"1e3", b"0x10", b"99999999999999999999999", b"1" * 5000, b""]
                + [str(len(body) + rng.randint(1, 100)).encode(), str(10**7).encode()]
            )
            headers.append((b"Content-Length", length))
            if rng.random() < 0.1:
                headers.append((b"Content-Length", str(len(body) + 1).encode()))
            if rng.random() < 0.15:
                headers.append((b"Transfer-Encoding", rng.choice([b"chunked", b"gzip", b"x"])))
                body = self.chunked(body)
        for _ in range(rng.choice([0, 0, 0, 1, 5, 200])):
            name = rng.choice([b"X-Fuzz", b"Host", b"Cookie", b"Authorization", b"x" * 100])
            headers.append((name, os.urandom(rng.randint(0, 40)).hex().encode()))
        if rng.random() < 0.05:
            headers.append((b"X-Huge", b"h" * rng.choice([8_000, 17_000, 70_000])))
        if rng.random() < 0.05:
            headers.append((rng.choice([b"No Colon", b" lead", b"Bad\x00Name", b""]), b"v"))
        return line, headers, body

    def chunked(self, body: bytes) -> bytes:
        rng = self.rng
        size = rng.choice([f"{len(body):x}", "zz", "-1", "f" * 40, f"{len(body) + 9:x}", ""])
        end = rng.choice([b"\r\n0\r\n\r\n", b"\r\n", b"", b"\r\n0\r\nTrailer: x\r\n\r\n"])
        return size.encode() + b"\r\n" + body + end

    def mutate(self, data: bytes) -> bytes:
        """Flip, drop, repeat or insert bytes (a few times)."""
        rng = self.rng
        buffer = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if not buffer:
                break
            at = rng.randrange(len(buffer))
            how = rng.randrange(5)
            if how == 0:
                buffer[at] ^= 1 << rng.randrange(8)
            elif how == 1:
                del buffer[at : at + rng.randint(1, 16)]
            elif how == 2:
                buffer[at:at] = buffer[at : at + rng.randint(1, 64)] * rng.randint(1, 50)
            elif how == 3:
                buffer[at:at] = os.urandom(rng.randint(1, 16))
            else:
                buffer[at:at] = rng.choice(
                    [b"\r\n", b"\n", b"\r", b"\x00", b":", b" ", b"\r\n\r\n"]
                )
        return bytes(buffer)

    async def http_mutant(self) -> None:
        rng = self.rng
        line, headers, body = self.request_parts()
        raw = line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
        raw += body
        if rng.random() < 0.4:
            raw = self.mutate(raw)
        stream = await open_tcp(self.server.port)
        async with stream:
            await self.send_in_pieces(stream, raw)
            if rng.random() < 0.2:
                # Stop reading (and sending) with the connection open: the request
                # deadline or the idle timeout must end it on the server's side.
                await trio.sleep(rng.uniform(0.5, 4))
                return
            await self.end_rudely(stream)
            self.note_status(await self.drain(stream, rng.uniform(0.2, 3)))

    async def http_keep_alive_chain(self) -> None:
        """Several requests on one connection, valid ones and mutants, pauses between."""
        rng = self.rng
        stream = await open_tcp(self.server.port)
        async with stream:
            for _ in range(rng.randint(2, 6)):
                if rng.random() < 0.6:
                    raw = build_request(
                        rng.choice(["GET", "HEAD", "POST"]),
                        rng.choice(["/healthz", "/readyz", "/v1/events/entries", "/x"]),
                        headers=[bearer(self.any_token())],
                        body=self.publish_body() if rng.random() < 0.3 else b"",
                        close=False,
                    )
                else:
                    line, headers, body = self.request_parts()
                    raw = line + b"\r\n"
                    raw += b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body
                await stream.send_all(raw)
                if rng.random() < 0.7:
                    with trio.move_on_after(rng.uniform(0.05, 1)):
                        self.note_status(await stream.receive_some(65536))
                else:
                    await trio.sleep(rng.uniform(0, 2.5))  # near or past the idle timeout
            await self.end_rudely(stream)

    async def http_pipelined_unread(self) -> None:
        rng = self.rng
        one = build_request(
            rng.choice(["GET", "HEAD"]),
            rng.choice(["/healthz", "/readyz", "/nothing"]),
            close=False,
        )
        stream = await open_tcp(self.server.port, rcvbuf=rng.choice([None, 4096]))
        async with stream:
            with trio.move_on_after(rng.uniform(1, 4)):
                await stream.send_all(one * rng.choice([10, 500, 5000]))
                await trio.sleep(math.inf)

    async def http_never_finished(self) -> None:
        """A head that announces a body (or a head) that never comes."""
        rng = self.rng
        target = rng.choice(
            ["/healthz", "/v1/events/entries", "/v1/hub/entries/negotiate?site_id=x"]
        )
        headers = [bearer(self.server.tokens.publisher), ("Content-Length", "1000")]
        raw = build_request(
            rng.choice(["GET", "POST", "HEAD"]), target, headers=headers, close=False
        )
        raw = raw[: rng.choice([len(raw), len(raw) - 3, len(raw) // 2])]
        stream = await open_tcp(self.server.port)
        async with stream:
            await stream.send_all(raw + b"x" * rng.choice([0, 10]))
            self.note_status(await self.drain(stream, rng.uniform(1, 5)))

    # -- WebSocket frames --------------------------------------------------------------

    def bad_frame(self) -> bytes:
        rng = self.rng
        payload = os.urandom(rng.choice([0, 1, 2, 10, 125, 126, 1000]))
        kind = rng.randrange(14)
        if kind == 0:
            return ws_frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), payload)
        if kind == 1:
            return ws_frame(1, b"{}" + RS.encode(), mask=None)
        if kind == 2:  # a length far beyond what follows (or anyone could hold)
            length = rng.choice([2**63 - 1, 2**63, 2**64 - 1, 10**9, 70_000, 126])
            return ws_frame(rng.choice([1, 2, 0]), payload[:10], length=length)
        if kind == 3:
            return ws_frame(rng.choice([8, 9, 10]), payload[:10], fin=False)
        if kind == 4:
            return ws_frame(9, os.urandom(rng.choice([126, 200, 1000])))
        if kind == 5:
            code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
            reason = rng.choice([b"", b"bye", b"\xff\xfe", b"r" * 123])
            return ws_frame(8, code.to_bytes(2, "big") + reason)
        if kind == 6:
            return ws_frame(8, b"\x03")  # a close frame with one byte
        if kind == 7:
            return ws_frame(0, payload)  # continuation without a start
        if kind == 8:
            return ws_frame(1, b"{", fin=False) + ws_frame(2, b"}")  # a new message mid-message
        if kind == 9:
            return ws_frame(rng.choice([1, 2, 9]), payload[:20], rsv=rng.randint(1, 7))
        if kind == 10:
            bad = rng.choice(
                [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
            )
            return ws_frame(1, b'{"type":6' + bad, fin=rng.random() < 0.5)
        if kind == 11:
            return os.urandom(rng.randint(1, 200))
        if kind == 12:  # a ping flood: every ping makes a pong
            return ws_frame(9, payload[:125]) * rng.choice([10, 1000])
        # A message beyond the hub's size limit, in fragments.
        chunk = b"x" * 16_000
        frames = [ws_frame(1, b"[" + chunk, fin=False)]
        frames += [ws_frame(0, chunk, fin=False) for _ in range(rng.randint(1, 8))]
        return b"".join(frames) + ws_frame(0, b"]")

    async def ws_frames(self) -> None:
        rng = self.rng
        ws = await self.upgrade()
        async with ws.stream:
            if rng.random() < 0.6:
                await ws.send_raw(ws_frame(1, HANDSHAKE_JSON.encode()))
            for _ in range(rng.randint(1, 6)):
                await ws.send_raw(self.bad_frame())
                if rng.random() < 0.3:
                    await trio.sleep(rng.uniform(0, 0.2))
            if rng.random() < 0.2:
                await trio.sleep(rng.uniform(0.5, 3))  # stopped reading
                return
            await self.end_rudely(ws.stream)
            await self.drain(ws.stream, rng.uniform(0.2, 3))

    async def upgrade_with_trailing_data(self) -> None:
        """The upgrade request, handshake and messages in one write, before any 101."""
        rng = self.rng
        site = rng.choice([FUZZ_SITE, QUIET_SITE, "nowhere"])
        target = hub_target(rng.choice(["entries", "incidents"]), site)
        if rng.random() < 0.3:
            target += f"&since_seq={rng.choice([0, 1, 199, 10**17])}"
        token = self.server.tokens.hub[0] if rng.random() < 0.8 else self.any_token()
        headers = [*upgrade_headers(), bearer(token)]
        raw = build_request("GET", target, headers=headers, close=False)
        is_binary = rng.random() < 0.4
        handshake = HANDSHAKE_MSGPACK if is_binary else HANDSHAKE_JSON
        raw += ws_frame(1, handshake.encode())
        batch = [self.hub_message(is_binary) for _ in range(rng.randint(0, 5))]
        raw += ws_frame(2 if is_binary else 1, self.encode_messages(batch, is_binary))
        if rng.random() < 0.3:
            raw += self.bad_frame()
        if rng.random() < 0.3:
            raw = self.mutate(raw)
        stream = await open_tcp(self.server.port)
        async with stream:
            await self.send_in_pieces(stream, raw)
            await self.end_rudely(stream)
            head = await self.drain(stream, rng.uniform(0.2, 3))
            if not head.startswith(b"HTTP/1.1 101"):
                self.note_status(head)

    async def negotiate_then_connect(self) -> None:
        """Negotiate, then connect with the connection token: once, twice, or elsewhere."""
        rng = self.rng
        subject = rng.randrange(FUZZ_SUBJECTS)
        token = self.server.tokens.hub[subject]
        user = f"fuzz-{subject}" if subject % 3 == 2 else None
        site = rng.choice([FUZZ_SITE, QUIET_SITE])
        version = rng.choice(["0", "1"])
        negotiate = hub_target("entries", site, user).replace(
            "/entries?", f"/entries/negotiate?negotiateVersion={version}&"
        )
        response = await exchange(
            self.server.port, build_request("POST", negotiate, headers=[bearer(token)])
        )
        self.tally.statuses[response.status] += 1
        if response.status != 200:
            return
        answer = json.loads(response.body)
        connection_token = answer.get("connectionToken") or answer.get("connectionId")
        if rng.random() < 0.2:
            connection_token = rng.choice(["", "x", connection_token + "x", "%00"])
        for _ in range(rng.choice([1, 1, 2])):  # the second use must be refused
            target = hub_target("entries", rng.choice([site, site, FUZZ_SITE]), user)
            target += f"&id={connection_token}"
            ws = await open_ws(self.server.port, target, headers=[bearer(token)])
            async with ws.stream:
                await ws.send_raw(ws_frame(1, HANDSHAKE_JSON.encode()))
                await self.drain(ws.stream, rng.uniform(0.1, 1))

    # -- hub messages ------------------------------------------------------------------

    def resume_argument(self) -> Any:
        rng = self.rng
        return rng.choice(
            [
                0,
                1,
                rng.randrange(1000),
                2**53,
                2**53 + 1,
                2**63,
                2**64,
                10**19,
                -1,
                -(2**63),
                1.5,
                1e308,
                "5",
                "",
                None,
                True,
                [],
                {},
                [1, 2],
            ]
        )

    def hub_message(self, is_binary: bool) -> Any:
        """A hub message as a value: dict for JSON, list for MessagePack."""
        rng = self.rng
        kind = rng.randrange(10)
        invocation_id = rng.choice([None, "1", str(rng.randrange(10**6)), 7, "", "i" * 300])
        if kind <= 3:
            target = rng.choice(["Resume"] * 4 + ["resume", "RESUME", "Nope", "", "R" * 5000, 5])
            arguments: Any = [self.resume_argument() for _ in range(rng.choice([1, 1, 1, 0, 2]))]
            if rng.random() < 0.1:
                arguments = rng.choice([None, "x", {}, 5])
            elif is_binary and rng.random() < 0.2:
                arguments = [self.random_value(0, is_binary=True)]
            if is_binary:
                return [1, {}, invocation_id, target, arguments]
            message = {"type": 1, "target": target, "arguments": arguments}
            if invocation_id is not None:
                message["invocationId"] = invocation_id
            return message
        if kind == 4:
            if is_binary:
                return [4, {}, invocation_id or "s", "Resume", [0], ["a"]]
            return {"type": 4, "invocationId": invocation_id, "target": "Resume", "arguments": [0]}
        if kind == 5:
            return [7, None, True] if is_binary else {"type": 7}
        if kind == 6:
            return [6] if is_binary else {"type": 6}
        if kind == 7:  # other types, valid or not
            message_type = rng.choice([2, 3, 5, 8, 9, 0, 99, -1, "1", None])
            if is_binary:
                return [message_type, {}, invocation_id, rng.randrange(5)]
            return {"type": message_type, "invocationId": invocation_id, "item": 1, "sequenceId": 1}
        if kind == 8:  # a random value
            return self.random_value(rng.randint(0, 6), is_binary=is_binary)
        return {"type": 1, "target": "Resume", "arguments": [0], "junk": [[[[{}]]]] * 100}

    def random_value(self, depth: int, *, is_binary: bool = False) -> Any:
        rng = self.rng
        if is_binary and rng.random() < 0.2:  # what MessagePack has and JSON has not
            return rng.choice(
                [
                    os.urandom(rng.randint(0, 20)),
                    msgpack.ExtType(rng.randrange(128), os.urandom(rng.choice([0, 1, 8, 20]))),
                    msgpack.Timestamp(rng.randrange(-(2**40), 2**40), rng.randrange(10**9)),
                    {rng.choice([1, -1, None, 1.5, b"k"]): self.random_value(depth - 1)},
                    2**64 - 1,
                    -(2**63),
                    float("nan"),
                ]
            )
        kind = rng.randrange(8 if depth > 0 else 6)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind == 1:
            return rng.choice([0, -1, 2**64, -(2**70), rng.randrange(-1000, 1000)])
        if kind == 2:
            return rng.choice([0.5, -1e300, 1e-300])
        if kind == 3:
            return rng.choice(["", "x", "\u2603", "\ud800", "a" * 1000])
        if kind == 4:
            return rng.choice(["site_id", "type", "target"])
        if kind == 5:
            return {}
        if kind == 6:
            return [
                self.random_value(depth - 1, is_binary=is_binary) for _ in range(rng.randint(0, 4))
            ]
        keys = ["type", "target", "arguments", "invocationId", "site_id", "x"]
        return {
            rng.choice(keys): self.random_value(depth - 1, is_binary=is_binary)
            for _ in range(rng.randint(0, 4))
        }

    def encode_messages(self, messages: list[Any], is_binary: bool) -> bytes:
        rng = self.rng
        out = b""
        for message in messages:
            if is_binary:
                try:
                    packed = msgpack.packb(message)
                except (OverflowError, ValueError, TypeError):
                    packed = b"\xc1"  # never used by MessagePack
                if rng.random() < 0.1:
                    packed = os.urandom(rng.randint(1, 30))
                prefix = encode_varint(len(packed))
                if rng.random() < 0.05:  # a length that lies, or a VarInt of six bytes
                    prefix = rng.choice(
                        [b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x80\x01", b"\x7f"]
                    )
                out += prefix + packed
            else:
                try:
                    text = json.dumps(message).encode()
                except ValueError:
                    text = b"{"
                if rng.random() < 0.05:
                    text = rng.choice([b"{", b"[1,", b"NaN", b"\xff", b"", b"1" * 5000, b"{}}"])
                out += text + (RS.encode() if rng.random() < 0.97 else b"")
        return out

    async def hub_messages(self) -> None:
        rng = self.rng
        ws = await self.upgrade()
        is_binary = rng.random() < 0.4
        async with ws.stream:
            if rng.random() < 0.1:  # a broken handshake
                request = rng.choice(
                    [
                        '{"protocol":"json","version":2}',
                        '{"protocol":"xml","version":1}',
                        '{"protocol":"json"}',
                        "[]",
                        "{",
                        '{"protocol":"json","version":1}',  # no RS
                        '{"protocol":"json","version":1.5}' + RS,
                        '{"protocol":' + '"x' * 20_000 + '"}' + RS,
                    ]
                )
                await ws.send_raw(ws_frame(rng.choice([1, 2]), request.encode()))
            else:
                await ws.send_raw(
                    ws_frame(1, (HANDSHAKE_MSGPACK if is_binary else HANDSHAKE_JSON).encode())
                )
            is_reading = rng.random() < 0.8
            async with trio.open_nursery() as nursery:
                if is_reading:
                    nursery.start_soon(self.drain, ws.stream, CONNECTION_CAP)
                for _ in range(rng.randint(1, 30)):
                    batch = [self.hub_message(is_binary) for _ in range(rng.choice([1, 1, 2, 5]))]
                    data = self.encode_messages(batch, is_binary)
                    opcode = 2 if is_binary else 1
                    if rng.random() < 0.05:
                        opcode = 3 - opcode  # the other frame type
                    if rng.random() < 0.2 and len(data) > 1:  # a record across frames
                        cut = rng.randrange(1, len(data))
                        frames = ws_frame(opcode, data[:cut], fin=False) + ws_frame(0, data[cut:])
                    else:
                        frames = ws_frame(opcode, data)
                    await ws.send_raw(frames)
                    if rng.random() < 0.3:
                        await trio.sleep(rng.uniform(0, 0.3))
                await trio.sleep(rng.uniform(0, 2))
                nursery.cancel_scope.cancel()
            await self.end_rudely(ws.stream)

    async def hub_swarm(self) -> None:
        """Many hub connections of one subject at once: some over its limit (429)."""
        rng = self.rng
        subject = rng.randrange(FUZZ_SUBJECTS)
        token = self.server.tokens.hub[subject]
        target = hub_target("entries", FUZZ_SITE, f"fuzz-{subject}" if subject % 3 == 2 else None)
        async with AsyncExitStack() as stack:
            for _ in range(rng.randint(5, MAX_HUBS_PER_SUBJECT + 5)):
                try:
                    ws = await open_ws(self.server.port, target, headers=[bearer(token)])
                except UpgradeRefused as refused:
                    self.tally.refused_upgrades[refused.response.status] += 1
                    continue
                await stack.enter_async_context(ws.stream)
                if rng.random() < 0.5:
                    await ws.send_raw(ws_frame(1, HANDSHAKE_JSON.encode()))
                if rng.random() < 0.2:
                    await self.end_rudely(ws.stream)
            await trio.sleep(rng.uniform(0.2, 2))

    async def resume_flood_unread(self) -> None:
        """Make the server answer as fast as possible; never read an answer.

        Replays (one at a time, each asked for once the last is done), bursts of
        Resume calls (mostly "already in progress" errors), or WebSocket pings
        (a pong each): none is a live delivery, and all must count against the
        connection's output budget.
        """
        rng = self.rng
        is_binary = rng.random() < 0.5
        opcode = 2 if is_binary else 1
        ws = await self.upgrade(QUIET_SITE if rng.random() < 0.7 else FUZZ_SITE)
        async with ws.stream:
            handshake = HANDSHAKE_MSGPACK if is_binary else HANDSHAKE_JSON
            await ws.send_raw(ws_frame(1, handshake.encode()))
            if is_binary:
                resume = msgpack.packb([1, {}, "1", "Resume", [0]])
                record = encode_varint(len(resume)) + resume
                ping = PING_MSGPACK
            else:
                record = b'{"type":1,"invocationId":"1","target":"Resume","arguments":[0]}\x1e'
                ping = PING_JSON.encode()
            how = rng.randrange(3)
            with trio.move_on_after(rng.uniform(1, 5)):
                if how == 0:
                    while True:
                        await ws.send_raw(ws_frame(opcode, record))
                        await trio.sleep(0.002)  # time for the replay to go out
                elif how == 1:
                    for _ in range(rng.choice([100, 2000])):
                        await ws.send_raw(ws_frame(opcode, record * 20 + ping))
                else:
                    pings = ws_frame(9, b"p" * 125) * 500
                    while True:
                        await ws.send_raw(pings)
                        await trio.lowlevel.checkpoint()
                await trio.sleep(math.inf)

    # -- publish bodies ----------------------------------------------------------------

    def publish_body(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return rng.choice([b"", b"{", b"[1,", b"NaN", b"\xff\xfe", b"nul", b'{"a":1}{}'])
        if kind == 1:
            depth = rng.choice([31, 32, 33, 100, 1000, 30_000])
            opening, closing = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
            return b'{"site_id":"fuzz-site","x":' + opening * depth + b"1" + closing * depth + b"}"
        if kind == 2:
            digits = rng.choice([19, 20, 309, 4300, 4301, 20_000])
            return b'{"site_id":"fuzz-site","n":' + b"9" * digits + b"}"
        if kind == 3:
            return json.dumps(self.random_value(4)).encode()
        if kind == 4:
            return json.dumps(
                {
                    "site_id": rng.choice([5, None, "", [], "s" * 257, {"a": 1}]),
                    "user_id": rng.choice([5, "", "u", None]),
                    "id": rng.choice([5, "", "i" * 257, None]),
                }
            ).encode()
        if kind == 5:
            count = rng.choice([0, 2, 50, 10_001])
            return json.dumps([self.fuzz_event() if rng.random() < 0.8 else 5] * count).encode()
        if kind == 6:
            return b"[" + b",".join([b'{"site_id":"fuzz-site"}'] * 3000) + b"]"  # > the byte limit
        return json.dumps([self.fuzz_event() for _ in range(rng.randint(1, 5))]).encode()

    def fuzz_event(self) -> dict[str, Any]:
        rng = self.rng
        event: dict[str, Any] = {"site_id": rng.choice([FUZZ_SITE, f"fuzz-{rng.randrange(400)}"])}
        if rng.random() < 0.5:
            event["id"] = f"fuzz-{rng.randrange(50)}"  # repeats: the dedupe path
        if rng.random() < 0.3:
            event["user_id"] = f"fuzz-{rng.randrange(FUZZ_SUBJECTS)}"
        if rng.random() < 0.3:
            event["seq"] = rng.choice([-1, 10**30, "x"])  # the server's to set
        event["payload"] = self.random_value(2)
        return event

    async def publish_burst(self) -> None:
        """Valid batches, back to back on one connection: fan-out to the fuzz subscribers."""
        rng = self.rng
        stream = await open_tcp(self.server.port)
        async with stream:
            reader = ResponseReader(stream)
            for _ in range(rng.randint(1, 10)):
                events = [
                    {"site_id": FUZZ_SITE, "id": f"burst-{rng.randrange(5000)}", "n": n}
                    for n in range(rng.choice([1, 100, 600]))
                ]
                raw = build_request(
                    "POST",
                    f"/v1/events/{rng.choice(['entries', 'incidents'])}",
                    headers=[
                        ("Content-Type", "application/json"),
                        bearer(self.server.tokens.publisher),
                    ],
                    body=json.dumps(events).encode(),
                    close=False,
                )
                await stream.send_all(raw)
                response = await reader.read_response()
                self.tally.statuses[response.status] += 1

    async def publish_bodies(self) -> None:
        rng = self.rng
        hub = rng.choice(["entries", "incidents"])
        token = self.server.tokens.publisher if rng.random() < 0.8 else self.any_token()
        body = self.publish_body()
        response = await publish_raw(self.server, hub, body, token=token)  # type: ignore[arg-type]
        self.tally.statuses[response.status] += 1


# -- the bystanders ------------------------------------------------------------------


@dataclass
class Steady:
    """The steady publisher's record: what the server accepted, in order."""

    accepted: list[str] = field(default_factory=list)  # event ids
    retries: int = 0
    stop: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


async def publish_steadily(server: FuzzServer, steady: Steady) -> None:
    """One event at a time to the bystanders' site; a 503 or a lost answer is retried.

    The retry carries the same id: the publish API must not publish it twice.
    """
    try:
        await _publish_until_stopped(server, steady)
    finally:
        steady.done.set()


async def _publish_until_stopped(server: FuzzServer, steady: Steady) -> None:
    n = 0
    while not steady.stop.is_set():
        n += 1
        body = json.dumps({"site_id": BYSTANDER_SITE, "id": f"steady-{n}", "n": n}).encode()
        while True:
            response = None
            with trio.move_on_after(10):
                try:
                    response = await publish_raw(server, "entries", body)  # type: ignore[arg-type]
                except BaseException as exc:
                    expected_errors(exc)  # lost: retried
            if response is not None and response.status == 202:
                (event_id,) = response.json()["ids"]
                steady.accepted.append(event_id)
                break
            # 503: try again (same id: not published twice); 408: a starved
            # server did not read the request in time, nothing was accepted.
            assert response is None or response.status in (408, 503), response
            steady.retries += 1
            await trio.sleep(0.1)
        await trio.sleep(1 / STEADY_RATE)


@dataclass
class Received:
    events: list[tuple[str, int]] = field(default_factory=list)  # (id, seq)
    closed: HubClosed | None = None
    arrived: trio.Event = field(default_factory=trio.Event)


async def subscribe(
    server: FuzzServer, protocol: str, received: Received, ready: trio.Event
) -> None:
    target = hub_target("entries", BYSTANDER_SITE)
    ws = await open_ws(server.port, target, headers=[bearer(server.tokens.bystander)])
    client = HubClient(ws, protocol)
    async with ws.stream, trio.open_nursery() as nursery:
        assert await client.handshake() == {}

        async def keep_pinging() -> None:
            ping = PING_MSGPACK if protocol == "messagepack" else PING_JSON.encode()
            opcode = 2 if protocol == "messagepack" else 1
            with suppress(*EXPECTED_ERRORS):
                while True:
                    await ws.send_raw(ws_frame(opcode, ping))
                    await trio.sleep(1)

        nursery.start_soon(keep_pinging)
        ready.set()
        while True:
            message = await client.next_message()
            if isinstance(message, HubClosed):
                received.closed = message
                nursery.cancel_scope.cancel()
                return
            event = client_event(client, message)
            received.events.append((event["id"], event["seq"]))
            received.arrived.set()
            received.arrived = trio.Event()


def client_event(client: HubClient, message: Any) -> dict[str, Any]:
    if client.is_binary:
        assert message[0] == 1 and message[3] == "ReceiveMessage", message
        (text,) = message[4]
    else:
        assert message["type"] == 1 and message["target"] == "ReceiveMessage", message
        (text,) = message["arguments"]
    event: dict[str, Any] = json.loads(text)
    return event


def _describe(message: Any) -> tuple[int, str | None, bool]:
    """A hub message's type, target (invocations) and whether it is a Completion with an error."""
    if isinstance(message, dict):  # JSON
        kind = message["type"]
        return kind, message.get("target"), kind == 3 and "error" in message
    # MessagePack: [1, headers, id, target, args] or [3, headers, id, resultKind, ...]
    kind = message[0]
    return kind, message[3] if kind == 1 else None, kind == 3 and message[3] == 1


async def wait_for(received: Received, count: int) -> None:
    while len(received.events) < count and received.closed is None:
        await received.arrived.wait()


@dataclass
class Resumer(Received):
    """A bystander that reconnects all the time and resumes where it stopped."""

    reconnects: int = 0
    gaps: list[Any] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)  # Completions with an error


async def resume_repeatedly(
    server: FuzzServer, resumer: Resumer, rng: random.Random, is_done: Callable[[], bool]
) -> None:
    """Connect, resume from the last seq seen (``Resume`` or ``since_seq``), read a while, drop.

    Whatever was sent and not read when it drops must come again in the next
    replay; nothing read may come twice.
    """
    while not is_done():
        last = resumer.events[-1][1] if resumer.events else 0
        is_in_url = rng.random() < 0.3
        target = hub_target("entries", BYSTANDER_SITE)
        if is_in_url:
            target += f"&since_seq={last}"
        protocol = rng.choice(["json", "messagepack"])
        try:
            ws = await open_ws(server.port, target, headers=[bearer(server.tokens.bystander)])
        except BaseException as exc:
            expected_errors(exc)  # a refused connection: try again
            await trio.sleep(0.1)
            continue
        client = HubClient(ws, protocol)
        async with ws.stream:
            assert await client.handshake() == {}
            if not is_in_url:
                if client.is_binary:
                    resume = msgpack.packb([1, {}, "r", "Resume", [last]])
                    await ws.send_raw(ws_frame(2, encode_varint(len(resume)) + resume))
                else:
                    invocation = {"type": 1, "invocationId": "r", "target": "Resume"}
                    text = json.dumps({**invocation, "arguments": [last]}) + RS
                    await ws.send_raw(ws_frame(1, text.encode()))
            with trio.move_on_after(rng.uniform(0.05, 1)):
                while True:
                    message = await client.next_message()
                    if isinstance(message, HubClosed):
                        break
                    kind, target_name, is_error = _describe(message)
                    if kind == 1 and target_name == "ReceiveMessage":
                        event = client_event(client, message)
                        resumer.events.append((event["id"], event["seq"]))
                        resumer.arrived.set()
                        resumer.arrived = trio.Event()
                    elif kind == 1:  # a Gap: events left history before we got them
                        resumer.gaps.append(message)
                    elif is_error:
                        resumer.errors.append(message)
            if rng.random() < 0.3:  # a reset, possibly with events under way
                ws.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resumer.reconnects += 1


# -- the test ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["process", "workers", "redis"])
async def test_live_fuzz_harms_no_bystander(tmp_path: Path, mode: str) -> None:
    seed = _seed()
    seconds = SECONDS * {"process": 0.5, "workers": 0.25, "redis": 0.25}[mode]
    print(f"fuzz: seed {seed} (HUBSERVER_FUZZ_SEED), {seconds:.0f} s, {CLIENTS} clients")
    processes = 1 if mode == "process" else 2
    redis = None
    if mode == "redis":
        (tmp_path / "redis").mkdir()
        redis = start_redis_server(tmp_path / "redis")  # skips without redis-server
    try:
        with trio.fail_after(seconds + 60):
            backplane = None if redis is None else redis.url
            async with fuzz_server(tmp_path, processes, backplane) as server:
                await _fuzz(server, seed, seconds)
    finally:
        if redis is not None:
            redis.stop()


async def _fuzz(server: FuzzServer, seed: int, seconds: float) -> None:
    tally = Tally()
    steady = Steady()
    bystanders = {protocol: Received() for protocol in ("json", "messagepack")}
    rss = [server.rss_bytes()]
    stop_sampling = trio.Event()

    async def sample_rss() -> None:
        while not stop_sampling.is_set():
            rss.append(server.rss_bytes())
            await trio.sleep(0.2)

    async def churn_roles() -> None:
        """Revoke and grant again, all the time: open connections of fuzz-1 are closed."""
        with SqlitePermissionStore.open(server.data_dir) as store:
            try:
                while True:
                    await trio.sleep(0.3)
                    store.revoke(FUZZ_SITE, "fuzz-1")
                    store.revoke(QUIET_SITE, "fuzz-4")
                    await trio.sleep(0.3)
                    store.grant(FUZZ_SITE, "fuzz-1", Role.SITE_SUPER_USER)
                    store.grant(QUIET_SITE, "fuzz-4", Role.SITE_SUPER_USER)
            finally:
                store.grant(FUZZ_SITE, "fuzz-1", Role.SITE_SUPER_USER)
                store.grant(QUIET_SITE, "fuzz-4", Role.SITE_SUPER_USER)

    async def watch_process() -> None:
        code = await server.process.wait()
        tail = "\n".join(server.log_lines()[-30:])
        raise AssertionError(f"seed {seed}: the server exited ({code}) under fuzzing:\n{tail}")

    # History for the replay floods: 200 KB a replay.
    quiet = [{"site_id": QUIET_SITE, "n": n, "pad": "p" * 1000} for n in range(QUIET_EVENTS)]
    for start in range(0, QUIET_EVENTS, 50):
        body = json.dumps(quiet[start : start + 50]).encode()
        response = await publish_raw(server, "entries", body)  # type: ignore[arg-type]
        assert response.status == 202, response

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_process)
        for protocol, received in bystanders.items():
            ready = trio.Event()
            nursery.start_soon(subscribe, server, protocol, received, ready)
            with trio.fail_after(10):
                await ready.wait()
        nursery.start_soon(publish_steadily, server, steady)
        resumer = Resumer()

        def has_all() -> bool:
            return steady.done.is_set() and len(resumer.events) >= len(steady.accepted)

        nursery.start_soon(resume_repeatedly, server, resumer, random.Random(seed), has_all)
        baseline = server.rss_bytes()
        nursery.start_soon(sample_rss)

        deadline = trio.current_time() + seconds
        # At the deadline the clients' connections end where they are.
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as clients:
                clients.start_soon(churn_roles)
                for index in range(CLIENTS):
                    client = Client(server, random.Random(f"{seed}-{index}"), tally)
                    clients.start_soon(client.run)
        steady.stop.set()
        assert server.process.poll() is None, "the server process exited during the fuzzing"

        # Every accepted event reaches both bystanders (the stragglers in time).
        with trio.fail_after(30):
            await steady.done.wait()
            expected = list(steady.accepted)
            for received in bystanders.values():
                await wait_for(received, len(expected))
            while not has_all():
                await resumer.arrived.wait()
        stop_sampling.set()
        nursery.cancel_scope.cancel()

    print(
        f"fuzz: seed {seed}: scenarios {dict(tally.scenarios)}, statuses "
        f"{dict(sorted(tally.statuses.items()))}, refused upgrades "
        f"{dict(tally.refused_upgrades)}, client errors {dict(tally.errors)}; "
        f"{len(expected)} steady events ({steady.retries} retries), "
        f"{resumer.reconnects} resumes; RSS "
        f"{baseline >> 20} MiB before, {max(rss) >> 20} MiB at most"
    )
    for protocol, received in bystanders.items():
        assert received.closed is None, (
            f"seed {seed}: {protocol} bystander closed: {received.closed}"
        )
        got = received.events[: len(expected)]
        assert [event_id for event_id, _ in got] == expected, (
            f"seed {seed}: {protocol} bystander lost or repeated events"
        )
        # Seqs of the site are 1, 2, 3...: no event skipped or numbered twice.
        assert [seq for _, seq in got] == list(range(1, len(expected) + 1)), f"seed {seed}"
        assert len(received.events) == len(expected), f"seed {seed}: extra events"
    # The resumer: every event once, in order, across some hundred reconnects.
    assert not resumer.gaps and not resumer.errors, f"seed {seed}: {resumer}"
    assert [event_id for event_id, _ in resumer.events] == expected, (
        f"seed {seed}: the resuming bystander lost or repeated events "
        f"(seqs {_runs([seq for _, seq in resumer.events])})"
    )
    assert 500 not in tally.statuses, f"seed {seed}: a 500 answer: {tally.statuses}"
    growth = max(rss) - baseline
    assert growth < MAX_RSS_GROWTH_BYTES, (
        f"seed {seed}: server RSS grew by {growth >> 20} MiB "
        f"(from {baseline >> 20} MiB; bound {MAX_RSS_GROWTH_BYTES >> 20} MiB)"
    )
    await _check_still_serving(server, seed)
    _check_log(server, seed)


async def _check_still_serving(server: FuzzServer, seed: int) -> None:
    with trio.fail_after(15):
        for path in ("/healthz", "/readyz"):
            response = await exchange(server.port, build_request("GET", path))
            assert response.status == 200, f"seed {seed}: {path}: {response}"
        # A fresh subscriber gets a fresh event.
        received = Received()
        ready = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscribe, server, "json", received, ready)
            await ready.wait()
            body = json.dumps({"site_id": BYSTANDER_SITE, "id": "after"}).encode()
            response = await publish_raw(server, "entries", body)  # type: ignore[arg-type]
            assert response.status == 202, f"seed {seed}: {response}"
            await wait_for(received, 1)
            assert received.events[0][0] == "after", f"seed {seed}: {received.events}"
            nursery.cancel_scope.cancel()
        await _check_subject_counts(server, seed)
    # And it drains on SIGTERM while garbage still arrives, exiting cleanly.
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for index in range(8):
                client = Client(server, random.Random(f"{seed}-drain-{index}"), Tally())
                nursery.start_soon(client.run)
            await trio.sleep(1)
            server.process.send_signal(signal.SIGTERM)
            await server.process.wait()
            nursery.cancel_scope.cancel()
    assert server.process.returncode == 0, f"seed {seed}: exit code {server.process.returncode}"


async def _check_subject_counts(server: FuzzServer, seed: int) -> None:
    """Every subject may open its full allowance of hub connections again: no count leaked.

    The server may still be ending the fuzz clients' last connections: a 429
    is retried for a few seconds.
    """
    for subject, token in enumerate(server.tokens.hub):
        user = f"fuzz-{subject}" if subject % 3 == 2 else None
        target = hub_target("entries", FUZZ_SITE, user)
        for attempt in range(10):
            try:
                async with AsyncExitStack() as stack:
                    for _ in range(MAX_HUBS_PER_SUBJECT):
                        ws = await open_ws(server.port, target, headers=[bearer(token)])
                        await stack.enter_async_context(ws.stream)
                break
            except UpgradeRefused as refused:
                # 403: the role churn's last grant may not have been polled yet.
                assert refused.response.status in (403, 429), f"seed {seed}: {refused.response}"
                assert attempt < 9, f"seed {seed}: fuzz-{subject}'s connection count leaked"
                await trio.sleep(0.5)


def _check_log(server: FuzzServer, seed: int) -> None:
    """No ERROR, CRITICAL or traceback in the server's log (every handler crash is one)."""
    errors: list[list[str]] = []  # each: its log line, then the traceback under it
    current: list[str] | None = None
    for line in server.log_lines():
        if _LOG_LINE.match(line):
            current = None
            if " ERROR " in line or " CRITICAL " in line:
                errors.append(current := [line])
        elif current is not None:
            current.append(line)  # the traceback of an error
        elif line.startswith("Traceback"):
            errors.append(current := [line])  # under another level, or Python's own
    # The same bug usually shows many times: count each distinct last line.
    kinds = Counter(error[-1].strip() for error in errors)
    assert not errors, (
        f"seed {seed}: the server logged {len(errors)} errors: {dict(kinds)}; the first:\n"
        + "\n".join(errors[0])
    )
