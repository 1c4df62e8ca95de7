"""`python -m sidecar acl-rules [OPTIONS]`: the Redis ACL rules of a user for one agent's sidecar.

One user for every sidecar (k8s/base/redis/users.acl) lets an agent that reads its sidecar's
password write to any run's keys. A user per agent, made by the launcher before it starts the
Job, may touch only the keys and channels this configuration of the sidecar uses:

    mapfile -t rules < <(python -m sidecar acl-rules --run-id RUN --agent-id AGENT --variation-id 0)
    redis-cli ACL SETUSER "sidecar-RUN-AGENT" on ">$PASSWORD" "${rules[@]}"

(one rule a line: kept whole and unexpanded by the shell, a selector in parentheses included).

The options are the run command's, read from the same flags and environment variables, so
the rules name exactly the keys and channels a sidecar started with them uses: the output and
logs streams of its variation and their idempotency hashes, the run's status stream and token
totals, its variation hash, its liveness key, its heartbeat channel, the token metrics
channel (publish only), and its control channel (subscribe only).
"""

from __future__ import annotations

from .config import TOKENS_CHANNEL, Settings

# What the sidecar sends (k8s/base/redis/users.acl, user sidecar, explains each).
COMMANDS = ("+auth", "+hello", "+ping", "+select", "+client|setname", "+script|load", "+evalsha", "+xadd", "+hget",
            "+hset", "+hincrby", "+hincrbyfloat", "+expire", "+publish", "+spublish", "+wait", "+role", "+cluster|info",
            "+cluster|slots")


def glob_escape(name: str) -> str:
    """``name`` as a Redis glob pattern that matches it alone."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in name)


def names(s: Settings) -> tuple[list[str], list[str]]:
    """The keys and the channels (besides the control channel) a sidecar with ``s`` uses."""
    output, logs, status = (s.channel(t) for t in (s.output_channel, s.logs_channel, s.status_channel))
    tokens = f"run:{s.run_key}:tokens"
    keys: list[str] = []
    for key in (output, logs, status, tokens):
        keys.extend((key, f"{key}:idem", f"{{{key}}}:idem"))  # transport.idem_key, off and on a cluster
    keys.append(f"run:{s.run_key}:variation:{s.variation_id}")
    keys.append(s.alive_key)
    channels = [output, logs, status, s.heartbeat_channel, TOKENS_CHANNEL]
    return list(dict.fromkeys(keys)), list(dict.fromkeys(channels))


def rules(s: Settings) -> list[str]:
    """ACL SETUSER rules (without ``on`` and the password) for the sidecar of ``s``."""
    from .control import control_channel

    keys, channels = names(s)
    out = ["resetkeys", "resetchannels", *(f"~{glob_escape(k)}" for k in keys),
           *(f"&{glob_escape(c)}" for c in channels), "-@all", *COMMANDS]
    # A selector for SET on the liveness key alone, and one for subscribing to the control
    # channel without publishing on it.
    out.append(f"(resetkeys ~{glob_escape(s.alive_key)} -@all +set)")
    out.append(f"(resetchannels &{glob_escape(control_channel(s))} -@all +subscribe +unsubscribe)")
    return out
