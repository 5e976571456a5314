"""IssueCoupon: admit in the gate, record durably, then answer; give the slot back on
failure. The gate's answer decides the next step; each step either answers or sends the
request round again, within budgets that bound how often and how long."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from coupon.application.ports import (
    Admission,
    AdmissionKind,
    CodeGenerator,
    ConstraintViolation,
    CouponLedger,
    Handoff,
    Recorded,
    RecordOutcome,
    StockGate,
)
from coupon.application.refusals import RefusalMemory, Remembered, refusal
from coupon.application.use_cases import CampaignDirectory
from coupon.domain.coupon import Coupon, validate_campaign_id, validate_user_id
from coupon.domain.errors import CampaignEnded, CouponError, Overloaded, Unavailable

log = logging.getLogger("coupon")


@dataclass(slots=True)  # not frozen, as Admission: built per request
class Issued:
    coupon: Coupon
    already_issued: bool


class _Budget:
    """How often, and until when, one request may go round again."""

    __slots__ = ("deadline", "holder_wait_until", "rebuilds", "retries", "settles")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        # The gate or the ledger sent the admission back (slot taken, gate out of date).
        self.retries = IssueCoupon.RETRIES
        # Stranded admissions settled for the gate (a budget of its own, so a long backlog
        # is worked through).
        self.settles = IssueCoupon.SETTLES
        self.rebuilds = IssueCoupon.REBUILDS
        self.holder_wait_until = 0.0

    def retry(self) -> None:
        self.retries -= 1
        if self.retries <= 0:
            raise Unavailable("could not settle this request; retry")

    def settle(self) -> bool:
        self.settles -= 1
        return self.settles >= 0

    def rebuild(self) -> None:
        self.rebuilds -= 1
        if self.rebuilds < 0:
            raise Unavailable("the campaign's gate could not be rebuilt; retry")

    def wait_for_holder(self) -> float:
        """Seconds to wait before asking again for a user whose earlier request is still
        being recorded; Unavailable once that has taken too long."""
        now = time.monotonic()
        if not self.holder_wait_until:
            self.holder_wait_until = now + IssueCoupon.HOLDER_WAIT_SECONDS
        if now > self.holder_wait_until or (self.deadline and now > self.deadline):
            raise Unavailable("an earlier request of this user is still being recorded; retry")
        return 0.02


class Pending:
    """A request on its way through IssueCoupon.begin: `outcome` settles with its answer,
    and `when_settled`'s step, if any, runs as it settles (no turn of the loop between)."""

    __slots__ = ("asked_at", "campaign_id", "deadline", "outcome", "then", "user_id", "waiting_on")

    def __init__(self, outcome: asyncio.Future[Issued], deadline: float) -> None:
        self.outcome = outcome
        self.campaign_id = ""
        self.user_id = ""
        # The common course goes round no budget: one is made when the steps take over.
        self.deadline = deadline
        self.asked_at = 0.0
        # The gate's decision, the ledger's commit or the task of the other steps.
        self.waiting_on: asyncio.Future[Any] | Handoff[Any] | None = None
        self.then: Callable[[Pending], object] | None = None

    def when_settled(self, then: Callable[[Pending], object]) -> None:
        """Call `then(self)` once `outcome` is settled (at once when it is already): right
        as it settles, or on the loop's next turn when it is cancelled (`cancel`). The
        outcome is settled, or cancelled, only through this object's methods then."""
        if self.outcome.done():
            then(self)
        else:
            self.then = then

    def cancel(self, msg: object = None) -> bool:
        """The caller left (a server's shutdown cancels it as it cancels its tasks): what
        the request waits on is cancelled, as when a caller of `execute` is (an admission
        still waiting gives its slot back; a commit under way goes on, and the lease
        settles it)."""
        cancelled = self.outcome.cancel(msg)
        if self.waiting_on is not None:
            self.waiting_on.cancel()
        then = self.then
        if cancelled and then is not None:
            # Not from here: a caller cancelling many (a server's tasks) iterates over them.
            self.then = None
            self.outcome.get_loop().call_soon(then, self)
        return cancelled

    def succeed(self, issued: Issued) -> None:
        if not self.outcome.done():
            self.outcome.set_result(issued)
            self._settled()

    def fail(self, error: BaseException) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(error)
            self._settled()

    def _settled(self) -> None:
        then = self.then
        if then is not None:
            self.then = None
            then(self)

    async def settled(self) -> asyncio.Future[Issued]:
        """`outcome` once settled, for a front door to answer from (its result, error or
        cancellation). A caller cancelled meanwhile cancels the request (`cancel`): the
        outcome it returns is then cancelled too, unless it had settled already."""
        try:
            await self.outcome
        except asyncio.CancelledError:
            self.cancel()
        except Exception:  # noqa: BLE001 - the outcome holds it, for the caller to answer
            pass
        return self.outcome

    def go_on(self, steps: Coroutine[Any, Any, Issued]) -> None:
        """The rest of the request in a task, whose end settles `outcome`."""
        if self.outcome.done():  # its caller left
            steps.close()
            return
        task = asyncio.ensure_future(steps)
        self.waiting_on = task
        task.add_done_callback(self._went_on)

    def _went_on(self, task: asyncio.Future[Issued]) -> None:
        self.waiting_on = None
        if task.cancelled():
            self.cancel()
            return
        error = task.exception()  # retrieved, whether or not anyone still waits
        if error is not None:
            self.fail(error)
        else:
            self.succeed(task.result())


