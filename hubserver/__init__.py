"""hubserver: the Trio event streaming server built on hubcore."""
