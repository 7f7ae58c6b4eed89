"""benchmarks/paper_fitting.py keeps every finished fit in its journal: a rerun skips them, and
a damaged journal line is reported and recomputed, never trusted."""

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_fitting.py"
spec = importlib.util.spec_from_file_location("paper_fitting", BENCHMARK)
paper_fitting = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_fitting)


def run(journal, capsys, *extra):
    args = ["--photos", "1", "--iterations", "2", "--parts", "init", "--journal", str(journal)]
    paper_fitting.main(args + list(extra))
    return capsys.readouterr()


def test_a_rerun_skips_finished_fits_and_recomputes_a_damaged_one(tmp_path, capsys, monkeypatch):
    journal = tmp_path / "journal.jsonl"
    first = run(journal, capsys)
    lines = journal.read_text().splitlines()
    assert len(lines) == 6  # N=400 and 4900: grid, random, default, one photo each

    calls = []
    real_fit = paper_fitting.run_fit
    monkeypatch.setattr(paper_fitting, "run_fit", lambda *a: calls.append(a) or real_fit(*a))
    again = run(journal, capsys)
    assert calls == []  # everything came from the journal
    assert again.out.split("| 400 |")[1] == first.out.split("| 400 |")[1]
    assert "damaged" not in first.err + again.err

    # A line cut short by a kill, one with a forged PSNR, one that is not an object.
    entry = json.loads(lines[1])
    entry["result"]["psnr"] = float("nan")
    damaged = [lines[0][:40], json.dumps(entry), "[1, 2]", *lines[3:]]
    journal.write_text("\n".join(damaged))  # and no final newline
    rerun = run(journal, capsys)
    assert rerun.err.count("damaged entry") == 3
    assert len(calls) == 3  # exactly the three untrusted fits were run again
    assert rerun.out.split("| 400 |")[1] == again.out.split("| 400 |")[1]  # same numbers
    assert all(
        paper_fitting.check_entry(json.loads(x)) is None
        for x in journal.read_text().splitlines()[3:]
    )  # appended whole after the cut


def test_report_fits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(paper_fitting, "run_fit", lambda *a: 1 / 0)
    out = run(tmp_path / "journal.jsonl", capsys, "--report").out
    assert "| 400 | 22.04 | 17.77 | – | – | – (190 it.) |" in out
