"""benchmarks/paper_fitting.py keeps every finished fit in its journal: a rerun skips them, and
a damaged journal line is reported and recomputed, never trusted."""

import importlib.util
import json
from pathlib import Path

from timm_splat.fitting import FitConfig

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


def test_a_new_fit_option_reruns_only_the_fits_it_can_change(tmp_path, capsys, monkeypatch):
    """The paper preset's fits are named by the preset and its overrides, since they do not
    change: a field added to FitConfig (pretended here) reruns the default's fits, not them."""
    journal = tmp_path / "journal.jsonl"
    first = run(journal, capsys)
    calls = []
    real_fit = paper_fitting.run_fit
    monkeypatch.setattr(
        paper_fitting, "run_fit", lambda image, c: calls.append(c) or real_fit(image, c)
    )
    fields = paper_fitting.config_fields
    monkeypatch.setattr(paper_fitting, "config_fields", lambda c: {**fields(c), "new_option": 1})
    again = run(journal, capsys)
    assert sorted(c.num_splats for c in calls) == [400, 4900]
    assert all(c == FitConfig(num_splats=c.num_splats) for c in calls)  # the default's only
    assert again.out.split("| 400 |")[1] == first.out.split("| 400 |")[1]


def test_a_journal_from_before_keeps_the_paper_fits(tmp_path, capsys, monkeypatch):
    """Journals written before the paper preset's fits were named by the preset keep them: they
    are read under their old names and written again under the new ones, nothing refitted."""
    journal = tmp_path / "journal.jsonl"
    first = run(journal, capsys)
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    for entry in entries:
        kind, photo, name = entry["key"].split("|", 2)
        if name.startswith("preset paper "):
            config = FitConfig.preset("paper", **json.loads(name.removeprefix("preset paper ")))
            entry["key"] = paper_fitting.fit_key(photo, config, kind)
    journal.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    monkeypatch.setattr(paper_fitting, "run_fit", lambda *a: 1 / 0)
    again = run(journal, capsys)
    assert again.out.split("| 400 |")[1] == first.out.split("| 400 |")[1]
    names = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert sum("|preset paper " in name for name in names) == 4  # grid and random, 400 and 4900
    assert len(names) == len(entries) + 4
    # The old names are no longer needed: with every field's name changed, --report still
    # finds the paper pipeline's fits (ours: grid and random), not the default's.
    monkeypatch.setattr(paper_fitting, "config_fields", lambda c: {"new_option": 1})
    row = run(journal, capsys, "--report").out.split("| 400 |")[1].split("\n")[0].split("|")
    assert row[2:4] == first.out.split("| 400 |")[1].split("|")[2:4]
    assert row[4].strip().startswith("–")
