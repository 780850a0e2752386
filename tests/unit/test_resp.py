"""The RESP2 client preflight talks to Redis with: encoding, replies, URLs, deadlines."""

from __future__ import annotations

import io
import time

import pytest

from stellarbase import resp
from tests.fakes import FakeRedis, HungServer


def reply(data: bytes) -> resp.Reply:
    return resp.read_reply(io.BytesIO(data))


def test_a_command_goes_out_as_an_array_of_bulk_strings() -> None:
    assert resp.encode(["CONFIG", "GET", "save"]) == (
        b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nsave\r\n"
    )
    # Lengths count bytes, not characters: a password may be any UTF-8.
    assert resp.encode(["AUTH", "pässword"]) == b"*2\r\n$4\r\nAUTH\r\n$9\r\np\xc3\xa4ssword\r\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"+OK\r\n", "OK"),
        (b":42\r\n", 42),
        (b":-1\r\n", -1),
        (b"$5\r\nhello\r\n", "hello"),
        (b"$0\r\n\r\n", ""),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        # A bulk string is read by its length, so it may hold CR LF itself.
        (b"$7\r\na\r\nb\r\nc\r\n", "a\r\nb\r\nc"),
        (b"*2\r\n$3\r\nkey\r\n*2\r\n:1\r\n$-1\r\n", ["key", [1, None]]),
    ],
)
def test_each_reply_type_is_read(data: bytes, expected: resp.Reply) -> None:
    assert reply(data) == expected


def test_an_error_reply_splits_into_code_and_message() -> None:
    error = reply(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    assert isinstance(error, resp.ReplyError)
    assert error.code == "WRONGPASS"
    assert str(error) == error.message == "invalid username-password pair or user is disabled."
    # Without an upper-case code the whole text is the message.
    plain = reply(b"-something broke\r\n")
    assert isinstance(plain, resp.ReplyError)
    assert (plain.code, plain.message) == ("", "something broke")


def test_an_error_inside_an_array_stays_a_value() -> None:
    got = reply(b"*2\r\n+OK\r\n-ERR no such key\r\n")
    assert isinstance(got, list) and got[0] == "OK"
    assert isinstance(got[1], resp.ReplyError) and got[1].message == "no such key"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 400 Bad Request\r\n",  # an HTTP server on the Redis port
        b"$abc\r\n",
        b"+OK",  # no line end
        b"$3\r\nabcde\r\n",  # longer than announced
    ],
)
def test_what_is_not_resp_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(resp.ProtocolError):
        reply(data)


@pytest.mark.parametrize("data", [b"", b"$10\r\nshort\r\n", b"*2\r\n+OK\r\n"])
def test_a_reply_cut_short_is_a_closed_connection(data: bytes) -> None:
    with pytest.raises(ConnectionError):
        reply(data)


def test_info_fields_leave_headers_and_blank_lines_out() -> None:
    text = (
        "# Server\r\nredis_version:7.2.4\r\nexecutable:/usr/bin/redis-server\r\n\r\n"
        "# Persistence\r\naof_enabled:0\r\nrdb_last_bgsave_status:ok\r\n"
    )
    assert resp.parse_info(text) == {
        "redis_version": "7.2.4",
        "executable": "/usr/bin/redis-server",
        "aof_enabled": "0",
        "rdb_last_bgsave_status": "ok",
    }
    with pytest.raises(resp.ProtocolError):
        resp.parse_info(["not", "text"])


def test_the_server_is_named_by_its_own_version() -> None:
    valkey = resp.parse_info(
        "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.1.1\r\n"
    )
    assert resp.server_version(valkey) == ("Valkey", "8.1.1")
    assert resp.describe(valkey) == "Valkey 8.1.1"
    assert resp.describe({"redis_version": "7.0.15"}) == "Redis 7.0.15"
    assert resp.describe({}) == "Redis ?"


def test_config_get_answer_becomes_a_dict() -> None:
    assert resp.as_pairs(["save", "", "appendonly", "no"]) == {"save": "", "appendonly": "no"}
    with pytest.raises(resp.ProtocolError):
        resp.as_pairs(["save"])


def test_url_gives_where_who_and_which_database() -> None:
    plain = resp.parse_url("redis://cache.internal:6380/2")
    assert (plain.host, plain.port, plain.tls, plain.db) == ("cache.internal", 6380, False, 2)
    assert (plain.username, plain.password) == (None, None)

    acl = resp.parse_url("rediss://app:p%40ss@cache/0?ssl_cert_reqs=none")
    assert (acl.host, acl.port, acl.tls, acl.db) == ("cache", 6379, True, 0)
    assert (acl.username, acl.password, acl.verify) == ("app", "p@ss", False)

    assert resp.parse_url("redis://localhost").db == 0
    assert resp.parse_url("redis://localhost?db=3").db == 3


def test_a_fake_old_redis_is_spoken_to() -> None:
    with FakeRedis(version="6.2.0", password="secret") as server:
        target = resp.parse_url(f"redis://127.0.0.1:{server.port}/0")
        conn = resp.connect(target, time.monotonic() + 5)
        try:
            with pytest.raises(resp.ReplyError) as refused:
                conn.command("INFO", "server")
            assert refused.value.code == "NOAUTH"
            with pytest.raises(resp.ReplyError) as wrong:
                conn.command("AUTH", "nope")
            assert wrong.value.code == "WRONGPASS"
            assert conn.command("AUTH", "secret") == "OK"
            info = resp.parse_info(conn.command("INFO", "server"))
            assert info["redis_version"] == "6.2.0"
        finally:
            conn.close()


def test_a_hung_server_costs_the_deadline_and_no_more() -> None:
    with HungServer() as hung:
        target = resp.parse_url(f"redis://127.0.0.1:{hung.port}/0")
        start = time.monotonic()
        conn = resp.connect(target, start + 0.3)
        try:
            with pytest.raises(TimeoutError):
                conn.command("PING")
        finally:
            conn.close()
        assert time.monotonic() - start < 0.6
        # With the deadline gone, nothing is sent at all.
        with pytest.raises(TimeoutError):
            resp.connect(target, time.monotonic())
