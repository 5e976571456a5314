"""Refusals answered from memory: after a campaign sells out (or before it starts, or after
it ends) a process answers the same refusal again for a short while without asking the gate,
so the crowd that keeps pressing costs no Redis round trip. Never to a holder: a user who
holds a coupon always gets it back.

Why this is safe:
* Not started: remembered no later than the start, by the gate's own clock.
* Sold out: holders change only through admissions, and an admission after a sell-out needs
  a slot given back. Given-back slots become issuable only after a delay longer than any
  process remembers a sell-out (the gate's reissue delay), and a memory never outlives the
  earliest given-back slot it was told of. So while a memory holds, nobody new is admitted.
* Holders: the users who hold a coupon, read from the ledger and the gate's pending
  admissions after the gate reported its version; the memory answers only while the gate
  still reports that version (any admission, rebuild or restored holder moves it on). A
  user the filter cannot rule out goes to the gate, and a refusal is then checked against
  the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from coupon.application.ports import Admission, AdmissionKind, CouponLedger, GateView, StockGate
from coupon.domain.errors import CampaignEnded, CampaignNotStarted, CouponError, SoldOut

log = logging.getLogger("coupon")

_REFUSALS = (AdmissionKind.SOLD_OUT, AdmissionKind.ENDED, AdmissionKind.NOT_STARTED)


class HolderFilter:
    """A Bloom filter of a campaign's holders: two bytes a holder, no false negatives (a
    holder is always "maybe"), about 1 % false positives (those users ask the gate).

    Keyed by this process's string hash, so it is only meaningful inside the process."""

    BITS_PER_HOLDER = 16
    MIN_BITS = 1 << 16

    __slots__ = ("_bits", "_mask", "version")

    def __init__(self, version: tuple[str, int], capacity: int) -> None:
        size = self.MIN_BITS
        while size < capacity * self.BITS_PER_HOLDER:
            size <<= 1
        self._mask = size - 1
        self._bits = bytearray(size >> 3)
        self.version = version

    def add(self, user_ids: Iterable[str]) -> None:
        bits, mask = self._bits, self._mask
        for user in user_ids:
            h = hash(user)
            step = (h >> 32) | 1
            for probe in (h, h + step, h + 2 * step):
                i = probe & mask
                bits[i >> 3] |= 1 << (i & 7)

    def may_hold(self, user_id: str) -> bool:
        bits, mask = self._bits, self._mask
        h = hash(user_id)
        step = (h >> 32) | 1
        for probe in (h, h + step, h + 2 * step):
            i = probe & mask
            if not bits[i >> 3] & (1 << (i & 7)):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Remembered:
    kind: AdmissionKind
    view: GateView
    total_coupons: int
    until: float  # time.monotonic()
    # From then on, one request at a time asks the gate again while the others are still
    # answered from memory: its answer renews the memory before it ends, so that the crowd
    # does not reach the gate all at once whenever a memory ends.
    refresh_at: float

    def error(self) -> CouponError:
        return refusal(self.kind, self.view, self.total_coupons)


def refusal(kind: AdmissionKind, view: GateView, total_coupons: int) -> CouponError:
    """The error a refusal of the gate answers with."""
    if kind is AdmissionKind.SOLD_OUT:
        return SoldOut(total_coupons)
    if kind is AdmissionKind.NOT_STARTED:
        return CampaignNotStarted(view.starts_at)
    assert view.ends_at is not None
    return CampaignEnded(view.ends_at)


