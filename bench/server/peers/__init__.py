"""Peer servers the bench runs beside hubserver, each as ``python -m bench.server.peers.X``.

- ``aiosignalr_peer``: aiosignalr's SignalR server (aiohttp frontend).
- ``socketio_peer``: python-socketio under uvicorn.
- ``ceiling``: a bare selectors loop, the practical limit of Python fan-out.

Each joins a subscriber to the group of its ``site_id`` query parameter and
broadcasts ``POST /v1/events/entries`` (one event or an array) to the
event's site. None checks tokens.
"""
