"""The run command: start the agent, ship its output, report its lifecycle, exit with its code."""

from __future__ import annotations

import gc
import os
import queue
import signal
import threading
import time

from agent_wrapper import signals
from agent_wrapper.events import STDERR, STDOUT, Exited, Output, SpawnFailed, StreamClosed
from agent_wrapper.exitcodes import signal_name
from agent_wrapper.pipes import PipeReader
from agent_wrapper.process import Agent

from . import _native, control, events, heartbeat, log, protocol, redaction
from .batcher import Batcher, Channel
from .config import Settings, mask_url, split_hosts, start_warnings, url_password
from .items import Item
from .outbox import Outbox
from .resp import client_name
from .spool import Spool, SpoolError
from .transport import Sender, TargetPipe, cluster_enabled, idem_key, open_connection, subscriber_connection

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from .resp import Connection


# Token reports with unusable fields that are logged, per run (an agent may send thousands).
IGNORED_REPORTS_TOLD = 5
# Agent states (status events) passed on as status messages: a burst of this many, then this
# many a second; past that only the latest state goes out, once a second. The status stream
# is the run's, shared by its variations, and trimmed to --max-stream-len: a chatty agent
# must not push the lifecycle statuses out of it.
AGENT_STATES_BURST = 20
AGENT_STATES_PER_S = 2.0


