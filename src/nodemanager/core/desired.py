"""Merging an authority document into the sliver records (authority.md, "Sync semantics").

The authority's document is a comprehensive snapshot: every sliver it lists is wanted, and an
authority-created record it no longer lists is to be removed. Three rules keep a bad document
from doing damage:

- the timestamp rule: a record newer than the document is never replaced or removed by it;
- ticket-created records are not the authority's to remove (they live until their ticket's
  expiry or an explicit Destroy);
- the safety valve: when one document would remove more than ``max_delete_fraction`` of the
  authority-created records (a truncated or empty document is the classic cause), the removals
  are held until the same removals are seen in ``confirm_after`` consecutive documents, or an
  operator allows the mass deletion.

``merge_document`` only decides; the caller persists ``upserts``/``deletes``/``valve`` in one
transaction, logs and exports ``valve_tripped``. Expiry is not handled here: the plan destroys
expired records at every sync.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from .records import SOURCE_AUTHORITY, AuthorityDocument, Sliver, ValveState


@dataclass(frozen=True)
class MergeResult:
    """The outcome of merging one document; every tuple is sorted by name.

    ``upserts`` holds only new or changed records, so re-merging an unchanged document writes
    nothing. ``held`` are removals the safety valve kept back (their records stay in
    ``records``); ``stale_kept`` are names whose record is newer than the document.
    """

    records: dict[str, Sliver]
    upserts: tuple[Sliver, ...]
    deletes: tuple[str, ...]
    held: tuple[str, ...]
    valve: ValveState
    valve_tripped: bool
    stale_kept: tuple[str, ...]


def _as_authority_record(sliver: Sliver, timestamp: int) -> Sliver:
    """The record a document's sliver becomes: it carries the document's timestamp (the
    timestamp rule compares records with documents) and is authority-sourced, whatever the
    parser left in those fields."""
    if sliver.timestamp == timestamp and sliver.source == SOURCE_AUTHORITY:
        return sliver
    return replace(sliver, timestamp=timestamp, source=SOURCE_AUTHORITY)


def merge_document(
    records: Mapping[str, Sliver],
    doc: AuthorityDocument,
    valve: ValveState,
    *,
    max_delete_fraction: float,
    confirm_after: int,
    allow_mass_delete: bool = False,
    protected: frozenset[str] = frozenset(),
) -> MergeResult:
    """Merge ``doc`` into ``records`` (the current records, keyed by name).

    For each sliver of the document: a record with a larger timestamp than the document is kept
    (``stale_kept``); a record with the same content is kept as it is (no upsert); otherwise the
    document's sliver becomes the record. A record absent from the document is removed when it is
    authority-sourced, not newer than the document, and not in ``protected`` (names of entries the
    parser rejected: an invalid entry never deletes the existing sliver of that name); ticket
    records and newer records are kept.

    Safety valve: with ``E`` authority-sourced records before the merge, removals ``R`` with
    ``len(R) > max_delete_fraction * E`` are held unless ``allow_mass_delete``. The same set
    ``R`` as ``valve.held`` counts one more consecutive sighting, a different set starts over at
    1; at ``confirm_after`` sightings the removals are applied. Whenever removals are applied the
    valve is reset to ``ValveState()``. If a document lists the same name twice, its last entry
    counts.
    """
    wanted: dict[str, Sliver] = {}
    for sliver in doc.slivers:
        wanted[sliver.name] = sliver

    merged: dict[str, Sliver] = dict(records)
    upserts: list[Sliver] = []
    stale_kept: list[str] = []
    for name in sorted(wanted):
        existing = records.get(name)
        if existing is not None and existing.timestamp > doc.timestamp:
            stale_kept.append(name)
            continue
        candidate = _as_authority_record(wanted[name], doc.timestamp)
        if existing is not None and existing.content_equal(candidate):
            continue
        merged[name] = candidate
        upserts.append(candidate)

    authority_count = 0
    removals: list[str] = []
    for name, record in records.items():
        if record.source != SOURCE_AUTHORITY:
            continue
        authority_count += 1
        if name not in wanted and name not in protected and record.timestamp <= doc.timestamp:
            removals.append(name)
    removals.sort()

    removal_set = frozenset(removals)
    new_valve = ValveState()
    tripped = False
    if len(removals) > max_delete_fraction * authority_count and not allow_mass_delete:
        seen = valve.seen + 1 if removal_set == valve.held else 1
        if seen < confirm_after:
            new_valve = ValveState(held=removal_set, seen=seen)
            tripped = True

    if tripped:
        deletes: tuple[str, ...] = ()
        held = tuple(removals)
    else:
        for name in removals:
            del merged[name]
        deletes = tuple(removals)
        held = ()
    return MergeResult(
        records=merged,
        upserts=tuple(upserts),
        deletes=deletes,
        held=held,
        valve=new_valve,
        valve_tripped=tripped,
        stale_kept=tuple(stale_kept),
    )
