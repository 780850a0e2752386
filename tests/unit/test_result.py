"""The one output path: the JSON envelope, errors in it, `version`'s flat shape, and the
`run` fast path that keeps the command-line libraries out of long-running services."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stellarbase import __version__, cli
from stellarbase.errors import ExitCode
from stellarbase.result import Result, payload


def _cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["stellarbase", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)


def test_json_output_is_an_envelope_with_the_fields_under_data(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _cli(monkeypatch, "config", "show", "--tier", "pilot", "--set", "api.port=9100",
                "-o", "json")  # fmt: skip
    shown = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {k: shown[k] for k in ("schema", "command", "ok", "exit_code")} == {
        "schema": 1, "command": "config show", "ok": True, "exit_code": 0,
    }  # fmt: skip
    assert shown["data"]["config"]["api"]["port"] == 9100
    assert "port: 9100" in "\n".join(shown["messages"])


def test_an_error_under_json_is_an_envelope_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _cli(monkeypatch, "config", "show", "--set", "no.such_key=1", "-o", "json")
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert code == ExitCode.CONFIG == shown["exit_code"]
    assert shown["ok"] is False and shown["command"] == "config show"
    assert set(shown["data"]) == {"error", "hint", "details"}
    assert shown["data"]["error"] in err


def test_version_json_stays_flat_for_other_releases(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(monkeypatch, "version", "-o", "json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == __version__ and shown["service_users"] is True
    assert set(shown["schema"]) == {"min", "max"}


def test_other_binaries_output_is_read_flat_or_enveloped() -> None:
    flat = {"version": "0.0.9", "schema": {"min": 0, "max": 1}}
    assert payload(json.dumps(flat)) == flat
    error = {"error": "unhealthy", "hint": "see status", "details": ["x"]}
    enveloped = {"schema": 1, "command": "activate", "ok": False, "exit_code": 7,
                 "data": error, "messages": []}  # fmt: skip
    assert payload(json.dumps(enveloped)) == error


def test_a_hand_over_passes_on_the_exit_status_and_prints_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from stellarbase.result import Format, render

    handed = Result("upgrade", exit_code=13, written=True)
    render(handed, Format.JSON)
    assert capsys.readouterr().out == ""


def test_install_accepts_yes_but_does_not_show_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(monkeypatch, "install", "--help") == 0
    assert "--yes" not in capsys.readouterr().out
    code = _cli(monkeypatch, "install", "--yes", "--binary", "/x", "--bundle", "/y")
    assert code == ExitCode.USAGE  # refused for the two binaries, not for --yes


def test_run_keeps_typer_click_and_rich_out_of_the_service(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from stellarbase import cli\n"
        f"sys.argv = ['stellarbase', 'run', 'api', '--settings', {str(tmp_path / 'none')!r}]\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as exc:\n"
        "    loaded = sorted(m for m in ('typer', 'click', 'rich') if sys.modules.get(m))\n"
        "    print(exc.code, loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.stdout.strip() == f"{int(ExitCode.CONFIG)} []", done.stdout + done.stderr
    assert "no such settings file" in done.stderr
