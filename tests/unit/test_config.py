from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from stellarbase import resources
from stellarbase.config import json_schema, secrets_env
from stellarbase.configload import load_config
from stellarbase.errors import ExitCode, StellarError


def _fail(**kw: object) -> StellarError:
    with pytest.raises(StellarError) as info:
        load_config(env={}, **kw)  # type: ignore[arg-type]
    assert info.value.code == ExitCode.CONFIG
    assert info.value.hint
    assert "\n" not in info.value.message
    return info.value


def test_tiers_set_their_own_defaults() -> None:
    pilot = load_config(env={}).config
    enterprise = load_config(tier="enterprise", env={}).config
    assert pilot.tier == "pilot" and pilot.worker.instances == 1
    assert enterprise.worker.instances == 4
    assert enterprise.api.limits.memory_max != pilot.api.limits.memory_max


def test_layers_in_order_site_then_set_then_env(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("worker: {instances: 2}\napi: {port: 9000}\nagent: {port: 9100}\n")
    loaded = load_config(
        site_file=site,
        sets=["api.port=9001"],
        env={"STELLARBASE_AGENT__PORT": "9102", "UNRELATED": "x"},
    )
    c = loaded.config
    assert (c.worker.instances, c.api.port, c.agent.port) == (2, 9001, 9102)
    assert loaded.sources["worker.instances"] == str(site)
    assert loaded.sources["api.port"] == "--set"
    assert loaded.sources["agent.port"] == "environment variable STELLARBASE_AGENT__PORT"


def test_unknown_key_names_the_file_and_suggests(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("api:\n  prot: 8080\n")
    err = _fail(site_file=site)
    assert str(site) in err.message and "api.prot" in err.message
    assert "api.port" in err.hint


def test_wrong_type_names_key_and_value() -> None:
    err = _fail(sets=["worker.instances=many"])
    assert err.message.startswith("--set: worker.instances:") and "'many'" in err.message


def test_bad_tier_lists_the_tiers() -> None:
    err = _fail(tier="huge")
    assert "huge" in err.message and "pilot" in err.hint


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_port(port: str) -> None:
    assert "api.port" in _fail(sets=[f"api.port={port}"]).message


def test_overlapping_ports_are_refused() -> None:
    assert "overlaps" in _fail(sets=["worker.port=8299", "worker.instances=3"]).message


def test_missing_secret_names_the_variable() -> None:
    err = _fail(sets=["dependencies.mode=external", "postgres.url=postgresql://sb@db:5432/sb"])
    assert "postgres.password" in err.message
    assert "STELLARBASE_POSTGRES__PASSWORD" in err.hint


def test_password_in_url_is_refused() -> None:
    sets = ["dependencies.redis=external", "redis.url=redis://:hunter2@cache:6379/0"]
    assert "password" in _fail(sets=sets).message


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    assert "no such file" in _fail(site_file=tmp_path / "missing.yaml").message
    bad = tmp_path / "bad.yaml"
    bad.write_text("api: [unclosed\n")
    assert "not valid YAML" in _fail(site_file=bad).message
    assert "cannot read" in _fail(site_file=tmp_path).message
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert "mapping" in _fail(site_file=scalar).message


def test_secrets_come_from_env_and_stay_out_of_the_dump() -> None:
    loaded = load_config(
        sets=["dependencies.mode=external", "postgres.url=postgresql://sb@db:5432/sb"],
        env={"STELLARBASE_POSTGRES__PASSWORD": "s3cret"},
    )
    assert secrets_env(loaded.config) == {"STELLARBASE_POSTGRES__PASSWORD": "s3cret"}
    assert "s3cret" not in loaded.config.model_dump_json()  # SecretStr masks it


def test_schema_validates_the_example_and_rejects_typos() -> None:
    schema = json_schema()
    json.dumps(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    example = yaml.safe_load((resources.config_dir() / "site.example.yaml").read_text())
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"api": {"prot": 1}}, schema)


def test_local_dependencies_by_tier_and_conflicts() -> None:
    pilot = load_config(env={}).config
    assert pilot.mode_of("postgres") == "local" and pilot.mode_of("redis") == "local"
    department = load_config(tier="department", env={}).config
    assert department.mode_of("postgres") == "external"
    mixed = load_config(sets=["dependencies.redis=external"], env={}).config
    assert (mixed.mode_of("postgres"), mixed.mode_of("redis")) == ("local", "external")
    with pytest.raises(StellarError) as info:
        load_config(
            sets=["postgres.url=postgresql://sb@db/sb"],
            env={"STELLARBASE_POSTGRES__PASSWORD": "x"},
        )
    assert "dependencies.postgres=external" in info.value.message
    assert _fail(sets=["local.redis.port=8300"]).message.startswith("--set: ")


# --- no secret in an error message -----------------------------------------------------

EXTERNAL = ["dependencies.mode=external", "redis.url=redis://cache:6379/0"]
REDIS_PASSWORD = {"STELLARBASE_REDIS__PASSWORD": "redis-pass"}
SECRET_SHAPES = {
    "number": ("48151623", "48151623"),
    "list": ("[hunter2x, 48151623]", "hunter2x"),
    "mapping": ("{nested: hunter2x}", "hunter2x"),
    "float": ("4815.1623", "4815.1623"),
}


def _external_site(tmp_path: Path, password_yaml: str, url: str = "postgresql://sb@db/sb") -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(
        f"dependencies: {{mode: external}}\nredis: {{url: 'redis://cache:6379/0'}}\n"
        f"postgres:\n  url: '{url}'\n  password: {password_yaml}\n"
    )
    return site


@pytest.mark.parametrize("shape", SECRET_SHAPES, ids=list(SECRET_SHAPES))
def test_a_secret_of_the_wrong_type_in_yaml_is_not_echoed(tmp_path: Path, shape: str) -> None:
    written, value = SECRET_SHAPES[shape]
    with pytest.raises(StellarError) as info:
        load_config(site_file=_external_site(tmp_path, written), env=REDIS_PASSWORD)
    err = info.value
    assert err.code == ExitCode.CONFIG and "postgres.password" in err.message
    assert value not in err.message + err.hint
    assert "quote it" in err.hint


@pytest.mark.parametrize("shape", ["list", "mapping"])
def test_a_secret_from_the_environment_is_taken_as_written(shape: str) -> None:
    written, _ = SECRET_SHAPES[shape]
    loaded = load_config(
        sets=[*EXTERNAL, "postgres.url=postgresql://sb@db/sb"],
        env={**REDIS_PASSWORD, "STELLARBASE_POSTGRES__PASSWORD": written},
    )
    assert loaded.config.postgres and loaded.config.postgres.password
    assert loaded.config.postgres.password.get_secret_value() == written


@pytest.mark.parametrize("value", ["48151623", "0123", "[hunter2x]", "a: b"])
def test_numbers_and_yaml_look_alikes_are_secrets_as_written(value: str) -> None:
    loaded = load_config(sets=EXTERNAL, env={"STELLARBASE_REDIS__PASSWORD": value})
    assert loaded.config.redis and loaded.config.redis.password
    assert loaded.config.redis.password.get_secret_value() == value


@pytest.mark.parametrize(
    "item",
    [
        "postgres.password=hunter2x",
        "postgres.password=48151623",
        "postgres={password: hunter2x}",
        "agent.metrics_token=hunter2x",
        "s3.secret_key=hunter2x",
        "backup.encryption_key=hunter2x",
    ],
)
def test_secrets_on_the_command_line_are_refused(item: str) -> None:
    err = _fail(sets=[*EXTERNAL, item])
    assert "secrets are not taken on the command line" in err.message
    assert "hunter2x" not in err.message + err.hint and "48151623" not in err.message
    assert "site file" in err.hint and "STELLARBASE_" in err.hint


@pytest.mark.parametrize("item", ["Postgres.password=hunter2x", "postgres.password:hunter2x"])
def test_a_malformed_set_is_not_echoed(item: str) -> None:
    err = _fail(sets=[item])
    assert "hunter2x" not in err.message + err.hint


def test_a_secret_quoted_by_another_check_is_blanked(tmp_path: Path) -> None:
    """A value check that quotes its input (a URL) never shows a secret nor a URL password."""
    site = _external_site(tmp_path, "'hunter2x'", url="ftp://sb:hunter2x@db/sb")
    with pytest.raises(StellarError) as info:
        load_config(site_file=site, env=REDIS_PASSWORD)
    assert "postgres.url" in info.value.message
    assert "hunter2x" not in info.value.message + info.value.hint
