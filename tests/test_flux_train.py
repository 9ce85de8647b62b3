"""benchmarks/flux_train.py under torch.distributed: 2 gloo processes, a short run."""

import pytest
import torch

pytest.importorskip("transformers")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_gloo_processes_train_on_the_same_grid(capfd):
    """Each rank draws its own (budget, grid) every step and all-gathers it: the script
    asserts the ranks agree (a disagreement fails a rank, and spawn raises). Rank 0 then
    evaluates and prints the table."""
    from benchmarks.flux_train import BUDGETS, main

    assert main(["--steps", "3", "--batch", "4", "--held-out", "8", "--width", "32", "--depth", "1",
                 "--nproc", "2"]) == 0
    out = capfd.readouterr().out
    assert "on 2 process(es)" in out and "--nproc 2" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "of 64)" in line]
    assert [int(r.split()[1]) for r in rows] == list(BUDGETS)
