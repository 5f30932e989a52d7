"""The audit chain's hashing and its verification walk, pure: rows in, problems out.

Each event's hash covers the previous event's hash, its own sequence number and its content, so
a row's hash says where it stood and what it held when it was written. The walk uses that to
name the first row whose content or link is wrong and what is wrong with it; the rules are
written down in docs/security.md ("The audit log").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keyshift.canonical import canonical_json, sha256_hex

GENESIS = "0" * 64

#: How far back a row's link is looked up to recognise rows inserted before it.
RECENT_LINKS = 1024
#: How far a renumbered row's original sequence number is searched for.
RENUMBER_SEARCH = 32


def event_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """SHA-256 of the previous hash followed by the canonical JSON of the event (its ``seq``
    included; ``occurred_at`` as the text the chain stores)."""
    body = {
        "seq": row["seq"],
        "id": row["id"],
        "occurred_at": row["occurred_at"],
        "actor": row["actor"],
        "action": row["action"],
        "target_type": row["target_type"],
        "target_id": row["target_id"],
        "account_id": row["account_id"],
        "request_id": row["request_id"],
        "details": row["details"],
    }
    return sha256_hex(prev_hash.encode() + canonical_json(body))


class ProblemKind(StrEnum):
    CONTENT_EDITED = "content_edited"
    LINK_BROKEN = "link_broken"
    GAP = "gap"
    INSERTED = "inserted"
    HEAD_MISMATCH = "head_mismatch"


@dataclass(frozen=True)
class Problem:
    """What is wrong at one sequence number (as stored now)."""

    seq: int
    kind: ProblemKind
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.message}"


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None


@dataclass(frozen=True)
class _Link:
    """A row accepted into the chain: where it is stored, the seq its hash was written with,
    and the hash its successor must link to."""

    seq: int
    orig: int
    hash: str


#: ``written_as(seq, prev_hash=<the row's own>)``: was the row's hash written at that seq after
#: that hash?
WrittenAs = Callable[..., bool]


def _short(digest: str) -> str:
    return digest[:12] + "…"


class ChainWalk:
    """Feed rows in stored ``seq`` order, then ``finish``.

    ``head_seq``/``head_hash`` are the head as read before the rows; ``renumber_hint`` is
    ``head_seq`` minus the highest stored seq (rows deleted and the rest renumbered down by that
    much is one thing it helps to recognise).
    """

    def __init__(self, head_seq: int, head_hash: str, *, renumber_hint: int = 0) -> None:
        self.head_seq, self.head_hash = head_seq, head_hash
        self._hint = renumber_hint
        self.checked = 0
        self._problems: list[Problem] = []
        genesis = _Link(0, 0, GENESIS)
        self._recent: deque[_Link] = deque([genesis], maxlen=RECENT_LINKS)
        self._at_head: _Link | None = genesis if head_seq == 0 else None
        self._beyond_head: list[_Link] = []

    # -- the walk -------------------------------------------------------------------------

    def feed(self, row: dict[str, Any]) -> None:
        """One row: ``seq``, ``prev_hash``, ``hash`` and the hashed fields (``occurred_at`` as
        the chain's text)."""
        self.checked += 1
        seq: int = row["seq"]
        prev_hash: str = row["prev_hash"]
        stored: str = row["hash"]

        def written_as(orig: int, prev: str = prev_hash) -> bool:
            return event_hash(prev, {**row, "seq": orig}) == stored

        if seq < 1:
            self._report(
                seq, ProblemKind.INSERTED, "the chain starts at seq 1; nothing precedes it"
            )
            return
        last = self._recent[-1]
        if prev_hash == last.hash:
            orig = last.orig + 1
            if not written_as(orig):
                self._report(
                    seq, ProblemKind.CONTENT_EDITED, "its content no longer matches its hash"
                )
            elif seq - orig != last.seq - last.orig:
                self._report(
                    seq,
                    ProblemKind.CONTENT_EDITED,
                    f"its seq was changed: its hash was written at seq {orig}",
                )
        else:
            after_inserted = self._after_inserted_rows(seq, prev_hash, written_as)
            if after_inserted is not None:
                orig = after_inserted
            else:
                orig = self._broken_link(seq, prev_hash, last, written_as)
        self._accept(_Link(seq, orig, stored))

    def _broken_link(self, seq: int, prev_hash: str, last: _Link, written_as: WrittenAs) -> int:
        """``row`` links to a hash no recent row has: say which row is wrong; return the seq
        its hash was written with (or the one it should have had)."""
        orig = self._written_seq(seq, last, written_as)
        if orig is None:
            orig = last.orig + 1
            if written_as(orig, last.hash):
                self._report(
                    seq,
                    ProblemKind.LINK_BROKEN,
                    f"its prev_hash was changed to {_short(prev_hash)}; its hash shows it followed"
                    f" seq {last.seq} ({_short(last.hash)})",
                )
            else:
                self._report(
                    seq,
                    ProblemKind.CONTENT_EDITED,
                    f"its content no longer matches its hash, and it links to {_short(prev_hash)},"
                    f" not to seq {last.seq}'s hash {_short(last.hash)}",
                )
        elif orig > last.orig + 1:
            first, end = last.orig + 1, orig - 1
            missing = f"seq {first} is" if first == end else f"seqs {first}..{end} are"
            if orig == seq:
                how = f"seq {seq} follows seq {last.seq} but was written after seq {end}"
            else:
                how = (
                    f"the event now at seq {seq} was written as seq {orig}, after seq {end};"
                    " the later events were renumbered to close the gap"
                )
            self._report(
                last.seq + 1,
                ProblemKind.GAP,
                f"{missing} missing: {how}",
                {"missing_from": first, "missing_to": end},
            )
        elif orig == last.orig + 1 and last.orig > 0:
            self._report(
                last.seq,
                ProblemKind.CONTENT_EDITED,
                f"edited and its hash recomputed: it hashes to {_short(last.hash)}, but seq {seq}"
                f" was written after {_short(prev_hash)}",
                {"hash": last.hash, "next_links_to": prev_hash},
            )
        else:
            self._report(
                seq,
                ProblemKind.LINK_BROKEN,
                f"links to {_short(prev_hash)}, which is not seq {last.seq}'s hash"
                f" ({_short(last.hash)}); its hash was written at seq {orig}",
            )
        return orig

    def _written_seq(self, seq: int, last: _Link, written_as: WrittenAs) -> int | None:
        """The seq this row's hash was written with, among those a tamperer plausibly left."""
        candidates = [seq - (last.seq - last.orig), seq, last.orig + 1]
        if self._hint > 0:
            candidates.append(seq + self._hint)
        for distance in range(1, RENUMBER_SEARCH + 1):
            candidates += [seq + distance, seq - distance]
        seen: set[int] = set()
        for orig in candidates:
            if orig >= 1 and orig not in seen:
                seen.add(orig)
                if written_as(orig):
                    return orig
        return None

    def _after_inserted_rows(self, seq: int, prev_hash: str, written_as: WrittenAs) -> int | None:
        """If the row at ``seq`` links past the rows just before it to an earlier row, and
        those rows fill the seqs between exactly (squeezed in, the later rows renumbered up),
        they were inserted: drop them, report each, and return the seq this row was written
        with. None if that is not what happened."""
        recent = list(self._recent)
        for back, earlier in enumerate(reversed(recent[:-1]), start=1):
            if earlier.hash != prev_hash:
                continue
            squeezed = recent[-back:]
            if seq - earlier.seq - 1 != len(squeezed):
                return None
            if written_as(earlier.orig + 1):
                orig = earlier.orig + 1
            elif written_as(seq):  # renumbered and rehashed in place
                orig = seq
            else:
                return None
            for link in squeezed:
                self._recent.pop()
                self._report(
                    link.seq,
                    ProblemKind.INSERTED,
                    f"not part of the chain: seq {seq} links past it, to seq {earlier.seq}",
                )
                if link is self._at_head:
                    self._at_head = None
                if link in self._beyond_head:
                    self._beyond_head.remove(link)
            return orig
        return None

    def _accept(self, link: _Link) -> None:
        self._recent.append(link)
        if link.orig == self.head_seq:
            self._at_head = link
        elif link.orig > self.head_seq:
            self._beyond_head.append(link)

    def _report(
        self, seq: int, kind: ProblemKind, message: str, details: dict[str, Any] | None = None
    ) -> None:
        self._problems.append(Problem(seq, kind, message, details or {}))

    # -- the end of the chain -------------------------------------------------------------

    @property
    def needs_head_again(self) -> bool:
        """Rows beyond the head read at the start: read the head again before ``finish`` (they
        may be appends that committed while the walk ran)."""
        return bool(self._beyond_head)

    def finish(self, head_seq_now: int | None = None) -> VerifyReport:
        """Compare the chain's end with the head; ``head_seq_now`` is the head re-read after
        the walk (see ``needs_head_again``)."""
        last = self._recent[-1]
        at_head = self._at_head
        if at_head is None and last.orig < self.head_seq and last.hash == self.head_hash:
            # The head holds the chain's last hash under a later seq: its seq was changed (to
            # cover events inserted or removed), not events lost past the chain's end.
            self._report(
                self.head_seq,
                ProblemKind.HEAD_MISMATCH,
                f"the head says the chain ends at seq {self.head_seq}, but its hash is that of"
                f" the event written as seq {last.orig}: the head's seq was changed",
                {
                    "head_seq": self.head_seq,
                    "head_hash": self.head_hash,
                    "chain_seq": last.orig,
                    "chain_hash": last.hash,
                },
            )
        elif at_head is None and last.orig < self.head_seq:
            first = last.orig + 1
            self._report(
                last.seq + 1,
                ProblemKind.GAP,
                f"the head says the chain ends at seq {self.head_seq}, but it ends at seq"
                f" {last.orig}: seqs {first}..{self.head_seq} are missing",
                {"missing_from": first, "missing_to": self.head_seq},
            )
        elif at_head is not None and at_head.hash != self.head_hash:
            self._report(
                self.head_seq,
                ProblemKind.HEAD_MISMATCH,
                f"the head says seq {self.head_seq} has hash {self.head_hash}, but the chain's"
                f" seq {at_head.orig} has hash {at_head.hash}: the head was changed, or that"
                " event was edited and its hash recomputed",
                {
                    "head_seq": self.head_seq,
                    "head_hash": self.head_hash,
                    "chain_seq": at_head.orig,
                    "chain_hash": at_head.hash,
                },
            )
        covered = max(self.head_seq, head_seq_now or 0)
        uncovered = [link for link in self._beyond_head if link.orig > covered]
        if uncovered:
            self._report(
                uncovered[0].seq,
                ProblemKind.INSERTED,
                f"after the head (seq {covered}): {len(uncovered)} event(s) from here on are"
                " not covered by the head",
            )
        return VerifyReport(
            checked=self.checked, problems=sorted(self._problems, key=lambda p: p.seq)
        )
