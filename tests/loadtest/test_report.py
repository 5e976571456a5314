"""The report: exit codes, the JSON document, the summary, the chart, the progress line."""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
from pathlib import Path

from coupon_loadtest import chart, report, runner
from coupon_loadtest.clock import ClockOffset, iso_ms
from coupon_loadtest.herd import Final, UserBook
from coupon_loadtest.histogram import LatencyHistogram
from coupon_loadtest.progress import Progress, Snapshot, render
from coupon_loadtest.records import LOST, OK, Observations
from coupon_loadtest.runner import RunData
from coupon_loadtest.scenario import LoadConfig, Target
from coupon_loadtest.schedule import GeneratorVerdict, judge_generator
from coupon_loadtest.verify import Check, Verification, verify
from coupon_loadtest.worker import WorkerResult

from .fakes import CLOCK, NS_PER_S, SERVER_AHEAD_NS, T0, FakeServer, Faults, drive, starting_after

PASSED = Verification((Check("x", "I1", "api", True, "fine"),), {})
FAILED = Verification(
    (Check("no over-issue", "I1", "api", False, "too many", ("101 coupons for 100",)),), {}
)


def generator(*, kept_up: bool) -> GeneratorVerdict:
    return judge_generator(
        rate=1000.0,
        window_ns=NS_PER_S,
        due=1000,
        sent=1000 if kept_up else 10,
        lag_p99_ms=1.0,
        max_lag_ms=50.0,
        inflight_cap_waits=0,
    )


def test_a_clean_run_exits_zero() -> None:
    verdict = report.decide(PASSED, generator(kept_up=True), interrupted=False)

    assert (verdict.passed, verdict.exit_code) == (True, 0)


def test_a_violated_invariant_exits_one_whatever_else_happened() -> None:
    verdict = report.decide(FAILED, generator(kept_up=False), interrupted=True)

    assert verdict.exit_code == report.EXIT_VIOLATION
    assert verdict.reasons == ["api: no over-issue: too many (e.g. 101 coupons for 100)"]


def test_a_rate_that_was_not_offered_exits_three() -> None:
    verdict = report.decide(PASSED, generator(kept_up=False), interrupted=False)

    assert verdict.exit_code == report.EXIT_RATE_NOT_OFFERED
    assert "asked rate not offered" in verdict.reasons[0]


def test_an_interrupted_run_that_also_fell_behind_exits_130_saying_both() -> None:
    verdict = report.decide(PASSED, generator(kept_up=False), interrupted=True)

    assert (verdict.passed, verdict.exit_code) == (False, report.EXIT_INTERRUPTED)
    assert verdict.reasons[0] == "interrupted before the planned end"
    assert "asked rate not offered" in verdict.reasons[1]


def test_closed_loop_has_no_rate_to_miss() -> None:
    assert report.decide(PASSED, None, interrupted=False).exit_code == report.EXIT_OK


def test_a_run_that_sent_nothing_never_passes() -> None:
    verdict = report.decide(PASSED, None, interrupted=False, requests=0)

    assert (verdict.passed, verdict.exit_code) == (False, report.EXIT_RATE_NOT_OFFERED)
    assert "no request was sent" in verdict.reasons[0]
    assert report.decide(PASSED, None, interrupted=False, requests=1).passed


def config(**changes: object) -> LoadConfig:
    values: dict[str, object] = {
        "url": "http://127.0.0.1:8000",
        "coupons": 100,
        "users": 300,
        "start_in_s": 0.3,
        "campaign_id": None,
        "rate": 1000.0,
        "concurrency": None,
        "duration_s": None,
        "tail_s": 1.0,
        "max_duration_s": 60.0,
        "processes": 1,
        "json": False,
        "admin_token": "",
        "database_url": None,
        "report_path": "r.json",
        "chart_path": None,
        "quiet": True,
        "repeat_fraction": 0.2,
        "timeout_s": 5.0,
        "max_inflight": 100,
        "max_lag_ms": 50.0,
        "seed": 0,
        "name": "test",
    }
    values.update(changes)
    return LoadConfig(**values)  # type: ignore[arg-type]


def fake_run(faults: Faults | None = None) -> RunData:
    server = FakeServer(100, starting_after(0.3), faults or Faults())
    run = drive(server, users=300, requests=1200)
    obs = run.observations
    latency = LatencyHistogram()
    latency.record_many_ns(d - i for d, i in zip(obs.done_ns, obs.intended_ns, strict=True))
    result = WorkerResult(
        index=0,
        observations=obs,
        histograms={"success": latency.encode(), "send_lag": LatencyHistogram().encode()},
        due=1200,
        sent=1200,
        stop_rel_ns=round(1.2 * NS_PER_S),
        inflight_cap_waits=0,
        error_examples={"resource_exhausted": "sold out"},
    )
    return RunData(
        config=config(),
        target=Target(run.plan, CLOCK, created=True, name="test"),
        t0_wall_ns=T0,
        stop_rel_ns=result.stop_rel_ns,
        settled_rel_ns=None,
        results=[result],
        observations=obs,
        histograms={"success": latency, "send_lag": LatencyHistogram()},
        ledgers=[server.ledger()],
    )


