"""FiniteGuard: a device-side finiteness flag read every k steps, agreed across ranks."""

from __future__ import annotations

import threading

import pytest
import torch

from bundleflow.errors import BundleflowError
from bundleflow.train.health import FiniteGuard


def _params(bad: bool = False) -> list[torch.Tensor]:
    w = torch.ones(3, 2)
    if bad:
        w[1, 1] = float("inf")
    return [w, torch.zeros(4)]


def test_finite_steps_pass_and_record_the_last_good_step():
    guard = FiniteGuard("cpu")
    for step in range(1, 11):
        guard.update(torch.tensor(1.5), _params())
        if step % 5 == 0:
            guard.check(step)
    assert guard.last_good_step == 10


@pytest.mark.parametrize("what", ["loss nan", "loss inf", "parameter inf"])
def test_first_failed_check_names_its_window_and_the_checkpoint(what):
    guard = FiniteGuard("cpu")
    for step in range(1, 21):
        loss = torch.tensor(2.0)
        bad_param = False
        if step == 13:
            if what == "loss nan":
                loss = torch.tensor(float("nan"))
            elif what == "loss inf":
                loss = torch.tensor(float("-inf"))
            else:
                bad_param = True
        guard.update(loss, _params(bad_param))
        if step % 5 == 0:
            if step < 15:
                guard.check(step, last_good="runs/x/checkpoints/step-000000010")
                continue
            with pytest.raises(BundleflowError) as err:
                guard.check(step, last_good="runs/x/checkpoints/step-000000010")
            message = str(err.value)
            assert "between step 10 and step 15" in message
            assert "runs/x/checkpoints/step-000000010" in message
            assert "stage2.lr" in message and "\n" not in message
            return
    raise AssertionError("never raised")


def test_flag_stays_bad_until_reset():
    guard = FiniteGuard("cpu")
    guard.update(torch.tensor(float("nan")))
    guard.update(torch.tensor(1.0))  # a later good step does not clear it
    assert not guard.ok()
    guard.reset()
    guard.update(torch.tensor(1.0))
    assert guard.ok()


def test_update_never_reads_the_device_value(monkeypatch):
    """No host sync in update: neither item() nor bool() is called on a tensor."""
    guard = FiniteGuard("cpu")

    def boom(self, *a, **k):
        raise AssertionError("host sync in update")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    guard.update(torch.tensor(1.0), _params())
    monkeypatch.undo()
    assert guard.ok()


class _FakeWorld:
    """Two ranks in threads; all_reduce_min meets at a barrier and returns the minimum."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size)
        self.values: dict[int, torch.Tensor] = {}
        self.calls = 0

    def reducer(self, rank: int):
        def all_reduce_min(flag: torch.Tensor) -> torch.Tensor:
            assert flag.dtype == torch.int32
            self.values[rank] = flag.clone()
            self.calls += 1
            self.barrier.wait()
            out = torch.stack(list(self.values.values())).min()
            self.barrier.wait()
            return out

        return all_reduce_min


def test_two_ranks_agree_when_only_one_goes_bad():
    world = _FakeWorld(2)
    outcome: dict[int, str] = {}

    def rank_loop(rank: int) -> None:
        guard = FiniteGuard("cpu", all_reduce_min=world.reducer(rank))
        try:
            for step in range(1, 31):
                bad = rank == 1 and step == 17
                guard.update(torch.tensor(float("nan") if bad else 1.0), _params())
                if step % 10 == 0:
                    guard.check(step)
            outcome[rank] = "finished"
        except BundleflowError as err:
            outcome[rank] = str(err)

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(not t.is_alive() for t in threads), "a rank hung in the reduction"
    for rank in (0, 1):
        assert "between step 10 and step 20" in outcome[rank], outcome
    assert world.calls == 4  # two checks per rank, none after the failure