class RefusalMemory:
    """One per process. `recall` is synchronous and does no I/O: a remembered refusal can be
    answered without creating a task."""

    MAX_CAMPAIGNS = 1024
    # For the second half of a memory's time one request at a time asks the gate again (in
    # a loaded process its answer may take a while), the next REFRESH_RETRY seconds after
    # the last, until one renews it.
    REFRESH_AHEAD = 0.5
    REFRESH_RETRY = 0.05

    def __init__(
        self,
        ledger: CouponLedger,
        gate: StockGate,
        *,
        seconds: float = 0.5,
        max_holders: int = 2_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._gate = gate
        self._seconds = seconds
        self._max_holders = max_holders
        self._clock = clock
        self._remembered: dict[str, Remembered] = {}
        self._filters: dict[str, HolderFilter | None] = {}  # None: too many holders
        self._building: dict[str, asyncio.Task[None]] = {}

    @property
    def seconds(self) -> float:
        return self._seconds

    def now(self) -> float:
        """The clock memories are timed by (time.monotonic unless a test gives another)."""
        return self._clock()

    def recall(self, campaign_id: str, user_id: str) -> Remembered | None:
        """The refusal this user would get from the gate now, if the process knows it."""
        entry = self._remembered.get(campaign_id)
        if entry is None:
            return None
        now = self._clock()
        if entry.until <= now:
            del self._remembered[campaign_id]
            return None
        if now >= entry.refresh_at:
            # This one asks the gate; if its answer has not renewed the memory by then (it
            # was turned away, or is slow), another asks a little later.
            self._remembered[campaign_id] = replace(entry, refresh_at=now + self.REFRESH_RETRY)
            return None
        if entry.kind is AdmissionKind.NOT_STARTED:
            return entry
        holders = self._filters.get(campaign_id)
        if holders is None or holders.version != entry.view.version or holders.may_hold(user_id):
            return None
        return entry

    def surely_not_holder(self, campaign_id: str, user_id: str, version: tuple[str, int]) -> bool:
        """True when the user holds no coupon as of the gate's `version`; False when that is
        not known here (ask the ledger)."""
        holders = self._filters.get(campaign_id)
        return holders is not None and holders.version == version and not holders.may_hold(user_id)

    def learn(
        self, campaign_id: str, admission: Admission, total_coupons: int, asked_at: float
    ) -> None:
        """The gate refused a request this process sent at `asked_at` (its monotonic clock)."""
        kind, view = admission.kind, admission.view
        if kind not in _REFUSALS or view is None or self._seconds <= 0:
            return
        seconds = self._seconds
        edge = view.starts_at if kind is AdmissionKind.NOT_STARTED else view.reopens_at
        if edge is not None:
            # Counted from before the request was sent, when the gate's clock had not yet
            # reached admission.now: this ends no later than the edge itself.
            seconds = min(seconds, (edge - admission.now).total_seconds())
        if seconds <= 0:
            return
        if len(self._remembered) >= self.MAX_CAMPAIGNS and campaign_id not in self._remembered:
            self._remembered.clear()
        self._remembered[campaign_id] = Remembered(
            kind,
            view,
            total_coupons,
            until=asked_at + seconds,
            refresh_at=asked_at + seconds * (1 - self.REFRESH_AHEAD),
        )
        if kind is not AdmissionKind.NOT_STARTED:
            self._want_holders(campaign_id, view.version, total_coupons)

    def forget(self, campaign_id: str) -> None:
        self._remembered.pop(campaign_id, None)

    def _want_holders(self, campaign_id: str, version: tuple[str, int], total: int) -> None:
        if campaign_id in self._building:
            return  # when it ends, the next refusal asks again if the version moved on
        if campaign_id in self._filters:
            known = self._filters[campaign_id]
            if known is None or known.version == version:
                return
        if total > self._max_holders:
            self._filters[campaign_id] = None
            return
        if len(self._filters) >= self.MAX_CAMPAIGNS:
            self._filters.clear()
        task = asyncio.get_running_loop().create_task(self._build(campaign_id, version, total))
        self._building[campaign_id] = task
        task.add_done_callback(lambda _: self._building.pop(campaign_id, None))

    async def _build(self, campaign_id: str, version: tuple[str, int], total: int) -> None:
        """Read after the gate reported `version`: every holder at that version is pending
        in the gate or committed in the ledger (a confirm follows the commit)."""
        try:
            holders = HolderFilter(version, total)
            holders.add(await self._gate.pending_users(campaign_id))
            async with contextlib.aclosing(self._ledger.holders(campaign_id)) as chunks:
                async for chunk in chunks:
                    holders.add(chunk)
        except Exception as exc:  # noqa: BLE001 - the refusals keep asking the ledger meanwhile
            log.warning(
                "could not read the holders of a campaign",
                extra={"campaign_id": campaign_id, "error": str(exc)},
            )
            return
        self._filters[campaign_id] = holders

    async def close(self) -> None:
        building = list(self._building.values())
        for task in building:
            task.cancel()
        for task in building:
            with contextlib.suppress(asyncio.CancelledError):
                await task
