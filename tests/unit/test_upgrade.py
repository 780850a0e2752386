"""Which moves between releases upgrade and rollback allow, and the refusals' words."""

from __future__ import annotations

import pytest

from stellarbase.errors import ExitCode, StellarError
from stellarbase.upgrade import SchemaSupport, check_move, version_key


def test_versions_sort_by_number_then_prerelease() -> None:
    ordered = ["0.9.9", "0.10.0rc1", "0.10.0", "0.10.1", "1.0.0"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    with pytest.raises(StellarError) as err:
        version_key("latest")
    assert err.value.code == ExitCode.USAGE


def test_upgrade_within_the_supported_range() -> None:
    target = SchemaSupport("0.3.0", floor=0, newest=4)
    assert check_move("0.2.0", target, "0.2.0", db_newest=3, db_floor=0) == "upgrade"
    assert check_move("0.3.0", target, "0.2.0", db_newest=4, db_floor=0) == "same"


def test_upgrade_from_too_old_a_release_is_refused() -> None:
    target = SchemaSupport("0.5.0", floor=0, newest=6)
    with pytest.raises(StellarError) as err:
        check_move("0.2.0", target, "0.4.0", db_newest=3, db_floor=0)
    assert err.value.code == ExitCode.UPGRADE
    assert "upgrades from 0.4.0 or newer; this host runs 0.2.0" in err.value.message
    assert "between 0.4.0 and 0.5.0 first" in err.value.hint


def test_downgrade_allowed_while_the_schema_is_compatible() -> None:
    older = SchemaSupport("0.1.0", floor=0, newest=2)
    assert check_move("0.2.0", older, "0.0.0", db_newest=3, db_floor=0) == "downgrade"
    assert check_move("0.2.0", older, "0.0.0", db_newest=3, db_floor=2) == "downgrade"


def test_downgrade_past_the_compatibility_range_is_refused() -> None:
    older = SchemaSupport("0.1.0", floor=0, newest=2)
    with pytest.raises(StellarError) as err:
        check_move("0.2.0", older, "0.0.0", db_newest=3, db_floor=3)
    assert err.value.code == ExitCode.UPGRADE
    assert err.value.message == (
        "release 0.1.0 cannot run against this database: its schema is at version 3 and "
        "needs releases with schema 3 or newer; 0.1.0 ships up to 2"
    )
    assert "migrations only go forward" in err.value.hint