_Step = Callable[["IssueCoupon", str, str, Admission, _Budget, float], Awaitable["Issued | None"]]


class IssueCoupon:
    HOLDER_WAIT_SECONDS = 3.0
    RETRIES = 8
    SETTLES = 200
    REBUILDS = 3

    def __init__(
        self,
        gate: StockGate,
        ledger: CouponLedger,
        codes: CodeGenerator,
        directory: CampaignDirectory,
        memory: RefusalMemory,
    ) -> None:
        self._gate = gate
        self._ledger = ledger
        self._codes = codes
        self._directory = directory
        self._memory = memory
        self._rebuilding: dict[str, asyncio.Task[None]] = {}
        # Slots given back for callers that left after admission (see begin).
        self._background: set[asyncio.Future[None]] = set()
        # Looked up once: on Python 3.11 asyncio.get_running_loop() is a system call.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settling: dict[str, asyncio.Lock] = {}

    def remembered(self, campaign_id: str, user_id: str) -> Remembered | None:
        """Without I/O: the refusal this process remembers for the request, or None when
        only the gate can tell. Raises InvalidArgument for a bad field."""
        return self._memory.recall(validate_campaign_id(campaign_id), validate_user_id(user_id))

    async def execute(
        self, *, campaign_id: str, user_id: str, deadline: float = 0.0, recalled: bool = False
    ) -> Issued:
        """`deadline` (time.monotonic(), 0: none): a request not yet admitted by then is
        answered Overloaded rather than worked on. Once admitted, it runs to its end.
        `recalled`: the caller asked `remembered` already and was sent to the gate (asking
        again could answer from memory the one request meant to renew it)."""
        if not recalled:
            entry = self._memory.recall(
                validate_campaign_id(campaign_id), validate_user_id(user_id)
            )
            if entry is not None:
                raise entry.error()
        pending = self.begin(campaign_id, user_id, deadline)
        try:
            return await pending.outcome
        except asyncio.CancelledError:
            pending.cancel()
            raise

    def begin(self, campaign_id: str, user_id: str, deadline: float = 0.0) -> Pending:
        """`execute` for a request that `remembered` sent to the gate, without waiting: the
        returned Pending's `outcome` settles as `execute` would return or raise. The common
        course (admitted, a code at hand, recorded) runs on the gate's and the ledger's
        futures, with no task and no coroutine per step; any other goes on in a task,
        through the same steps as every request."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        pending = Pending(loop.create_future(), deadline)
        try:
            pending.campaign_id = campaign_id = validate_campaign_id(campaign_id)
            pending.user_id = validate_user_id(user_id)
        except CouponError as exc:
            pending.outcome.set_exception(exc)
            return pending
        pending.asked_at = self._memory.now()
        if deadline and time.monotonic() > deadline:
            pending.outcome.set_exception(Overloaded("waited too long to be served; retry"))
            return pending
        # A caller that leaves cancels the handoff: the gate gives the slot back.
        decision = pending.waiting_on = Handoff(partial(self._admission_decided, pending))
        self._gate.admit_soon(campaign_id, pending.user_id, deadline, decision)
        return pending

    def _admission_decided(self, pending: Pending, admission: Admission | BaseException) -> None:
        pending.waiting_on = None
        if isinstance(admission, BaseException):
            pending.fail(admission)
            return
        if admission.kind is AdmissionKind.ADMITTED:
            if pending.outcome.done():
                # Its caller left once the gate had decided: nobody records it.
                self._spawn(
                    self._release_quietly(pending.campaign_id, pending.user_id, admission.slot)
                )
                return
            if self._start_recording(pending, admission):
                return
        pending.go_on(
            self._steps(
                pending.campaign_id,
                pending.user_id,
                _Budget(pending.deadline),
                admission,
                pending.asked_at,
            )
        )

    def _start_recording(self, pending: Pending, admission: Admission) -> bool:
        """Record the admitted request on the ledger's future, with a code at hand. False:
        no code at hand, or a failure, which the steps then meet again and answer."""
        try:
            code = self._codes.code_now()
            if code is None:
                return False
            self._memory.forget(pending.campaign_id)
            coupon = Coupon(
                code=code,
                campaign_id=pending.campaign_id,
                user_id=pending.user_id,
                issued_at=admission.now,
                slot=admission.slot,
            )
            # A caller that leaves cancels the handoff: the commit goes on, and the lease
            # settles the admission (see _recorded).
            recording = pending.waiting_on = Handoff(
                partial(self._coupon_recorded, pending, coupon)
            )
            self._ledger.record_soon(coupon, recording)
        except Exception:  # noqa: BLE001 - answered by the steps (see above)
            pending.waiting_on = None
            return False
        return True

    def _coupon_recorded(
        self, pending: Pending, coupon: Coupon, recorded: Recorded | BaseException
    ) -> None:
        pending.waiting_on = None
        if type(recorded) is Recorded and recorded.outcome is RecordOutcome.RECORDED:
            try:
                self._gate.confirm(coupon)
            except Exception as exc:  # noqa: BLE001 - answered as the steps would answer it
                pending.fail(exc)
                return
            pending.succeed(Issued(coupon, already_issued=False))
            return
        pending.go_on(self._after_recording(pending, coupon, recorded))

    async def _after_recording(
        self, pending: Pending, coupon: Coupon, recorded: Recorded | BaseException
    ) -> Issued:
        issued = await self._recorded(coupon, _known(recorded))
        if issued is not None:
            return issued
        budget = _Budget(pending.deadline)
        budget.retry()
        return await self._steps(coupon.campaign_id, coupon.user_id, budget, None, 0.0)

    async def _steps(
        self,
        campaign_id: str,
        user_id: str,
        budget: _Budget,
        admission: Admission | None,
        asked_at: float,
    ) -> Issued:
        """From `admission` on (None: ask the gate first), one step per answer of the gate
        until one answers the request."""
        deadline = budget.deadline
        while True:
            if admission is None:
                asked_at = self._memory.now()
                if deadline and time.monotonic() > deadline:
                    raise Overloaded("waited too long to be served; retry")
                admission = await self._gate.admit(campaign_id, user_id, deadline)
            step = _STEPS[admission.kind]
            issued = await step(self, campaign_id, user_id, admission, budget, asked_at)
            if issued is not None:
                return issued
            admission = None

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- one step per kind of admission -------------------------------------------------

    async def _admitted(
        self, campaign_id: str, user_id: str, admission: Admission, budget: _Budget, _: float
    ) -> Issued | None:
        self._memory.forget(campaign_id)
        issued = await self._record(campaign_id, user_id, admission.now, admission.slot)
        if issued is None:
            budget.retry()
        return issued

    async def _already_held(
        self, campaign_id: str, user_id: str, admission: Admission, budget: _Budget, _: float
    ) -> Issued | None:
        if admission.held is not None:
            return Issued(admission.held, already_issued=True)
        existing = await self._ledger.find_by_user(campaign_id, user_id)
        if existing is not None:
            self._gate.confirm(existing)
            return Issued(existing, already_issued=True)
        if admission.stale and budget.settle():
            await self._settle(campaign_id, admission.stale)
        elif not admission.pending:
            # The gate says committed but the ledger has nothing: the gate is wrong.
            await self._gate.release(campaign_id, user_id, admission.slot)
            budget.retry()
        else:
            # A request of this user is being recorded right now: wait for it.
            await asyncio.sleep(budget.wait_for_holder())
        return None

    async def _not_loaded(
        self, campaign_id: str, _user: str, _a: Admission, budget: _Budget, _: float
    ) -> Issued | None:
        budget.rebuild()
        await self._rebuild(campaign_id, budget.deadline)
        return None

    async def _sold_out(
        self, campaign_id: str, user_id: str, admission: Admission, budget: _Budget, asked_at: float
    ) -> Issued | None:
        # Stranded admissions may hide behind the reported ones: keep settling while there
        # are any.
        if admission.stale and budget.settle():
            await self._settle(campaign_id, admission.stale)
            return None
        return await self._refuse(campaign_id, user_id, admission, asked_at)

    async def _refuse(
        self, campaign_id: str, user_id: str, admission: Admission, asked_at: float
    ) -> Issued | None:
        """Not started, sold out or ended: a refusal, except to a holder the gate does not
        know (it lost state, or was restored from an older copy): the ledger decides."""
        view = admission.view
        assert view is not None
        if admission.kind is AdmissionKind.SOLD_OUT and view.reopens_at is not None:
            # Not final: slots given back become issuable again in a moment, or admissions
            # stuck pending may be given back once their lease runs out.
            wait = (view.reopens_at - admission.now).total_seconds()
            raise Unavailable(
                "every coupon is taken right now, but some may come back; retry",
                retry_after_ms=max(1, int(wait * 1000) + 1),
            )
        if admission.kind is not AdmissionKind.NOT_STARTED and not self._memory.surely_not_holder(
            campaign_id, user_id, view.version
        ):
            coupon = await self._ledger.find_by_user(campaign_id, user_id)
            if coupon is not None:
                self._gate.confirm(coupon)  # puts the holder back into the gate
                return Issued(coupon, already_issued=True)
        total = (await self._directory.require(campaign_id)).total_coupons
        self._memory.learn(campaign_id, admission, total, asked_at)
        raise refusal(admission.kind, view, total)

    async def _decided_refusal(
        self, campaign_id: str, user_id: str, admission: Admission, _: _Budget, asked_at: float
    ) -> Issued | None:
        return await self._refuse(campaign_id, user_id, admission, asked_at)

    # --- the work behind the steps ------------------------------------------------------

    async def _record(
        self, campaign_id: str, user_id: str, now: datetime, slot: int
    ) -> Issued | None:
        try:
            code = await self._codes.next_code()
            coupon = Coupon(
                code=code, campaign_id=campaign_id, user_id=user_id, issued_at=now, slot=slot
            )
        except BaseException:
            await self._release_quietly(campaign_id, user_id, slot)
            raise
        return await self._recorded(coupon, self._ledger.record(coupon))

    async def _recorded(self, coupon: Coupon, recording: Awaitable[Recorded]) -> Issued | None:
        """What the ledger's answer to `coupon` means for the request (None: go round
        again)."""
        campaign_id, user_id, slot = coupon.campaign_id, coupon.user_id, coupon.slot
        try:
            recorded = await recording
        except asyncio.CancelledError:
            # The caller left while its coupon was being committed. The row may still commit
            # with its batch: the admission stays pending, and the lease settles it against
            # the ledger (the user's retry gets the coupon, or the slot comes back).
            raise
        except ConstraintViolation as exc:
            # PostgreSQL refused what the gate admitted (a gate out of date: rebuilt from a
            # stale read, restored from a copy older than the kill switch, or ended
            # meanwhile). Nothing was recorded.
            await self._release_quietly(campaign_id, user_id, slot)
            ended = await self._recorded_end(campaign_id, coupon.issued_at)
            if ended is not None:
                raise CampaignEnded(ended) from exc
            raise Unavailable("the ledger refused the coupon; retry", detail=str(exc)) from exc
        except BaseException:
            # I6: nothing was recorded (or we cannot know; then the lease settles it).
            await self._release_quietly(campaign_id, user_id, slot)
            raise
        outcome = recorded.outcome
        if outcome is RecordOutcome.RECORDED:
            self._gate.confirm(coupon)
            return Issued(coupon, already_issued=False)
        if outcome is RecordOutcome.USER_HAS_COUPON:
            assert recorded.existing is not None
            await self._gate.release(campaign_id, user_id, slot)
            self._gate.confirm(recorded.existing)  # the holder the gate had lost
            return Issued(recorded.existing, already_issued=True)
        if outcome is RecordOutcome.SLOT_TAKEN:
            await self._gate.forget(campaign_id, user_id, slot)
            return None
        await self._gate.release(campaign_id, user_id, slot)
        return None

    async def _recorded_end(self, campaign_id: str, issued_at: datetime) -> datetime | None:
        """The campaign's end as PostgreSQL has it, when the coupon came at or after it;
        the gate is told a recorded kill switch again, so that it stops admitting (a gate
        that does not know the end would otherwise admit every newcomer, each refused by
        the ledger, until an operator ended the campaign again)."""
        try:
            campaign = await self._directory.fresh(campaign_id)
            if campaign.ended_at is not None:
                await self._gate.end(campaign_id, campaign.ended_at)
        except CouponError:
            return None
        end = campaign.effective_end
        return end if end is not None and end <= issued_at else None

    async def _release_quietly(self, campaign_id: str, user_id: str, slot: int) -> None:
        try:
            await self._gate.release(campaign_id, user_id, slot)
        except Unavailable:
            log.warning(
                "slot release failed; the lease will return it",
                extra={"campaign_id": campaign_id, "slot": slot},
            )

    async def _settle(self, campaign_id: str, stale: Sequence[tuple[str, int]]) -> None:
        """Settle admissions whose requests vanished (I6): confirm those the ledger holds,
        give the others' slots back. One settle per campaign at a time in this process;
        requests arriving meanwhile wait for it and then look again."""
        lock = self._settling.setdefault(campaign_id, asyncio.Lock())
        if lock.locked():
            async with lock:
                return
        async with lock:
            found = await asyncio.gather(
                *(self._ledger.find_by_user(campaign_id, user_id) for user_id, _ in stale)
            )
            for (user_id, slot), coupon in zip(stale, found, strict=True):
                if coupon is not None:
                    self._gate.confirm(coupon)
                else:
                    await self._gate.release(campaign_id, user_id, slot)

    async def _rebuild(self, campaign_id: str, deadline: float) -> None:
        """Rebuild the gate from the ledger, once per process however many requests ask. The
        rebuild is the process's own task: a request that stops waiting (its deadline) does
        not stop it."""
        task = self._rebuilding.get(campaign_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(campaign_id))
            self._rebuilding[campaign_id] = task
            task.add_done_callback(lambda done: self._rebuilt(campaign_id, done))
        timeout = None if not deadline else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise Overloaded("the campaign's gate is being rebuilt; retry") from None

    async def _load(self, campaign_id: str) -> None:
        campaign = await self._directory.fresh(campaign_id)
        # Closed here, whatever the load does: a load that fails halfway (Redis refused a
        # write) would otherwise leave the read suspended, its pooled connection idle in a
        # transaction for good.
        async with contextlib.aclosing(self._ledger.holdings(campaign_id)) as holdings:
            await self._gate.load(campaign, holdings)

    def _rebuilt(self, campaign_id: str, task: asyncio.Task[None]) -> None:
        self._rebuilding.pop(campaign_id, None)
        if not task.cancelled():
            task.exception()  # retrieved: the waiters got it, nobody else must

    async def close(self) -> None:
        """Stop rebuilds still running (shutdown); the next process redoes them."""
        tasks = list(self._rebuilding.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def _known(outcome: Recorded | BaseException) -> Recorded:
    """A commit's outcome, known already, as the awaitable `_recorded` takes."""
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


_STEPS: dict[AdmissionKind, _Step] = {
    AdmissionKind.ADMITTED: IssueCoupon._admitted,
    AdmissionKind.ALREADY_HELD: IssueCoupon._already_held,
    AdmissionKind.NOT_LOADED: IssueCoupon._not_loaded,
    AdmissionKind.SOLD_OUT: IssueCoupon._sold_out,
    AdmissionKind.ENDED: IssueCoupon._decided_refusal,
    AdmissionKind.NOT_STARTED: IssueCoupon._decided_refusal,
}