class Runtime:
    """Everything one run owns, wired together."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.producer = f"{s.agent_id}.{os.getpid()}.{int(time.time() * 1000)}.{os.urandom(3).hex()}"
        self.status_key = s.channel(s.status_channel)
        self.status_seq = 0
        self.finished = False
        self.tokens_key = f"run:{s.run_key}:tokens"
        self.tokens_seq = 0
        self.ignored_reports = 0  # token reports with fields left out (see _report_ignored)
        self._seq_lock = threading.Lock()  # status comes from several threads
        self._states_lock = threading.Lock()
        self._states_allowance = float(AGENT_STATES_BURST)
        self._states_checked = time.monotonic()
        self._state_held: events.AgentStatus | None = None  # the latest state over the budget
        self.agent_states_held = 0  # states not passed on (a later one was)
        self.base: dict[str, Any] = {
            "v": protocol.VERSION,
            "run_id": s.run_id,
            "variation_id": s.variation_id,
            "agent_id": s.agent_id,
            "producer": self.producer,
        }
        self.spool = self._open_spool()
        self.outbox = Outbox(s.buffer_max_bytes, self.spool, s.when_full, self.gap_item)
        self.channels = {
            STDOUT: self._channel(s.output_channel, STDOUT, structured=True),
            STDERR: self._channel(s.logs_channel, STDERR, structured=False),
        }
        self.batcher = Batcher(
            self.outbox,
            self.channels,
            max_records=s.batch_max_records,
            max_bytes=s.batch_max_bytes,
            linger_s=s.linger_ms / 1000.0,
            compress_threshold=s.compress_threshold,
            per_line_json=s.wire == "per-line-json",
            variation_id=s.variation_id,
            producer=self.producer,
            on_object=self.on_object,
        )
        # Raw batches waiting for the encoder count against the memory budget too.
        self.batcher.sealed_max_bytes = min(self.batcher.sealed_max_bytes, max(s.buffer_max_bytes, 1))
        self.sender = Sender(s, self.outbox, self.batcher, on_degraded=self.degraded, on_recovered=self.recovered)
        self.redactor = redaction.from_settings(_secrets_env(s), s.redact_patterns, s.redact)
        self.batcher.deliver_here = self.sender.deliver_here
        self.batcher.send_lone = self.sender.send_lone
        self.started_at = time.time()
        self.agent_pid: int | None = None
        # Commands and rejections in the order they came: the statuses they cause keep it.
        self.commands: queue.SimpleQueue[control.Command | control.Rejection] = queue.SimpleQueue()
        self.main_thread = threading.get_ident()  # where run() waits for the agent and applies them
        self.cancelled = False
        self.paused = False
        self.reading_cut = ""  # why reading the pipes was stopped before their end, if it was
        # A flood on the control channel must flood neither the status stream nor the log.
        self._reject_budget = log.Budget("more than 20 control commands rejected this minute; not reporting each")
        self._command_budget = log.Budget("more than 20 control commands this minute; not logging each")
        # One for the whole run: what it learns (a cluster's nodes) outlives a lost connection.
        heartbeat_pipe = TargetPipe(s, client_name("agent-sidecar-heartbeat", s.agent_id))
        self.heartbeat = heartbeat.Heartbeat(
            s,
            connect=lambda: heartbeat_pipe,  # type: ignore[arg-type, return-value]
            pid=lambda: self.agent_pid,
            stats=self.heartbeat_stats,
            started_at=self.started_at,
            keep_alive=self.run_keys(),
        )
        self._control_attempts = 0
        self.control = control.Control(
            s,
            connect=self.control_connection,
            on_command=self.command,
            on_reject=self.command,
        )
        self.sender.on_master_switch = self.control.master_moved

    def run_keys(self) -> tuple[str, ...]:
        """The keys this sidecar writes besides the variation hash, with the idempotency hash
        of each stream under both names (on a cluster it carries a hash tag; which one is in
        use is known only once connected)."""
        keys: list[str] = []
        for key in (*(c.key for c in self.channels.values()), self.status_key, self.tokens_key):
            keys.append(key)
            keys.extend(idem_key(key, cluster) for cluster in (False, True))
        return tuple(dict.fromkeys(keys))

    def control_connection(self) -> Connection:
        """The URL's server first; on a cluster, after a failed subscription, the other nodes
        the data path knows in turn (a classic PUBLISH reaches every node), so that the
        control channel outlives the node in the URL."""
        self._control_attempts += 1
        name = client_name("agent-sidecar-control", self.s.agent_id)
        nodes = self.sender.cluster_nodes()
        if nodes and self._control_attempts > 1:
            conn = open_connection(self.s, name, nodes[self._control_attempts % len(nodes)])
        else:
            conn = subscriber_connection(self.s, name)
        if split_hosts(self.s.redis_url) is not None or self.s.redis_mode == "cluster":
            # Commands are published in the cluster: a server outside it (a standalone one
            # among the seeds) must not take the subscription.
            if not cluster_enabled(conn.pipeline([("CLUSTER", "INFO")])[0]):
                conn.close()
                raise ConnectionError(f"{conn.endpoint.host}:{conn.endpoint.port} is not a node of the cluster")
        return conn

    def _open_spool(self) -> Spool | None:
        if self.s.spool_max_bytes <= 0:
            return None
        spool = Spool(self.s.spool_dir, self.producer, self.s.spool_max_bytes)
        try:
            spool.open()
        except (OSError, SpoolError) as exc:
            log.warning("disk spool unavailable; waiting output is held in memory only", error=str(exc))
            return None
        return spool

    def _channel(self, template: str, stream: str, *, structured: bool) -> Channel:
        key = self.s.channel(template)
        header = dict(self.base, type=protocol.BATCH, channel=key, stream=stream)
        return Channel(key, stream, header, structured)

    # -- control-plane messages ----------------------------------------------------------
    def gap_item(self, key: str, first: int, last: int) -> Item:
        stream = next((c.stream for c in self.channels.values() if c.key == key), "")
        msg = dict(self.base, type=protocol.GAP, channel=key, stream=stream, seq=first, n=last - first + 1,
                   timestamp=protocol.iso_utc(time.time()))
        msg["from"] = first
        msg["to"] = last
        return Item(key, self.producer, first, last, protocol.encode_object(msg), kind="gap")

    def status(self, status: str, /, agent_meta: dict[str, Any] | None = None, *, terminal: bool = False,
               **metadata: Any) -> None:
        """Queue a status message. ``agent_meta`` carries keys chosen by the agent (any names)."""
        if agent_meta:
            metadata = {**agent_meta, **metadata}
        if self.redactor is not None:  # the command's name, a spawn error, what an agent's event says
            metadata = self.redactor.mask_value(metadata)
        with self._seq_lock:
            if self.finished:
                return  # the terminal status stays the last one (a late "degraded" is only logged)
            seq = self.status_seq + 1
            msg = dict(self.base, type=protocol.STATUS, channel=self.status_key, seq=seq,
                       status=status, timestamp=protocol.iso_utc(time.time()), metadata=metadata)
            try:
                payload = protocol.encode_object(msg)
            except (TypeError, ValueError) as exc:  # metadata from outside: too deep, huge integers
                msg["metadata"] = {"unencodable_metadata": str(exc)[:200]}
                if "state" in metadata:
                    msg["metadata"]["state"] = str(metadata["state"])[:200]
                payload = protocol.encode_object(msg)
            self.status_seq = seq
            self.finished = terminal
            self.outbox.put(Item(self.status_key, self.producer, seq, seq, payload, kind="status"), force=True)

    def on_object(self, obj: dict[str, Any]) -> None:
        """A stdout JSON object (encoder or reader thread): route the event it carries, if any.
        Whatever the object holds, this must not raise: it runs on the data path."""
        try:
            self._route(obj)
        except Exception as exc:
            log.warning("agent event ignored", error=repr(exc)[:200])

    def _route(self, obj: dict[str, Any]) -> None:
        event = events.classify(obj)
        if isinstance(event, events.AgentStatus):
            with self._states_lock:
                if not self._state_allowed():
                    if self._state_held is not None:
                        self.agent_states_held += 1
                    elif not self.agent_states_held:
                        log.info(f"agent states over {AGENT_STATES_PER_S:g} a second; passing on the latest "
                                 "once a second")
                    self._state_held = event
                    return
                if self._state_held is not None:  # this one is later: the held one is passed over
                    self.agent_states_held += 1
                    self._state_held = None
                self.status("agent", event.metadata, state=event.state)
            return
        if isinstance(event, (events.TokenReport, events.UnusableReport)) and event.ignored:
            self._report_ignored(event)
        if isinstance(event, events.TokenReport):
            with self._seq_lock:
                seq = self.tokens_seq + 1
                msg: dict[str, Any] = dict(self.base, type="tokens", channel=self.tokens_key, seq=seq,
                                           timestamp=protocol.iso_utc(time.time()), source=event.source,
                                           **event.counts)
                if event.cost_usd is not None:
                    msg["cost_usd"] = event.cost_usd
                if event.model is not None:  # the agent's text, decoded from JSON: masked like a status
                    msg["model"] = event.model if self.redactor is None else self.redactor.mask_value(event.model)
                item = Item(self.tokens_key, self.producer, seq, seq, protocol.encode_object(msg), kind="tokens")
                self.tokens_seq = seq
                self.outbox.put(item, force=True)

    def _state_allowed(self) -> bool:
        """Whether an agent state may go out now (token bucket; the caller holds _states_lock)."""
        now = time.monotonic()
        self._states_allowance = min(float(AGENT_STATES_BURST),
                                     self._states_allowance + (now - self._states_checked) * AGENT_STATES_PER_S)
        self._states_checked = now
        if self._states_allowance < 1.0:
            return False
        self._states_allowance -= 1.0
        return True

    def pass_held_state(self, *, now: bool = False) -> None:
        """The latest agent state held back goes out when the budget allows (main thread, once a
        second), or ``now`` (at the end of the run, before the final status)."""
        with self._states_lock:
            held = self._state_held
            if held is None or not (now or self._state_allowed()):
                return
            self._state_held = None
            self.status("agent", held.metadata, state=held.state)

    def _report_ignored(self, event: events.TokenReport | events.UnusableReport) -> None:
        """Fields of a token report that are not counts (not a whole number from 0 to 2^53) or
        not a cost: left out, and said, for the first few reports of a run."""
        self.ignored_reports += 1
        if self.ignored_reports <= IGNORED_REPORTS_TOLD:
            counted = "the rest counted" if isinstance(event, events.TokenReport) else "nothing counted"
            last = {"more": "not logged again"} if self.ignored_reports == IGNORED_REPORTS_TOLD else {}
            log.warning(f"token report fields ignored, not usable numbers; {counted}", source=event.source,
                        fields=",".join(event.ignored), **last)

    def degraded(self, since: float, error: str) -> None:
        self.status("degraded", since=protocol.iso_utc(since), error=error,
                    waiting_records=self.outbox.waiting_records, waiting_bytes=self.outbox.waiting_bytes,
                    spool_bytes=self.outbox.spool_bytes)

    def recovered(self, down_s: float, waiting_records: int, waiting_bytes: int) -> None:
        self.status("recovered", down_s=round(down_s, 3), delivered_late_records=waiting_records,
                    delivered_late_bytes=waiting_bytes)

    def heartbeat_stats(self) -> dict[str, Any]:
        st = self.sender.stats
        return {
            "records_shipped": st.records_shipped,
            "bytes_shipped": st.bytes_shipped,
            "records_waiting": self.outbox.waiting_records,
            "spool_bytes": self.outbox.spool_bytes,
            "redis_connected": st.connected,
            "last_write_age_s": round(time.time() - st.last_ok, 3) if st.last_ok else None,
            "paused": self.paused,
        }

    def rejected(self, rej: control.Rejection) -> None:
        """Main thread: report a rejected command (log and status, within their budget)."""
        # the reason may quote the command (an unknown cmd): the log is masked as the status is
        reason = self.redactor.mask_value(rej.reason) if self.redactor is not None else rej.reason
        if not self._reject_budget.take():
            log.debug("control command rejected", reason=reason)
            return
        log.warning("control command rejected", reason=reason)
        meta: dict[str, Any] = {"reason": rej.reason}
        if rej.raw is not None:  # parsed by orjson and at most 32 levels deep: it encodes
            meta["command"] = {k: v for k, v in rej.raw.items() if k != "sig"}
        self.status("control_rejected", **meta)

    def command(self, cmd: control.Command | control.Rejection) -> None:
        """Control thread: queue ``cmd`` (or its rejection) for the main thread and wake it."""
        self.commands.put(cmd)
        signals.wake(self.main_thread)

    def on_tick(self, sup: signals.Supervisor) -> None:
        """Main thread, at least once a second while the agent runs."""
        self.apply_commands(sup)
        self.pass_held_state()

    def _queued_commands(self) -> Iterator[control.Command]:
        """Main thread: the queued commands, in order; the rejections among them are reported
        on the way."""
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, control.Rejection):
                self.rejected(cmd)
            else:
                yield cmd

    def apply_commands(self, sup: signals.Supervisor) -> None:
        """Main thread, on every supervisor tick (each command wakes it): carry out what the
        control channel asked."""
        for cmd in self._queued_commands():
            agent = sup.agent
            # the first cancel is always told: it ends the run
            first_cancel = cmd.cmd == "cancel" and not self.cancelled
            report = log.info if first_cancel or self._command_budget.take() else log.debug
            report("control command", cmd=cmd.cmd, **({"signal": signal_name(cmd.signal)} if cmd.signal else {}))
            if (self.cancelled or sup.stopping) and cmd.cmd in ("pause", "resume"):
                # the agent is shutting down (a cancel, or a SIGTERM or SIGINT to the sidecar): a
                # pause would freeze its clean-up until SIGKILL
                report("control command ignored: the agent is being "
                       + ("cancelled" if self.cancelled else "stopped"), cmd=cmd.cmd)
                continue
            if cmd.cmd == "cancel":
                self.cancelled = True
                self.paused = False
                sup.stop(signal.SIGTERM)  # with SIGCONT: a paused agent must wake to see SIGTERM
            elif cmd.cmd == "signal" and cmd.signal is not None:
                agent.signal_group(cmd.signal)
                if cmd.signal == signal.SIGCONT:
                    self.woken(agent.pid)
            elif cmd.cmd == "pause" and not self.paused:
                agent.signal_group(signal.SIGSTOP)
                self.paused = True
                self.status("paused", pid=agent.pid)
            elif cmd.cmd == "resume":
                # SIGCONT also when the agent (or anyone) stopped the group on its own
                agent.signal_group(signal.SIGCONT)
                self.woken(agent.pid)

    def report_late_rejections(self) -> None:
        """Main thread, once the agent has exited and the listener stopped: the rejections it
        queued are still reported; commands come too late to carry out."""
        for _too_late in self._queued_commands():
            pass

    def woken(self, pid: int) -> None:
        """The agent's group was sent SIGCONT (a resume, a signal command or a forwarded signal,
        the SIGCONT of a stop): if it was paused, it runs again, and the status says so."""
        if self.paused:
            self.paused = False
            self.status("running", pid=pid, resumed=True)

    def sink(self, ev: Output | StreamClosed) -> None:
        if isinstance(ev, Output):
            self.batcher.add(ev)
        elif ev.forced and self.reading_cut and ev.unread:
            log.warning(f"stopped reading the agent's {ev.stream} ({self.reading_cut}): what the pipe still "
                        "held is lost", unread_bytes=ev.unread)
        elif ev.forced and self.reading_cut:
            log.warning(f"{ev.stream} still held open by a process after the agent exited; stopped reading "
                        f"({self.reading_cut})")
        elif ev.forced:
            log.warning(f"{ev.stream} still held open by a process after the agent exited; stopped reading",
                        pipe_grace_s=self.s.pipe_grace_s, unread_bytes=ev.unread)

    def cut_reading(self, reader: PipeReader, why: str) -> None:
        """Stop reading the agent's pipes now, also where back-pressure holds the reader up:
        what is being encoded goes into the buffer past its limit (finish spools it, or marks
        it by a gap marker where the spool has no room)."""
        self.reading_cut = why
        reader.stop_after(0, finish_closed=False)
        self.outbox.close()



def _secrets_env(s: Settings) -> dict[str, str]:
    """The environment redaction draws secret values from, plus the sidecar's own secrets
    wherever they came from (a password or control secret read from a file)."""
    env = dict(os.environ)
    if s.redis_password:
        env["SIDECAR_OWN_REDIS_PASSWORD"] = s.redis_password
    in_url = url_password(s.redis_url)
    if in_url:
        env["SIDECAR_OWN_URL_PASSWORD"] = in_url
    if s.control_secret:
        env["SIDECAR_OWN_CONTROL_SECRET"] = s.control_secret.decode("utf-8", "surrogateescape")
    return env


GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python's default: 700)


def run(s: Settings, launched: Agent | SpawnFailed) -> int:
    """Ship the output of the agent the caller started (after ``signals.block()`` and before
    any thread, see cli.main), or report that it could not be started."""
    log.configure(s.log_format, s.log_level)
    for message, fields in start_warnings(s, os.environ):
        log.warning(message, **fields)
    rt = Runtime(s)
    if rt.spool is not None:
        ours = {ch.key for ch in rt.channels.values()} | {rt.status_key, rt.tokens_key}
        orphans = rt.spool.adopt_orphans(accept=ours.__contains__)
        if orphans:
            log.info("delivering output left in the spool by an earlier sidecar first", items=len(orphans))
            rt.outbox.adopt(orphans)
        if rt.spool.damaged:
            log.error("output lost: spool frames left by an earlier sidecar were damaged on disk",
                      places=len(rt.spool.damaged), first=rt.spool.damaged[0])
        if rt.spool.unusable:
            log.warning("spool directories left by earlier sidecars could not be opened or read",
                        directories=len(rt.spool.unusable), first=rt.spool.unusable[0])
        if rt.spool.skipped:
            log.info("the spool holds output of other runs; it stays there for their sidecars or for replay",
                     directories=rt.spool.skipped, replay=f"python -m sidecar replay --spool-dir {s.spool_dir}")
    rt.sender.start()
    rt.batcher.start()
    warning = control.insecure_warning(s)
    if warning:
        log.warning(warning)
    log.debug("started", redis=mask_url(s.redis_url), run_id=s.run_id, variation_id=s.variation_id,
              native=_native.speedups is not None)
    rt.status("starting", command=os.path.basename(s.command[0]))

    result = launched
    if isinstance(result, SpawnFailed):
        log.error(result.reason if rt.redactor is None else rt.redactor.mask_value(result.reason))
        return finish(rt, result.code, "failed", {"exit_code": result.code, "reason": result.reason})

    agent = result
    rt.agent_pid = agent.pid
    rt.status("running", pid=agent.pid)
    # What start-up built lives as long as the process: keep it out of the collector's walks.
    # The data path hardly makes reference cycles, yet each JSON-object line parsed allocates
    # containers that count towards the next collection: collect less often (cycles are
    # still found, later).
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    rt.heartbeat.start()
    rt.control.start()
    echo = {STDOUT: 1, STDERR: 2} if s.echo else None  # open: cli.main put /dev/null on a closed one
    reader = PipeReader(
        {STDOUT: agent.stdout_fd, STDERR: agent.stderr_fd},
        rt.sink,
        on_quiet=rt.batcher.on_quiet,
        echo=echo,
        filter=rt.redactor,
        max_line_bytes=s.max_line_bytes,
        count_lf=_native.speedups.count_lf if _native.speedups is not None else None,
        lone=rt.batcher.lone_read,
    )
    reader.start()

    stop_asked = False

    def on_signal(sig: int) -> None:
        nonlocal stop_asked
        stop_asked = stop_asked or sig in signals.STOPPING
        log.info("forwarding signal to the agent", signal=signal_name(sig))
        if sig in signals.STOPPING or sig == signal.SIGCONT:  # a stop sends SIGCONT with its signal
            rt.woken(agent.pid)

    def on_kill() -> None:
        log.warning("agent still running after the kill grace; sending SIGKILL", kill_grace_s=s.kill_grace_s)

    sup = signals.Supervisor(agent, s.kill_grace_s, on_signal=on_signal, on_kill=on_kill)
    exited: Exited = sup.wait(tick=lambda: rt.on_tick(sup))
    rt.control.stop()
    rt.report_late_rejections()
    reader.stop_after(s.pipe_grace_s)
    stops = 0
    drain_deadline = time.monotonic() + s.drain_timeout_s
    while not reader.join(0.1):
        sig = signals.next_signal(0)
        if sig is not None:
            agent.signal_group(sig)  # what is left of the agent's group (a process holding the pipes)
            if sig in signals.STOPPING:
                stops += 1
            log.info("agent has exited; still reading its pipes", pipe_grace_s=s.pipe_grace_s,
                     forwarded=signal_name(sig))
        if rt.reading_cut:
            continue
        if stops >= 2:
            rt.cut_reading(reader, "a second stop signal")
        elif ((stop_asked or stops) and rt.outbox.blocked_since is not None
              and rt.sender.stats.down_since is not None and time.monotonic() >= drain_deadline):
            # Asked to stop (the pod is going away) while Redis is away and buffer and spool are
            # full: the pipes could wait for ever. Stop reading, so that what waits in memory
            # and the final status reach the spool before the runtime's SIGKILL.
            rt.cut_reading(reader, f"a stop signal, Redis unreachable and {rt.outbox.full_text()} "
                           ", --drain-timeout after the agent exited")
    if reader.echo_closed:
        log.warning(f"the sidecar's own {' and '.join(reader.echo_closed)} could not be written any more (its reader "
                    "went away): the echo stopped there, the output in Redis is complete")
    elif reader.echo_dropped:
        log.warning("the sidecar's own stdout/stderr did not keep up: output dropped from the echo only, "
                    "not from Redis", bytes=reader.echo_dropped)
    meta: dict[str, Any] = {
        "exit_code": exited.code,
        "duration_s": round(exited.ts - agent.started.ts, 3),
        "records": rt.batcher.records_in,
        "bytes": rt.batcher.bytes_in,
    }
    if exited.signal is not None:
        meta["signal"] = signal_name(exited.signal)
    # Reading cut short: the time to deliver ran from the agent's exit. A stop signal after the
    # agent exited counts towards leaving the drain (the next one leaves).
    final = "cancelled" if rt.cancelled else "killed" if exited.signal is not None else "exited"
    return finish(rt, exited.code, final, meta, drain_deadline if rt.reading_cut else None, min(stops, 1))


def finish(rt: Runtime, code: int, final: str, meta: dict[str, Any], deadline: float | None = None,
           told: int = 0) -> int:
    """Flush, report ``final``, deliver within --drain-timeout (or by ``deadline``), leave the
    rest in the spool; ``told``: stop signals already counted (at two, stop waiting)."""
    s = rt.s
    if deadline is None:
        deadline = time.monotonic() + s.drain_timeout_s
    if not rt.batcher.close(timeout=max(0.0, deadline - time.monotonic())):
        # Full and Redis away (or the machine starved of CPU): let the last batches into the
        # buffer over its limit. Encoding is bounded work, so waiting for it loses nothing.
        rt.outbox.close()
        if not rt.batcher.close(timeout=120.0):
            log.error("encoder did not finish; output still in memory is lost")
    rt.pass_held_state(now=True)  # every stdout object was routed by now: the agent's last state
    rt.status(final, terminal=True, **meta)  # after the last output batch, so consumers see all output first
    rt.sender.finish()
    while told < 2 and not rt.sender.join(0.05):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sig = signals.next_signal(0)
        if sig in (signal.SIGINT, signal.SIGTERM):
            told += 1
            log.warning(
                "agent has exited; waiting for its output to reach Redis",
                waiting_records=rt.outbox.waiting_records,
                waiting_bytes=rt.outbox.waiting_bytes,
                redis=mask_url(s.redis_url),
                seconds_left=round(left, 1),
            )
            if told >= 2:
                log.warning("second stop signal during drain: leaving the rest in the spool")
                break
    rt.sender.abandon()
    rt.sender.join(0.5)  # a TCP connect in progress cannot be woken; what it holds is spilled below
    rt.heartbeat.stop()
    rt.control.stop()
    rt.outbox.close()
    if not rt.outbox.empty():
        gapped, lost_records, lost_items = rt.outbox.spill_all()
        why = "a second stop signal" if told >= 2 else "the drain timeout"
        if lost_items < len(rt.outbox):
            spooled = rt.outbox.spooled_records()
            what = "all output" if spooled else "the run's last messages"
            log.warning(
                f"Redis did not take {what} before {why}; {'it stays' if spooled else 'they stay'} in the spool",
                waiting_records=spooled,
                spool=s.spool_dir,
                replay=f"python -m sidecar replay --spool-dir {s.spool_dir}",
            )
        if gapped:
            log.error(f"Redis did not take all output before {why}, and the spool had no room for it: lost, "
                      "gap markers in the spool say what is missing", records=gapped)
        if lost_items:
            reason = "the spool could not be written" if rt.spool is not None else "there is no usable spool"
            log.error(f"Redis did not take all output before {why}, and {reason}: lost", records=lost_records,
                      messages=lost_items)
    if rt.outbox.dropped_records:
        full = "buffer and spool were full" if rt.spool is not None else "the buffer was full"
        log.warning(f"output dropped while {full} (--when-full drop)", records=rt.outbox.dropped_records)
    if rt.outbox.unreadable_records:
        log.error("output lost: spool frames that could not be read back", records=rt.outbox.unreadable_records)
    if rt.spool is not None:
        rt.spool.close()
    rt.sender.close()
    return code
