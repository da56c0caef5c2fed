"""`dinoray shards build / verify` on real CIFAR-10 JPEGs: local folder, .tar, list file, S3."""

import io
import json
import os
import random
import tarfile

import pytest
from conftest import CIFAR_TEST_TAR

from orchestrator import storage
from orchestrator.cli import main as dinoray
from orchestrator.data import samples
from orchestrator.data.build import build
from orchestrator.data.index import read_index
from orchestrator.data.samples import iter_samples
from orchestrator.data.verify import verify
from orchestrator.storage import Store


def _cifar_members(n_per_class: int):
    """{name: bytes} for the first n images of each class in CIFAR-10 test.tar."""
    out, per = {}, {}
    with tarfile.open(CIFAR_TEST_TAR) as tf:
        for m in tf:
            if m.isreg() and m.name.endswith(".jpg"):
                cls = m.name.split("/")[1]
                if per.get(cls, 0) < n_per_class:
                    per[cls] = per.get(cls, 0) + 1
                    out[m.name] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """40 real JPEGs in class folders + one truncated JPEG + one text file named .jpg."""
    root = tmp_path_factory.mktemp("imgs") / "train"
    members = _cifar_members(4)
    for name, data in members.items():
        p = root / name.split("/", 1)[1]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    first = next(iter(members.values()))
    (root / "cat" / "broken.jpg").write_bytes(first[: len(first) // 2])
    (root / "dog" / "notes.jpg").write_bytes(b"this is not an image")
    return root, members


def _read_all(folder_url, so=None):
    index, folder = read_index(Store(folder_url, so))
    samples = {}
    for s in index["shards"]:
        with (folder / s["name"]).open("rb") as f:
            for key, sample in iter_samples(f):
                samples[key] = sample
    return index, samples


def test_build_folder_skips_corrupt_and_keeps_original_bytes(small_folder, tmp_path):
    root, members = small_folder
    dst = tmp_path / "out"
    index = build(Store(str(root)), Store(str(dst)), samples_per_shard=15, writers=2, quiet=True)
    assert index["total"] == 40 and len(index["shards"]) == 3
    assert [s["count"] for s in index["shards"]] == [14, 14, 12] or sum(s["count"] for s in index["shards"]) == 40
    assert index["classes"] == sorted({n.split("/")[1] for n in members})
    reasons = {os.path.basename(s["source"]): s["reason"] for s in index["skipped"]}
    assert set(reasons) == {"broken.jpg", "notes.jpg"}
    assert "not a known image format" in reasons["notes.jpg"] and "broken" not in reasons["broken.jpg"]
    _, samples = _read_all(str(dst))
    originals = set(members.values())
    assert all(s["jpg"] in originals for s in samples.values())  # byte-identical, not re-encoded
    classes = index["classes"]
    for s in samples.values():  # label survives: find the source of these bytes
        name = next(n for n, d in members.items() if d == s["jpg"])
        assert classes[int(s["cls"])] == name.split("/")[1]
    assert verify(Store(str(dst))) == []
    assert not (dst / "_build").exists()
    assert sorted(os.listdir(dst)) == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_list_file_source_with_labels_and_bytes_limit(small_folder, tmp_path):
    root, _ = small_folder
    files = sorted(p for p in root.rglob("*.jpg") if p.name not in ("broken.jpg", "notes.jpg"))[:10]
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n" + "".join(f"{p}\tlabel{i % 2}\n" for i, p in enumerate(files)))
    index = build(Store(str(lst)), Store(str(tmp_path / "o")), samples_per_shard=0, bytes_per_shard=8000,
                         quiet=True, shuffle_seed=None)
    assert index["total"] == 10 and index["classes"] == ["label0", "label1"]
    assert len(index["shards"]) >= 2 and index["params"]["src_kind"] == "list"


def test_verify_fails_on_truncated_and_flipped_shard(small_folder, tmp_path):
    root, _ = small_folder
    dst = tmp_path / "v"
    build(Store(str(root)), Store(str(dst)), samples_per_shard=20, quiet=True)
    s0, s1 = dst / "shard-000000.tar", dst / "shard-000001.tar"
    data = bytearray(s1.read_bytes())
    s0.write_bytes(s0.read_bytes()[:5000])  # truncated
    data[1500] ^= 0xFF  # flipped byte inside the first image
    s1.write_bytes(bytes(data))
    problems = verify(Store(str(dst)))
    text = "\n".join(problems)
    assert "shard-000000.tar" in text and "truncated" in text
    assert "shard-000001.tar: sha256" in text
    assert dinoray(["shards", "verify", str(dst)]) == 1


def test_interrupted_build_writes_only_missing_shards(small_folder, tmp_path, capsys):
    root, _ = small_folder
    dst = tmp_path / "r"
    part = build(Store(str(root)), Store(str(dst)), samples_per_shard=10, max_shards=2, writers=1, quiet=True)
    assert part["incomplete"] and part["done"] == 2 and not (dst / "index.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in dst.glob("shard-*.tar")}
    assert len(before) == 2
    # a stale partial file and a wrong-size shard from a crash are ignored / rewritten
    (dst / ".shard-000002.tar.abc.partial").write_bytes(b"junk")
    assert dinoray(["shards", "build", str(root), str(dst), "--samples-per-shard", "10"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in dst.glob("shard-*.tar")}
    assert len(after) == 5 and all(after[n] == t for n, t in before.items())
    assert "2 already complete" in capsys.readouterr().err
    assert verify(Store(str(dst))) == []
    # a different plan into the same DST is refused with a clear message
    with pytest.raises(ValueError, match="other parameters"):
        build(Store(str(root)), Store(str(dst)), samples_per_shard=7, quiet=True)


def test_round_trip_cifar_test_tar_local(tmp_path):
    dst = tmp_path / "cifar"
    index = build(Store(str(CIFAR_TEST_TAR)), Store(str(dst)), samples_per_shard=2000, writers=2, quiet=True)
    assert index["total"] == 10000 and not index["skipped"] and len(index["classes"]) == 10
    index2, samples = _read_all(f"file://{dst}/index.json")
    assert index2 == index and len(samples) == 10000
    originals = _cifar_members(3)
    got = {s["jpg"] for s in samples.values()}
    assert all(d in got for d in originals.values())
    counts = {}
    for s in samples.values():
        counts[int(s["cls"])] = counts.get(int(s["cls"]), 0) + 1
    assert counts == {i: 1000 for i in range(10)}
    assert verify(Store(str(dst))) == []


@pytest.mark.s3
@pytest.mark.slow
def test_round_trip_cifar_test_tar_s3(s3_server, tmp_path, capsys, caplog):
    dst = f"s3://{s3_server['bucket']}/cifar-test"
    assert dinoray(["shards", "build", str(CIFAR_TEST_TAR), dst, "--samples-per-shard", "2500"]) == 0
    index, samples = _read_all(dst)
    assert index["total"] == 10000 and len(samples) == 10000 and len(index["shards"]) == 4
    assert dinoray(["shards", "verify", dst]) == 0
    fs, path = storage.fs_for(dst)
    raw = fs.cat_file(path + "/index.json").decode()
    out = capsys.readouterr()
    for secret in (s3_server["key"], s3_server["secret"]):
        assert secret not in raw and secret not in out.out + out.err and secret not in caplog.text
    assert not [p for p in fs.find(path + "/_build") if p.endswith(".json")]  # sidecars removed
    assert json.loads(raw)["params"]["src"].endswith("test.tar")
    # flipped byte in S3 is detected too
    name = index["shards"][1]["name"]
    data = bytearray(fs.cat_file(f"{path}/{name}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{path}/{name}", bytes(data))
    assert any(name in p for p in verify(Store(dst)))


def test_verify_missing_index_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dinoray shards build"):
        verify(Store(str(tmp_path)))


def _tarfile_members(data: bytes) -> tuple[list, str | None]:
    """What tarfile's stream mode reads from `data`: [(name, bytes)] of regular members, then the error."""
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
            for m in tf:
                if m.isreg():
                    out.append((m.name, tf.extractfile(m).read()))
    except tarfile.TarError as e:
        return out, type(e).__name__
    return out, None


def _fast_members(data: bytes) -> tuple[list, str | None]:
    out = []
    try:
        for item in samples._tar_members(io.BytesIO(data)):
            out.append(item)
    except tarfile.TarError as e:
        return out, type(e).__name__
    return out, None


@pytest.mark.parametrize("fmt,mode", [(tarfile.GNU_FORMAT, "w"), (tarfile.PAX_FORMAT, "w"), (tarfile.PAX_FORMAT, "w:gz")])
def test_tar_reader_reads_what_tarfile_reads_on_intact_and_corrupted_archives(fmt, mode):
    """The shard reader parses tar headers itself (samples._tar_members); on real JPEGs, long and non-ASCII
    names, ustar prefixes, directories, links and metadata, and on 600 truncated, bit-flipped or zeroed
    copies, it yields the members tarfile yields, then fails with the same error, or ends where it ends."""
    bio = io.BytesIO()
    jpegs = list(_cifar_members(1).items())[:3]
    members = [*jpegs, ("c" * 150 + "/000002.jpg", b"y" * 1024), ("p/" + "é" * 60 + ".cls", b"7"),
               ("__meta__/x.json", b"{}"), ("a/b/000003.txt", b"")]
    with tarfile.open(fileobj=bio, mode=mode, format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("dir", tarfile.DIRTYPE), ("link", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "x" * 200
            tf.addfile(info)
    archive = bio.getvalue()
    assert _fast_members(archive) == _tarfile_members(archive) == (members, None)
    rng = random.Random(fmt)
    for trial in range(600):
        broken, at = bytearray(archive), rng.randrange(len(archive))
        if trial % 3 == 0:
            broken = broken[:at]
        elif trial % 3 == 1:
            broken[at] ^= 1 << rng.randrange(8)
        else:
            broken[at:at + 10] = bytes(10)
        assert _fast_members(bytes(broken)) == _tarfile_members(bytes(broken)), (trial, at)
