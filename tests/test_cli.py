import json

import numpy as np
import pytest

from fastmil.cli import main
from fastmil.data import open_store
from tests.files import grid_coords, write_trident_h5


def test_synth_then_info(tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["synth", str(out), "--slides", "3", "--dim", "8", "--median-instances", "100", "-q"]) == 0
    assert "slides      3" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["slides"] == 3 and summary["dims"] == [8] and summary["classes"] == ["normal", "tumour"]


def _h5_slides(tmp_path):
    """A folder with TRIDENT files of slides a and b."""
    src = tmp_path / "h5"
    src.mkdir()
    for sid in ("a", "b"):
        write_trident_h5(src / f"{sid}.h5", np.ones((4, 3), np.float32), grid_coords(4))
    return src


def test_ingest_with_labels(tmp_path, capsys):
    src = _h5_slides(tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,0\nb,1\n")
    assert main(["ingest", str(src), str(tmp_path / "s"), "--labels", str(labels), "-q"]) == 0
    text = capsys.readouterr().out
    assert "2 slide(s) written" in text and "classes: ['0', '1']" in text
    assert open_store(tmp_path / "s").labels() == {"a": 0, "b": 1}


def test_ingest_with_survival_targets(tmp_path, capsys):
    src = _h5_slides(tmp_path)
    surv = tmp_path / "surv.csv"
    surv.write_text("slide_id,case_id,time,event\na,p1,12.5,1\nb,p1,12.5,1\nc,p2,3,0\n")
    assert main(["ingest", str(src), str(tmp_path / "s"), "--survival", str(surv), "-q"]) == 0
    captured = capsys.readouterr()
    assert "survival targets recorded for 2 slide(s), 1 patient(s)" in captured.out
    assert "1 slide(s) of" in captured.err and "c" in captured.err  # c is not in the store: reported
    assert open_store(tmp_path / "s").attrs["survival"] == {"a": ["p1", 12.5, True], "b": ["p1", 12.5, True]}
    assert main(["ingest", str(src), str(tmp_path / "s"), "--survival", str(surv), "--strict", "-q"]) == 2
    assert "not in the store" in capsys.readouterr().err


def test_errors_are_one_clear_line_with_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmil info: error:") and "no such store" in err
    assert main(["ingest", str(tmp_path), str(tmp_path / "s"), "-q"]) == 2
    assert "no .h5/.pt slide files" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [[], ["synth"], ["ingest"], ["info"], ["tile"]])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: fastmil" in capsys.readouterr().out
