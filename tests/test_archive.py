"""Uploaded model archives: a good one loads; path tricks, links, entry floods and zip bombs are
rejected whole, leaving nothing behind and nothing outside the temp folder."""
import io
import tarfile
import zipfile

import pytest

from lmcompress_core.models import archive
from lmcompress_core.models.archive import ArchiveError, extract_model_archive
from lmcompress_core.models.loading import ModelError, load_model, tiny_random_model


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Extraction temp folders go under tmp_path/tmp so leftovers can be counted."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(root))
    return root


def _zip(path, entries):
    """entries: name -> bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _tar(path, members):
    """members: list of (TarInfo, bytes | None)."""
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name, size=0, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def test_good_zip_of_model_folder_loads(tmp_path):
    folder = tmp_path / "src" / "my-model"
    loaded = tiny_random_model("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    entries = {f"my-model/{p.name}": p.read_bytes() for p in folder.iterdir()}
    extracted = extract_model_archive(_zip(tmp_path / "m.zip", entries))
    assert (extracted / "config.json").is_file() and extracted.name == "my-model"
    assert load_model(str(extracted)).card.source == "local"


def test_good_tar_gz(tmp_path):
    data = b'{"model_type": "gpt2"}'
    extracted = extract_model_archive(_tar(tmp_path / "m.tar.gz", [(_info("config.json", len(data)), data)]))
    assert (extracted / "config.json").read_bytes() == data


def _assert_rejected(path, private_tempdir, match):
    with pytest.raises(ArchiveError, match=match):
        extract_model_archive(path)
    assert list(private_tempdir.iterdir()) == []  # the temp folder was removed


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "/etc/evil.txt", "C:/evil.txt",
                                  "..\\evil.txt"])
def test_zip_path_escapes_rejected(tmp_path, private_tempdir, name):
    path = _zip(tmp_path / "bad.zip", {"config.json": b"{}", name: b"x"})
    _assert_rejected(path, private_tempdir, "absolute|'\\.\\.'")
    assert not (tmp_path / "evil.txt").exists()


def test_tar_path_escape_rejected(tmp_path, private_tempdir):
    path = _tar(tmp_path / "bad.tar.gz", [(_info("config.json", 2), b"{}"), (_info("../evil.txt", 1), b"x")])
    _assert_rejected(path, private_tempdir, "'\\.\\.'")
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_rejected(tmp_path, private_tempdir, kind):
    path = _tar(tmp_path / "link.tar.gz", [(_info("config.json", 2), b"{}"),
                                           (_info("model.safetensors", kind=kind, link="/etc/passwd"), None)])
    _assert_rejected(path, private_tempdir, "link")


def test_tar_device_file_rejected(tmp_path, private_tempdir):
    path = _tar(tmp_path / "dev.tar.gz", [(_info("null", kind=tarfile.CHRTYPE), None)])
    _assert_rejected(path, private_tempdir, "special")


def test_zip_symlink_rejected(tmp_path, private_tempdir):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("model.safetensors")
        info.external_attr = (0o120777 << 16)  # Unix symlink mode bits
        zf.writestr(info, "/etc/passwd")
    _assert_rejected(path, private_tempdir, "symbolic link")


def test_too_many_entries(tmp_path, private_tempdir):
    path = _zip(tmp_path / "many.zip", {f"f{i}.txt": b"" for i in range(archive.MAX_ENTRIES + 1)})
    _assert_rejected(path, private_tempdir, "entries")


def test_zip_bomb_rejected_by_declared_size(tmp_path, private_tempdir, monkeypatch):
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", 1 << 20)
    path = _zip(tmp_path / "bomb.zip", {"config.json": b"{}", "zeros.bin": bytes(8 << 20)})
    assert path.stat().st_size < 64 << 10  # 8 MiB of zeros compresses to a few KiB
    with pytest.raises(ArchiveError, match="uncompressed"):
        extract_model_archive(path, max_total_bytes=1 << 20)
    assert list(private_tempdir.iterdir()) == []


def test_lying_size_header_still_capped(tmp_path, private_tempdir, monkeypatch):
    """Even if the declared sizes passed the check, the running byte count stops extraction at the cap."""
    monkeypatch.setattr(archive, "check_members", lambda *a, **k: None)
    path = _zip(tmp_path / "bomb.zip", {"config.json": b"{}", "zeros.bin": bytes(4 << 20)})
    with pytest.raises(ArchiveError, match="size cap"):
        extract_model_archive(path, max_total_bytes=1 << 20)
    assert list(private_tempdir.iterdir()) == []


def _raw(info, data=b""):
    """One tar member as bytes: its GNU header, then its data padded to whole 512-byte blocks."""
    info.size = len(data)
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _sparse(name, real_size, data):
    """A GNU sparse member ('S') that stores ``data`` as its one chunk, at the end of ``real_size`` bytes of holes:
    a few hundred bytes in the archive, ``real_size`` bytes once expanded."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(_raw(info, data))
    block[386:398] = tarfile.itn(real_size - len(data), 12, tarfile.GNU_FORMAT)   # the chunk's offset
    block[398:410] = tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)               # and its length
    block[482] = 0                                                                 # no extension headers
    block[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)               # the expanded size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])                               # the header checksum again
    return bytes(block)


def _crafted(path, members):
    with tarfile.open(path, "w:gz") as probe:   # only for its gzip stream: the members are written raw
        probe.fileobj.write(b"".join(members) + bytes(2 * tarfile.BLOCKSIZE))
        probe.offset = 0
    return path


@pytest.fixture
def headers_read(monkeypatch):
    """How many tar member headers extraction reads (TarInfo.fromtarfile reads one)."""
    calls = []
    original = tarfile.TarInfo.fromtarfile.__func__

    def counted(cls, tarfile_):
        calls.append(1)
        return original(cls, tarfile_)

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counted))
    return calls


def test_tar_with_many_entries_stops_at_the_limit_while_reading(tmp_path, private_tempdir, headers_read):
    config = _raw(_info("config.json"), b"{}")
    path = _crafted(tmp_path / "flood.tar.gz", [config] + [_raw(_info(f"f{i}.txt")) for i in range(20_000)])
    assert len(tarfile.open(path).getmembers()) == 20_001   # the archive really holds them all
    headers_read.clear()
    _assert_rejected(path, private_tempdir, f"more than {archive.MAX_ENTRIES} entries")
    assert len(headers_read) == archive.MAX_ENTRIES + 1   # stopped at the first entry over the limit


def test_huge_sparse_tar_member_stops_reading_at_its_header(tmp_path, private_tempdir, headers_read):
    members = [_raw(_info("config.json"), b"{}"), _sparse("weights.bin", 1 << 40, b"x" * 512)]
    path = _crafted(tmp_path / "sparse.tar.gz", members + [_raw(_info(f"f{i}.txt")) for i in range(5_000)])
    listed = tarfile.open(path).getmember("weights.bin")
    assert listed.issparse() and listed.size == 1 << 40 and path.stat().st_size < 100_000
    headers_read.clear()
    _assert_rejected(path, private_tempdir, "1,099,511,627,778 bytes uncompressed")
    assert len(headers_read) == 2   # config.json, then the sparse member's header: nothing after it


def test_not_an_archive_and_no_config(tmp_path, private_tempdir):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not an archive")
    with pytest.raises(ModelError):
        extract_model_archive(junk)
    _assert_rejected(_zip(tmp_path / "empty.zip", {"readme.txt": b"hi"}), private_tempdir, "config.json")