def document(run: RunData) -> dict[str, object]:
    verification = verify(run.observations, run.target.plan, run.target.clock, run.ledgers)
    gen = report.generator_verdict(run)
    verdict = report.decide(verification, gen, interrupted=False)
    starts_rel = run.target.plan.starts_at_ns - SERVER_AHEAD_NS - T0
    timeline = chart.series(run.observations, starts_rel)
    return report.build(run, verification, gen, verdict, timeline, None)


def test_report_counts_every_outcome_and_gives_the_verdicts() -> None:
    doc = json.loads(json.dumps(document(fake_run())))

    assert doc["verdict"] == {"passed": True, "exit_code": 0, "reasons": []}
    assert doc["outcomes"]["ok_new"] == 100
    assert sum(doc["outcomes"].values()) == doc["throughput"]["requests"] == 1200
    assert doc["throughput"]["issued"] == 100
    assert doc["timeline"]["sold_out"] is True
    assert doc["latency_ms"]["success"]["count"] == 1200
    assert {"p50", "p90", "p99", "p99.9", "max"} <= set(doc["latency_ms"]["success"])
    assert doc["verification"]["passed"] is True
    assert doc["generator"]["kept_up"] is True


def test_the_timeline_is_in_the_servers_clock() -> None:
    # A load machine 10 s behind the server: every time of the timeline is shifted onto the
    # server's clock, the one starts_at and issued_at are in, so they compare as they read.
    run = fake_run()
    behind = ClockOffset(10 * NS_PER_S, NS_PER_S // 1000, "test")
    run = dataclasses.replace(run, target=dataclasses.replace(run.target, clock=behind))
    first_sold_out = report.first_sold_out_rel(run)
    assert first_sold_out is not None

    timeline = json.loads(json.dumps(document(run)))["timeline"]

    def server(rel_ns: int) -> str:
        return iso_ms(T0 + rel_ns + 10 * NS_PER_S)

    assert timeline["load_started_at"] == server(0)
    assert timeline["first_sold_out_answer_at"] == server(first_sold_out)
    assert timeline["load_stopped_at"] == server(run.stop_rel_ns)
    assert timeline["starts_at"] == iso_ms(run.target.plan.starts_at_ns)


def test_summary_names_each_failed_check() -> None:
    doc = document(fake_run(Faults(over_issue=3)))

    text = report.summary_text(doc)

    assert "FAIL api" in text
    assert "[I1] no over-issue" in text
    assert "FAILED (exit 1)" in text
    assert "103 coupons listed for a stock of 100" in text


def test_chart_marks_the_start_at_zero_and_is_written(tmp_path: Path) -> None:
    run = fake_run()
    starts_rel = run.target.plan.starts_at_ns - SERVER_AHEAD_NS - T0
    timeline = chart.series(run.observations, starts_rel)
    path = tmp_path / "chart.png"

    chart.draw(timeline, str(path), title="t", markers={"starts_at": 0.0})

    assert timeline.time_s[0] < 0 < timeline.time_s[-1]
    assert sum(timeline.rates["issued"]) * timeline.bucket_s == 100
    assert path.read_bytes().startswith(b"\x89PNG")


def snapshot() -> Snapshot:
    return Snapshot(
        elapsed_s=1.5,
        to_start_s=-0.5,
        sent=1500,
        issued=100,
        repeats=7,
        sold_out=300,
        not_open=1000,
        errors=2,
        lost=1,
        inflight=10,
        rate=1000.0,
        stock_left=0,
    )


def test_progress_line_shows_what_an_operator_watches() -> None:
    line = render(snapshot())

    for part in ("T+0.5s", "sent 1500 (1000/s)", "issued 100", "sold out 300", "errors 2"):
        assert part in line
    assert "stock left 0" in line


def test_progress_is_silent_when_not_on_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(stream)

    progress.update(snapshot())
    progress.close()

    assert not progress.live
    assert stream.getvalue() == ""


def herd_run() -> RunData:
    """The same run, as a herd of 300 whose users ended every way a user can."""
    run = fake_run()
    first = [round(i * NS_PER_S / 300) for i in range(300)]
    book = UserBook(first)
    for i in range(300):
        if i < 100:
            book.final[i], book.final_ns[i], book.presses[i] = Final.COUPON, first[i] + 5, 1
        elif i < 290:
            book.final[i], book.final_ns[i], book.presses[i] = Final.SOLD_OUT, first[i] + 9, 3
        else:
            book.gave_up[i], book.presses[i] = 1, 12
    run.config = config(herd=True, rate=None, patience_s=10.0)
    run.herd = book
    return run


def test_a_herds_report_accounts_for_every_user() -> None:
    run = herd_run()
    doc = json.loads(json.dumps(document(run)))

    crowd = doc["herd"]
    assert doc["scenario"]["load_model"] == "herd"
    # A burst's settings, which a herd does not read, are not reported as if it had.
    scenario = doc["scenario"]
    assert scenario["repeat_fraction"] is scenario["tail_s"] is None
    assert scenario["max_inflight_per_process"] is None
    assert doc["generator"]["kept_up"] is True  # every user's presses went out
    assert (crowd["users"], crowd["got_coupon"], crowd["got_sold_out"]) == (300, 100, 190)
    assert (crowd["gave_up"], crowd["unanswered"]) == (10, 0)
    assert crowd["gave_up_before_sending"] == 0
    assert abs(crowd["answered_within_patience"] - 290 / 300) < 1e-9
    assert crowd["retries_histogram"] == {"0": 100, "2": 190, "10+": 10}
    assert crowd["patience_s"] == 10.0

    text = report.summary_text(doc)

    assert "herd: 300 users, spread 1 s, patience 10 s" in text
    assert "final answers: coupon 100, sold out 190, error 0; gave up 10, unanswered 0" in text
    assert "answered within their patience: 96.7% of users" in text


def test_a_herds_chart_adds_the_share_of_users_answered(tmp_path: Path) -> None:
    run = herd_run()
    starts_rel = run.target.plan.starts_at_ns - SERVER_AHEAD_NS - T0
    timeline = chart.series(run.observations, starts_rel)
    path = tmp_path / "herd.png"
    assert run.herd is not None
    answers = [(t - starts_rel) / NS_PER_S for t in run.herd.final_ns if t >= 0]

    chart.draw(timeline, str(path), title="t", markers={}, answers_s=answers, crowd=300)

    assert sum(timeline.due_per_s) * timeline.bucket_s == len(run.observations)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_a_herd_that_gave_up_in_the_tools_queue_is_the_generators_failure() -> None:
    run = herd_run()
    assert run.herd is not None
    # Ten of the users who gave up never sent a request: their presses waited for one of
    # the tool's connections until their patience ran out.
    for i in range(290, 300):
        run.herd.presses[i] = 0
    run.results[0].inflight_cap_waits = 250
    doc = document(run)

    crowd = doc["herd"]
    assert isinstance(crowd, dict)
    assert (crowd["gave_up"], crowd["gave_up_before_sending"]) == (10, 10)
    generator = doc["generator"]
    assert isinstance(generator, dict) and generator["kept_up"] is False
    assert "10 of 300 users gave up before sending anything" in generator["message"]
    assert "raise --connections" in generator["message"]
    verdict = doc["verdict"]
    assert isinstance(verdict, dict) and verdict["exit_code"] == report.EXIT_RATE_NOT_OFFERED
    assert verdict["reasons"][0].startswith("crowd not offered as modelled: ")

    text = report.summary_text(json.loads(json.dumps(doc)))

    assert "generator FELL BEHIND" in text
    assert (
        "gave up before sending anything (waiting for one of the tool's connections): 10; "
        "presses that waited for a connection: 250" in text
    )


def test_goodput_counts_each_users_coupon_once_at_its_first_answer() -> None:
    obs = Observations("u-", T0)
    # User 1: issued at once. User 2: the first answer was lost, the retry returned the
    # coupon as already issued. User 3: issued, then asked again (already issued).
    for user, done, outcome, already in (
        (1, 100, OK, False),
        (2, 150, LOST, False),
        (2, 400, OK, True),
        (3, 200, OK, False),
        (3, 900, OK, True),
    ):
        row = obs.record(user, 0, 0, done, outcome)
        if outcome == OK:
            obs.record_success(row, f"C{user}", 0, already_issued=already)

    assert report.first_coupon_answers(obs) == [100, 200, 400]


def test_a_dead_workers_traceback_is_kept() -> None:
    parent, child = multiprocessing.Pipe()
    child.send(("error", 1, "Traceback (most recent call last):\nValueError: boom\n"))
    child.close()

    words = runner._last_words(parent, 0)

    assert "ValueError: boom" in words and "Traceback" in words
    quiet, _ = multiprocessing.Pipe()
    assert runner._last_words(quiet, -9) == "exited with code -9"
