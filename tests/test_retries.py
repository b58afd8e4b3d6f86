"""When failed jobs run again by themselves, and the retry requests the CLI leaves for the daemon."""

from __future__ import annotations

from pathlib import Path

from samwatch.cli.main import main
from samwatch.control.ledger import JobRow
from samwatch.control.retries import RetrySchedule, cured_by_change, cured_by_weights
from samwatch.control.retry_requests import RetryRequest, take_retry_requests


def row(job_id: str, error: str | None, attempts: int = 1, state: str = "failed") -> JobRow:
    return JobRow(job_id, f"{job_id}.yaml", f"{job_id}.png", "sha", "v1", state, 0, "", attempts, error)


def test_transient_failures_back_off_and_give_up() -> None:
    now = [100.0]
    schedule = RetrySchedule(base_seconds=10, max_attempts=3, clock=lambda: now[0])
    failed = [row("a", "weights_download_failed"), row("b", "sidecar_invalid"), row("c", "io_error", attempts=4)]
    assert schedule.due(failed) == []  # first seen now: wait 10 s
    now[0] += 10
    assert [r.job_id for r in schedule.due(failed)] == ["a"]  # c used up its attempts, b is not transient
    again = [row("a", "weights_download_failed", attempts=2)]
    assert schedule.due(again) == [] and schedule.next_retry_in(again[0]) == 20
    now[0] += 20
    assert [r.job_id for r in schedule.due(again)] == ["a"]
    assert schedule.delay(3) == 40 and schedule.delay(4) is None


def test_what_a_change_cures() -> None:
    failed = [row("w", "unknown_weights"), row("d", "weights_download_failed"), row("s", "sidecar_invalid")]
    assert [r.job_id for r in cured_by_change(failed)] == ["w", "d"]
    assert [r.job_id for r in cured_by_weights(failed)] == ["d"]


def test_retry_cli_leaves_requests_the_daemon_takes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inbox" / "exp1").mkdir(parents=True)
    (tmp_path / "inbox" / "exp1" / "a.yaml").write_text("{}")
    assert main(["retry", "inbox/exp1/a.yaml", "--failed"]) == 0
    assert main(["retry", "--outbox", str(tmp_path / "outbox"), "exp2"]) == 0
    assert main(["retry"]) == 2 and main(["retry", "/etc/passwd"]) == 2
    state = tmp_path / "outbox" / "_samwatch"
    first, second = take_retry_requests(state)
    assert first == RetryRequest(("exp1/a.yaml",), True) and second == RetryRequest(("exp2",), False)
    assert take_retry_requests(state) == []
    assert second.matches(row("exp2/b", None, state="done")) and not second.matches(row("exp20/b", None))
    assert first.matches(row("other", "io_error")) and first.matches(row("exp1/a", None, state="done"))
