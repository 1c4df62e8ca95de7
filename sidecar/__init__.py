"""agent-sidecar: ships an agent's output to Redis, batched, compressed, in order and never lost."""

__version__ = "0.1.0"
