"""orchestrator.storage: redaction, atomic writes, Store reads on local/memory/S3, S3 errors."""

import logging
import os
import time

import pytest

from orchestrator import storage


def test_redact_env_secrets_urls_and_dict_keys(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sUpErSeCrEt123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE42")
    s = storage.redact("failed with sUpErSeCrEt123 for AKIAEXAMPLE42 at https://bob:pw@host/x?X-Amz-Signature=abc&a=1")
    assert "sUpErSeCrEt123" not in s and "AKIAEXAMPLE42" not in s and "bob:pw" not in s and "abc" not in s
    assert "a=1" in s and "https://***@host/x" in s
    d = storage.redact({"endpoint_url": "http://h", "client_kwargs": {"aws_secret_access_key": "zz"}, "key": "k",
                        "n": [1, "AKIAEXAMPLE42"]})
    assert d == {"endpoint_url": "http://h", "client_kwargs": {"aws_secret_access_key": "***"}, "key": "***",
                 "n": [1, "***"]}


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path):
    target = tmp_path / "sub" / "obj.bin"
    storage.atomic_write_bytes(str(target), b"one")
    storage.atomic_write_bytes(f"file://{target}", b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["obj.bin"]


def test_atomic_put_file_move_and_copy(tmp_path):
    src = tmp_path / "part"
    src.write_bytes(b"x" * 100)
    storage.atomic_put_file(str(src), str(tmp_path / "out" / "a.tar"))
    assert src.exists() and (tmp_path / "out" / "a.tar").read_bytes() == b"x" * 100
    storage.atomic_put_file(str(src), str(tmp_path / "out" / "b.tar"), move=True)
    assert not src.exists() and (tmp_path / "out" / "b.tar").stat().st_size == 100


def test_s3_options_come_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    opts = storage.storage_options_for("s3://b/k", {"endpoint_url": "http://127.0.0.1:3"})
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:3", "region_name": "eu-west-3"}
    opts = storage.storage_options_for("s3://b/k")
    assert opts["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:2"
    assert "key" not in opts and "secret" not in opts
    assert storage.storage_options_for("/tmp/x") == {}


def test_store_reads_local_and_memory(tmp_path):
    storage.atomic_write_bytes("memory://dinoray-test/obj", b"hello")
    with storage.Store("memory://dinoray-test/obj").open() as f:
        assert f.read() == b"hello"
    storage.Store(str(tmp_path / "obj")).write_bytes(b"0123456789")
    local = storage.Store(f"file://{tmp_path}") / "obj"
    assert local.read_bytes(2, 5) == b"234" and local.size() == 10 and local.parent.local_path == str(tmp_path)


def test_unreachable_endpoint_fails_fast_with_clear_error(monkeypatch, caplog):
    from orchestrator.data.index import read_index

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNREACH1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unreachSecret99")
    caplog.set_level(logging.DEBUG)
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        read_index(storage.Store("s3://no-such-bucket/shards", {"skip_instance_cache": True}))
    assert time.monotonic() - t0 < 60
    msg = str(ei.value)
    assert "s3://no-such-bucket/shards/index.json" in msg and "AWS_ENDPOINT_URL" in msg
    assert "unreachSecret99" not in msg and "unreachSecret99" not in caplog.text


@pytest.mark.s3
def test_s3_atomic_write_and_store_open(s3_server, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"s3://{s3_server['bucket']}/storage-test/obj.bin"
    storage.atomic_write_bytes(url, b"payload" * 1000)
    fs, path = storage.fs_for(url)
    assert fs.cat_file(path) == b"payload" * 1000
    with storage.Store(url).open() as f:
        assert f.read(7) == b"payload"
    # SigV4 never sends the secret, not even in botocore's DEBUG request dumps.
    assert s3_server["secret"] not in caplog.text
    # The access key id appears in botocore's DEBUG Authorization header dumps; at INFO it must not.
    assert s3_server["key"] not in "".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
