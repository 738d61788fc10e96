"""Recording and replay: a file instead of the ring (source) and a tap that writes it."""
