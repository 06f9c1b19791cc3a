"""`python -m bench`: bad input ends with one line naming the setting and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import main


def test_a_bad_w8a8_setting_is_a_clear_error_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFIT_W8A8", "maybe")
    monkeypatch.setenv("EDGEFIT_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "engine.json"
    assert main(["engine", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "EDGEFIT_W8A8 must be 1, 0 or auto, got 'maybe'" in err
    assert not out.exists() and not (tmp_path / "data").exists()
