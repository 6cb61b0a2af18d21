"""Profiles that drive a real server with trio clients on loopback.

Each module here (``fanout``, ``connect``, ``idle``) defines a ``PROFILE`` and
is listed in ``bench.__main__.PROFILE_MODULES``; none exists yet.
"""
