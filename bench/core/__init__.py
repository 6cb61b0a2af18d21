"""Loop-free profiles: seeded codec throughput, no sockets and no event loop."""
