"""The ``conf_files`` document handler: fetch, compare, run commands, write (issue 12).

The decisions (validation, the confinement of ``dest``, the step plan) are pure and live in
:mod:`nodemanager.core.conffiles`; this adapter does the effects, through the :class:`Host` seam
for files and commands and :mod:`nodemanager.http.client` for the fetch (as :mod:`.authority.client` does: TLS
verified against ``authority.ca_file`` when set, else the system CAs; no redirects, no proxy
variables, a whole-response deadline and a size cap).

For each valid entry, in document order: the owner and group must exist; the source is fetched
from ``conf_files.base_url`` + ``source`` (``?node_id=N`` appended as the original did) -- a
failed fetch leaves the installed file untouched; a file that already has the content, owner,
group and mode is left alone and no command runs (unless ``always_update``); else
``preinstall_cmd``, the atomic write, ``postinstall_cmd`` (see ``core.conffiles.after_failure``).
Every entry's outcome is logged, recorded in the store (``Meta.CONF_FILES``, JSON) for
``status`` and counted by the ``nodemanager_conf_files{state}`` gauge. Called from the sync thread.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .core.conffiles import (
    MAX_FILE_BYTES,
    ConfFile,
    EntryOutcome,
    EntryState,
    InstalledFile,
    StepKind,
    after_failure,
    count_states,
    install_steps,
    needs_install,
    source_url,
    validate_entries,
)
from .http.client import ClientTimeout, HttpClientError, ResponseTooLarge
from .http.client import request as http_request
from .core.errors import AuthorityUnavailable, BackendError, ConfigError, DocumentRejected
from .core.records import AuthorityDocument
from .datadir import Meta
from .host import Host
from .hostconfined import ConfinementRefused

if TYPE_CHECKING:
    from .config import Config
    from .store import Store

logger = logging.getLogger(__name__)

#: Seconds a pre-/post-install or error command may run before its process group is killed.
COMMAND_TIMEOUT = 120.0
#: Bytes of a command's output kept for the log.
OUTPUT_LIMIT = 16 * 1024
_LOGGED_OUTPUT = 400

#: ``url -> content``; raises ``AuthorityUnavailable`` (failed) or ``DocumentRejected`` (over the cap).
Fetcher = Callable[[str], bytes]


class HttpSourceFetcher:
    """GET one source with a timeout for the whole answer and a size cap; only HTTP 200 is
    content. Thread-compatible."""

    def __init__(self, *, timeout: float, max_bytes: int = MAX_FILE_BYTES, ca_file: str | None = None) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        try:  # at construction, as the authority client does: a bad CA file stops the start
            self._context = ssl.create_default_context(cafile=ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"authority.ca_file {ca_file}: cannot load CA certificates: {exc}") from exc

    def __call__(self, url: str) -> bytes:
        try:
            response = http_request(url, method="GET", headers=(("User-Agent", "nodemanager"),),
                                    timeout=self.timeout, max_body=self.max_bytes, ssl_context=self._context)
        except ResponseTooLarge as exc:
            raise DocumentRejected(f"source is over the {self.max_bytes}-byte cap ({exc})") from exc
        except ClientTimeout as exc:
            raise AuthorityUnavailable(f"no complete answer within {self.timeout:g} s") from exc
        except HttpClientError as exc:  # refused, reset, TLS verification, malformed
            raise AuthorityUnavailable(str(exc)) from exc
        if response.status != 200:
            raise AuthorityUnavailable(f"HTTP {response.status}")
        return response.body


class ConfFilesHandler:
    """The ``conf_files`` :class:`~nodemanager.sync.DocumentHandler` (see the module docstring)."""

    name = "conf_files"

    def __init__(self, *, host: Host, store: Store, base_url: str, allowed_dirs: Sequence[str], fetch: Fetcher,
                 command_timeout: float = COMMAND_TIMEOUT, now: Callable[[], float] = time.time) -> None:
        self.host = host
        self.store = store
        self.base_url = base_url
        self.allowed_dirs = tuple(allowed_dirs)
        self.fetch = fetch
        self.command_timeout = command_timeout
        self._now = now

    @staticmethod
    def from_config(config: Config, *, host: Host, store: Store) -> ConfFilesHandler:
        section = config.conf_files
        fetcher = HttpSourceFetcher(timeout=float(config.authority.timeout), ca_file=config.authority.ca_file)
        return ConfFilesHandler(host=host, store=store, base_url=section.base_url,
                                allowed_dirs=section.allowed_dirs, fetch=fetcher)

    def apply(self, doc: AuthorityDocument) -> None:
        """Install the document's ``conf_files`` and record every entry's outcome."""
        outcomes = self.install_all(doc.members.get("conf_files", []), doc.node_id)
        self.store.set_meta({Meta.CONF_FILES: encode_state(outcomes, self._now())})

    def install_all(self, raw: object, node_id: int | None) -> list[EntryOutcome]:
        validated = validate_entries(raw, self.allowed_dirs)
        outcomes = list(validated.outcomes)
        for outcome in validated.outcomes:
            _log(outcome)
        for entry in validated.entries:
            try:
                outcome = self.install(entry, node_id)
            except BackendError as exc:  # the host failed (a write, a walk): this entry's failure
                outcome = EntryOutcome(entry.dest.dest, EntryState.FAILED, str(exc))
            _log(outcome)
            outcomes.append(outcome)
        return outcomes

    def install(self, entry: ConfFile, node_id: int | None) -> EntryOutcome:
        """One valid entry, start to end (see the module docstring)."""
        dest = entry.dest.dest

        def done(state: EntryState, reason: str = "") -> EntryOutcome:
            return EntryOutcome(dest, state, reason)

        owner, group = self.host.getpwnam(entry.owner), self.host.getgrnam(entry.group)
        if owner is None or group is None:
            return done(EntryState.REFUSED, f"no such {'user' if owner is None else 'group'} "
                                            f"{entry.owner if owner is None else entry.group!r}")
        url = source_url(self.base_url, entry.source, node_id)
        try:
            data = self.fetch(url)
        except DocumentRejected as exc:
            return done(EntryState.REFUSED, f"{url}: {exc}")
        except AuthorityUnavailable as exc:
            return done(EntryState.FAILED, f"fetch failed, installed file left alone: {url}: {exc}")
        root = Path(entry.dest.root)
        try:
            found = self.host.inspect_below(root, entry.dest.parts, limit=MAX_FILE_BYTES)
        except ConfinementRefused as exc:
            return done(EntryState.REFUSED, str(exc))
        installed = None if found is None else InstalledFile(found[0].uid, found[0].gid, found[0].mode, found[1])
        if not needs_install(entry, data, installed, owner.uid, group.gid):
            return done(EntryState.UNCHANGED)
        note = ""
        for step in install_steps(entry):
            if step.kind is StepKind.WRITE:
                try:
                    self.host.write_below(root, entry.dest.parts, data, uid=owner.uid, gid=group.gid,
                                          mode=entry.mode)
                except ConfinementRefused as exc:
                    return done(EntryState.REFUSED, str(exc))
                logger.info("event=conf-file-written dest=%s bytes=%d owner=%s group=%s mode=%04o",
                            dest, len(data), entry.owner, entry.group, entry.mode)
                continue
            problem = self._run(dest, step.kind.value, step.command)
            if problem is None:
                continue
            policy = after_failure(entry, step.kind)
            if policy.run_error_cmd:
                self._run(dest, "error_cmd", entry.error_cmd)
            if not policy.proceed:
                written = step.kind is StepKind.POSTINSTALL
                return done(EntryState.FAILED, ("installed, but " if written else "not installed: ") + problem)
            note = f"{problem} (ignored: ignore_cmd_errors)"
        return done(EntryState.INSTALLED, note)

    def _run(self, dest: str, which: str, command: str) -> str | None:
        """Run one command; None when it succeeded, else why it failed."""
        started = time.monotonic()
        result = self.host.run_shell(command, timeout=self.command_timeout, output_limit=OUTPUT_LIMIT)
        output = result.output.decode("utf-8", "replace").strip()[-_LOGGED_OUTPUT:]
        level = logging.INFO if result.ok else logging.WARNING
        logger.log(level, "event=conf-file-command dest=%s command=%s status=%s seconds=%.1f output=%r",
                   dest, which, "timeout" if result.timed_out else result.returncode,
                   time.monotonic() - started, output)
        if result.ok:
            return None
        if result.timed_out:
            return f"{which} killed after {self.command_timeout:g} s"
        return f"{which} exited with status {result.returncode}" + (f": {output[-120:]}" if output else "")


def _log(outcome: EntryOutcome) -> None:
    level = {EntryState.REFUSED: logging.WARNING, EntryState.FAILED: logging.WARNING,
             EntryState.INSTALLED: logging.INFO}.get(outcome.state, logging.DEBUG)
    logger.log(level, "event=conf-file dest=%s state=%s reason=%r", outcome.dest, outcome.state.value, outcome.reason)


# --- the recorded state: status and metrics ---------------------------------------------------
def encode_state(outcomes: Sequence[EntryOutcome], now: float) -> str:
    """The JSON kept in ``Meta.CONF_FILES``."""
    return json.dumps({"time": int(now), "entries": [
        {"dest": o.dest, "state": o.state.value, "reason": o.reason} for o in outcomes]})


def decode_state(raw: str) -> tuple[int, list[EntryOutcome]] | None:
    """``(time, outcomes)`` from ``Meta.CONF_FILES``; None when absent or unreadable."""
    try:
        data = json.loads(raw) if raw else None
        if not isinstance(data, dict):
            return None
        outcomes = [EntryOutcome(str(e["dest"]), EntryState(e["state"]), str(e.get("reason", "")))
                    for e in data.get("entries", [])]
        return int(data.get("time", 0)), outcomes
    except (ValueError, TypeError, KeyError):
        return None


def state_counts(raw: str) -> dict[str, int] | None:
    """Entries per state of the last run (the gauge); None when no run was recorded."""
    decoded = decode_state(raw)
    return None if decoded is None else count_states(decoded[1])


#: ``status`` shows at most this many entries (the most troubled first).
STATUS_ENTRIES = 40


def status_lines(raw: str, when: Callable[[float], str]) -> list[str]:
    """The ``status`` lines for the last run: a count per state, then each entry with its state
    (and reason). Nothing when the handler never ran."""
    decoded = decode_state(raw)
    if decoded is None:
        return []
    stamp, outcomes = decoded
    counts = count_states(outcomes)
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no entries"
    lines = [f"conf files:     {summary} ({when(stamp)})"]
    order = {EntryState.FAILED: 0, EntryState.REFUSED: 1, EntryState.INSTALLED: 2, EntryState.UNCHANGED: 3,
             EntryState.DISABLED: 4}
    shown = sorted(outcomes, key=lambda o: order[o.state])
    for outcome in shown[:STATUS_ENTRIES]:
        word = outcome.state.value.upper() if outcome.state in (EntryState.FAILED, EntryState.REFUSED) \
            else outcome.state.value
        lines.append(f"  {word:<10} {outcome.dest}" + (f": {outcome.reason[:160]}" if outcome.reason else ""))
    if len(shown) > STATUS_ENTRIES:
        lines.append(f"  ... and {len(shown) - STATUS_ENTRIES} more (see the log)")
    return lines
