"""Profiles that drive real servers over loopback, hubserver beside its peers.

- ``fanout``: events POSTed to the publish API, delivered to C WebSocket
  subscribers over S sites; deliveries/s, latency, exact loss and duplicates,
  server CPU and RSS, load-client CPU (``python -m bench fanout --help``).
- ``connect``: N subscribers open as fast as they can: connections/s and
  connect time.
- ``idle``: RSS and keep-alive CPU per idle subscriber.
- ``soak``: everything at once for N minutes (churn, publishing, slow
  readers, garbage from ``chaos``): RSS slope, exact loss, handler crashes.

Every server (``servers``: hubserver, and the peers in ``peers``: aiosignalr,
socketio, ceiling) is a subprocess on 127.0.0.1 with a free port, started and
stopped by the profile (``procs``). hubserver's scale-out layouts are servers
too, chosen with ``--servers``: ``hubserver-w2`` (``--workers 2``) and
``hubserver-redis2`` (two nodes sharing a redis-server the bench starts).
The load client is the same for all: several processes (``loadclient``),
each an epoll loop over non-blocking sockets that parses frames from bytes
and counts events exactly (``wire``); the publisher (``publisher``, or
``hubpublisher`` over the publisher hub, both on ``publishloop``'s run loop)
runs in the bench's own process. ``harness`` holds what the three profiles share,
``plot`` the ``--plot`` figure, and ``pyspy_summary`` reads the profiles
``fanout --py-spy DIR`` records.
"""
