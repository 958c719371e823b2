"""The estimator comparison's table in RESULTS is the tool's output, and the tool reads its rule as written."""
import json
from pathlib import Path

import pytest

from benchmarks.estimator_table import main, table, variance_rows

HEADER = ("| preset | method | decoding (rollouts) | samples | mean reward | tr Cov | \\|mean\\|^2 | tr Cov / \\|mean\\|^2 "
          "| \\|mean\\|^2 - tr Cov / n | cos vs agrpo | backward s / sample |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


@pytest.mark.parametrize("out", ["docs/results/estimators_countdown_all", "docs/results/estimators_sudoku"])
def test_results_tables_are_the_tools_output(out, capsys):
    assert main([out]) == 0
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) == 3 + 11  # header, rule, base and the eleven estimators
    assert printed in Path("docs/RESULTS.md").read_text()


def _results(accuracies: dict[str, list[float]]) -> dict:
    runs = [{"method": m, "seed": i, "lr": 1e-4, "phase": "eval", "at_steps": {"4": a / 2, "8": a}, "learner_s_per_step": 2.0}
            for m, values in accuracies.items() for i, a in enumerate(values)]
    runs.append({**runs[0], "phase": "tune", "seed": 100, "at_steps": {"4": 0.9, "8": 0.9}})  # never enters the table
    return {"config": "tiny_sudoku", "sampling_steps": [4, 8], "base": {"4": 0.1, "8": 0.2}, "runs": runs}


def test_bold_where_the_welch_interval_excludes_zero_and_the_last_variance_row_wins():
    variance = variance_rows(
        "# title\n\n" + HEADER
        + "| tiny_sudoku | agrpo | margin (shared) | 256 | 0.8 | 3 | 0.01 | 300 | -0.002 | 1.000 | 0.1 |\n"
        + "| tiny_sudoku | wd1 | margin (shared) | 256 | 0.8 | 3 | 0.01 | 300 | 0.001 | 0.500 | 0.1 |\n\nlater:\n\n" + HEADER
        + "| tiny_sudoku | wd1 | random (shared) | 256 | 0.8 | 3 | 0.01 | 123.4 | 0.004 | 0.250 | 0.1 |\n")
    rows = table(_results({"agrpo": [0.30, 0.32, 0.34], "wd1": [0.20, 0.21, 0.22], "spg": [0.29, 0.33, 0.35]}),
                 variance).splitlines()
    agrpo, wd1, spg = (next(r for r in rows if r.startswith(f"| {name} |")) for name in ("AGRPO", "wd1", "SPG"))
    assert "| 300 (unresolved) | 1.000 | 2.0 |" in agrpo  # noise-corrected |mean|^2 below 0: a lower bound
    # 11 points apart with sd 2 and 1 points over 3 seeds: Welch's interval (about 11 +- 3.2 x 1.29) excludes 0
    assert "| 12 | 1e-4 | **10.5 ± 1.2** | **21.0 ± 2.5** | **+11.0 [+6.8, +15.2]** | 123 | 0.250 |" in wd1
    assert spg == "| SPG | 4 | 1e-4 | 16.2 ± 3.8 | 32.3 ± 7.6 | -0.3 [-6.6, +5.9] |  |  | 2.0 |"  # no variance row
    assert rows[2] == "| base (SFT) | | | 10.0 | 20.0 | | | | |"


def test_a_method_that_is_no_estimator_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(_results({"agrpo": [0.3, 0.31], "sync": [0.3, 0.32]})))
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sync is neither one of rl_compare's estimators" in err
