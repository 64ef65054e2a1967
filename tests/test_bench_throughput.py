"""bench/throughput.py's load bookkeeping: a benchmark run on an oversubscribed machine is flagged, and no run is
ever called quiet."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import throughput  # noqa: E402


def test_a_run_whose_load_exceeds_the_cores_is_flagged_loaded(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    verdict = throughput.load_verdict([1.5, 2.4, 1.9])
    assert "LOADED" in verdict and "1.50–2.40" in verdict and "2 cores" in verdict


def test_a_run_within_the_cores_is_not_flagged_and_not_called_quiet(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    verdict = throughput.load_verdict([1.4, 1.7])
    assert "LOADED" not in verdict and "quiet" not in verdict.lower() and "idle" not in verdict.lower()
    assert "1.40–1.70" in verdict
