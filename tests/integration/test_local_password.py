"""The local PostgreSQL learns the application role's password as a SCRAM verifier: a
server that logs every statement never logs the password itself (PostgreSQL 15 and 18)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from stellarbase import localdeps
from tests import servers

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("major", [None, servers.EMBEDDED_MAJOR], ids=["host", "pg18"])
def test_password_change_logs_a_verifier_not_the_password(
    tmp_path: Path, major: int | None
) -> None:
    pg = servers.start_postgres(
        tmp_path, {"log_statement": "all", "log_min_error_statement": "debug5"}, major=major
    )
    try:
        password = "plain-Pa55word-" + tmp_path.name[-6:]
        changed, _ = localdeps.ensure_database(pg.port, pg.admin_password, password, 10.0)
        assert f"password of {localdeps.APP_ROLE}" in changed
        with psycopg.connect(
            host=pg.host, port=pg.port, user=localdeps.APP_ROLE, password=password,
            dbname=localdeps.APP_DATABASE, connect_timeout=5,
        ) as conn:  # fmt: skip
            stored = conn.execute("SELECT 1").fetchone()
        assert stored == (1,)
        log = (pg.data_dir.parent / "postgres.log").read_text(errors="replace")
        assert "ALTER ROLE" in log  # the statement was logged
        assert password not in log
        assert "SCRAM-SHA-256$" in log
    finally:
        pg.stop()
