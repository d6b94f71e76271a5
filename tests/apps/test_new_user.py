"""Issue 40: what a new user meets first: flags after the sub-command, Ctrl-C with the resume line,
missing extras named with their install command, progress in logs, results files outside the
bundle and keyed by the resolved path, the classify table and its --output file."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import pytest

from dbmef.apps.cli import main
from dbmef.apps.outputs import label_probability, vote_share
from dbmef.apps.report import LogProgress
from dbmef.runtime.results import ImageResult
from tests.apps.conftest import FAST
from tests.conftest import needs_ort, needs_torch, write_images


@pytest.fixture
def labelled(tmp_path, many_images):
    root = tmp_path / "data"
    write_images(root / "0", many_images[:4])
    write_images(root / "dog", many_images[4:8])
    return root


def test_the_table_shows_the_final_labels_probability_and_its_votes():
    """The backbone put 0.6 on class 3 and 0.3 on class 7; DBMEF chose 7 with 4 of 5 votes."""
    changed = ImageResult(index=0, name="a.png", label=7, class_name="seven", rethought=True, backbone_label=3,
                          max_prob=0.6, topk=[(3, 0.6), (7, 0.3)], candidates=[3, 7], votes=[1, 4], unet_evals=300)
    kept = ImageResult(index=1, name="b.png", label=3, backbone_label=3, max_prob=0.9, topk=[(3, 0.9)])
    outside = ImageResult(index=2, name="c.png", label=5, rethought=True, backbone_label=3, max_prob=0.5,
                          topk=[(3, 0.5)], candidates=[3, 5], votes=[0, 1])
    assert label_probability(changed) == 0.3 and vote_share(changed) == "4/5"
    assert label_probability(kept) == 0.9 and vote_share(kept) is None  # not rethought: no votes
    assert label_probability(outside) is None and vote_share(outside) == "1/1"


def test_log_progress_lines_at_intervals():
    """On a file: a first line, one per every_s of a fake clock, one at the end, with the rate and
    what is left: 10 images over 20 s, every 8 s."""
    now = [0.0]
    out = io.StringIO()
    p = LogProgress(10, "eval", out, every_s=8.0, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 2.0
        p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == ["eval: 10 images",
                     "eval: 4/10 images (40%), 0.5 img/s, about 12 s left",  # at t = 8
                     "eval: 8/10 images (80%), 0.5 img/s, about 4 s left",  # at t = 16
                     "eval: 10/10 images (100%), 0.5 img/s"]  # close
    quiet = io.StringIO()
    q = LogProgress(3, "eval", quiet, every_s=0.0, enabled=False)
    q.update(3)
    q.close()
    assert quiet.getvalue() == ""


def test_missing_extras_are_named_with_their_install_command(monkeypatch, capsys):
    import dbmef.apps.cli as cli
    import dbmef.export.cli as export_cli

    def needs_matplotlib(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(cli, "cmd_calibrate", needs_matplotlib)
    assert main(["calibrate", "--bundle", "B", "--data", "D"]) == 2
    err = capsys.readouterr().err
    assert "dbmef calibrate: error:" in err and "pip install 'dbmef[plot]'" in err and "Traceback" not in err

    def needs_torch(args, say):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(export_cli, "_export_torch", needs_torch)
    monkeypatch.setattr(export_cli, "_source_kind", lambda args: "torch")
    assert export_cli.main(["--backbone", "resnet50", "--out", "x"]) == 2
    assert "pip install 'dbmef[export,cpu]'" in capsys.readouterr().err

    def a_bug(args):
        raise ModuleNotFoundError("No module named 'dbmef.nothing'", name="dbmef.nothing")

    monkeypatch.setattr(cli, "cmd_calibrate", a_bug)
    with pytest.raises(ModuleNotFoundError):  # not an optional package: a real bug, with its traceback
        main(["calibrate", "--bundle", "B", "--data", "D"])


def test_interrupt_and_broken_pipe(monkeypatch, capsys):
    import dbmef.apps.cli as cli

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_classify", ctrl_c)
    assert main(["classify", "--bundle", "B", "x.png"]) == 130
    assert capsys.readouterr().err.strip() == "dbmef classify: interrupted"


@needs_torch
@needs_ort
def test_flags_after_the_subcommand_and_eval_interrupted_then_resumed(bundle, labelled, tmp_path, monkeypatch,
                                                                       capsys):
    """-q after the sub-command; Ctrl-C during eval after 3 images: one line, exit 130, the 3 saved;
    the same command then resumes (only the rest is classified), its file in $DBMEF_HOME, not in the
    bundle, and a relative spelling of the same data is the same images."""
    import dbmef.apps.cli as cli
    from dbmef.apps.report import progress_bar
    from dbmef.runtime.evaluate import default_results, read_results

    class Interrupting:
        def __init__(self):
            self.n = 0

        def update(self, n=1):
            self.n += n
            if self.n == 3:
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(cli, "progress_bar", lambda *a: Interrupting())
    args = ["eval", "--bundle", str(bundle), "--data", str(labelled), *FAST, "--batch-size", "2", "--json"]
    assert main([*args, "-q"]) == 130
    err = capsys.readouterr().err
    results = default_results(bundle, labelled, "eval")
    assert f"dbmef eval: interrupted: 3 of 8 images saved in {results}; run the same command to resume" in err
    assert len(read_results(results)) == 3
    assert Path(results).is_relative_to(Path(os.environ["DBMEF_HOME"]))
    assert not (bundle / "eval").exists()

    monkeypatch.setattr(cli, "progress_bar", progress_bar)
    monkeypatch.chdir(labelled.parent)  # the same data, spelled relative to here
    assert main(["eval", "--bundle", str(bundle), "--data", "data", *FAST, "--batch-size", "2", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["results_file"] == str(results) and summary["n_images"] == 8
    lines = [json.loads(x) for x in Path(results).read_text().splitlines()]
    assert len(lines) == 1 + 8  # the header and one record per image: the 3 saved were not redone


@needs_torch
@needs_ort
def test_classify_output_files_and_skipped_files(bundle, many_images, tmp_path, capsys, caplog):
    folder = tmp_path / "imgs"
    write_images(folder, many_images[:2])
    (folder / "notes.txt").write_text("not an image")
    out_csv, out_jsonl = tmp_path / "r.csv", tmp_path / "r.jsonl"
    with caplog.at_level(logging.WARNING):
        assert main(["classify", "--bundle", str(bundle), *FAST, "--prot", "0", str(folder),
                     "--output", str(out_csv)]) == 0
    assert "skipped 1 file(s) that are not images" in caplog.text and ".txt" in caplog.text
    table = capsys.readouterr().out
    assert "p_label" in table and "unet_evals" in table and "votes" in table
    rows = list(csv.DictReader(out_csv.open()))
    assert [Path(r["image"]).name for r in rows] == ["img000.png", "img001.png"]
    assert all(r["rethought"] == "True" and int(r["unet_evals"]) > 0 and r["votes"].endswith("/2") for r in rows)
    assert main(["classify", "--bundle", str(bundle), *FAST, str(folder), "--output", str(out_jsonl), "-q"]) == 0
    recs = [json.loads(x) for x in out_jsonl.read_text().splitlines()]
    assert len(recs) == 2 and all("noise_errors" in r for r in recs)
    assert main(["classify", "--bundle", str(bundle), str(folder), "--output", str(tmp_path / "r.xlsx")]) == 2
    assert ".csv" in capsys.readouterr().err


@needs_torch
def test_a_typod_timm_name_gets_a_did_you_mean():
    from dbmef.errors import ExportError
    from dbmef.reference.loading import load_backbone

    with pytest.raises(ExportError, match=r"'resnt50' is neither .* did you mean 'resnet50'"):
        load_backbone("resnt50")
    with pytest.raises(ExportError, match=r"timm.list_models\(\) lists the names"):
        load_backbone("zzzqqq")


def test_a_reader_that_leaves_ends_the_command_quietly():
    """`dbmef info | head -1`: the pipe's reader is gone before the output is written; the command
    exits 141 (as a process killed by SIGPIPE would) without a traceback or 'Exception ignored'."""
    import subprocess
    import sys

    from dbmef.apps.digits import demo_bundle_dir

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as usual
    proc = subprocess.Popen([sys.executable, "-m", "dbmef.apps.cli", "info", "--bundle", str(demo_bundle_dir())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader leaves at once
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()[-2000:]
    assert b"Traceback" not in err and b"Exception ignored" not in err and b"BrokenPipe" not in err
