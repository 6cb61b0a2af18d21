"""The end-to-end tests reuse the server fixtures of tests/hubserver."""

from tests.hubserver.conftest import dev_key, start_server  # noqa: F401
