"""The soak run (python -m benchmarks.soak), shortened, as a slow test: pytest -m slow."""

import sys

import pytest
from harness import ROOT

sys.path.insert(0, ROOT)  # benchmarks/ is beside the package, not installed with it
from benchmarks import soak


@pytest.mark.slow
@pytest.mark.timeout(300)  # a 45 s soak plus its cluster's start and stop
def test_soak_with_a_worker_killed_and_restarted_has_no_errors_and_no_corruption(tmp_path):
    report = soak.run(seconds=45, clients=32, folder=str(tmp_path))
    print(report)
    assert report["operations"] > 1000
    assert report["errors"] == 0, report["first_errors"]
    assert report["corrupted_bytes"] == 0
    assert [e.split(" ", 1)[1] for e in report["events"]] == ["kill storage-1", "restart storage-1"]
