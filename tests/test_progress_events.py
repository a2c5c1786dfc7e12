"""smolq.progress.event_progress: pipeline events drive one WorkProgress, closed on exit."""
import pytest

import smolq.progress as progress


class FakeBar:
    def __init__(self, n_tensors, n_bytes, label, quiet=False):
        self.calls = [("init", n_tensors, n_bytes, label, quiet)]
        FakeBar.made.append(self)

    def __enter__(self):
        self.calls.append(("enter",))
        return self

    def __exit__(self, *exc):
        self.calls.append(("exit",))

    def start(self, name):
        self.calls.append(("start", name))

    def done(self, nbytes):
        self.calls.append(("done", nbytes))


@pytest.fixture
def fake(monkeypatch):
    FakeBar.made = []
    monkeypatch.setattr(progress, "WorkProgress", FakeBar)
    return FakeBar


def test_events_drive_one_bar(fake):
    with progress.event_progress("convert", quiet=True) as on_progress:
        on_progress({"event": "tensor", "name": "early", "nbytes": 1})  # before start: ignored
        on_progress({"event": "start", "n_tensors": 2, "n_bytes": 30})
        on_progress({"event": "tensor", "name": "a", "nbytes": 10})
        on_progress({"event": "other"})
        on_progress({"event": "tensor", "name": "b", "nbytes": 20})
    assert len(fake.made) == 1
    assert fake.made[0].calls == [("init", 2, 30, "convert", True), ("enter",), ("start", "a"), ("done", 10),
                                  ("start", "b"), ("done", 20), ("exit",)]


def test_bar_closed_when_the_pipeline_raises(fake):
    with pytest.raises(RuntimeError):
        with progress.event_progress("migrate") as on_progress:
            on_progress({"event": "start", "n_tensors": 1, "n_bytes": 1})
            raise RuntimeError("boom")
    assert fake.made[0].calls[-1] == ("exit",)


def test_no_start_no_bar(fake):
    with progress.event_progress("quantize") as on_progress:
        on_progress({"event": "tensor", "name": "a", "nbytes": 1})
    assert fake.made == []
