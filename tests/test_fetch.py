import functools
import http.server
import io
import os
import tarfile
import threading

import pytest

from biounet.data.fetch import (SYNTHETIC_DIR, SYNTHETIC_MARK, FetchError, download, download_isbi, ensure_isbi_data,
                                fetch_pretrained, has_images, safe_extract)

FOLDERS = ("train_image", "train_label", "test_image")


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def make_tar(path, files):
    """A .tar.gz holding {member name: bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def isbi_archives(www, source):
    for name in FOLDERS:
        files = {f"{name}/{f}": open(os.path.join(source, name, f), "rb").read()
                 for f in os.listdir(os.path.join(source, name))}
        make_tar(www / f"{name}.tar.gz", files)


def test_folders_that_already_hold_images_are_used_as_they_are(dataset, monkeypatch):
    monkeypatch.setenv("ISBI_BASE_URL", "http://127.0.0.1:9/")
    assert ensure_isbi_data(dataset) == (dataset, "present")


def test_data_is_copied_from_a_local_mirror_into_every_empty_folder_even_when_training_needs_only_two(
        dataset, tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    needed = ("train_image", "train_label")
    assert ensure_isbi_data(str(target), mirror=dataset, needed=needed) == (str(target), "mirror")
    for name in FOLDERS:
        assert sorted(os.listdir(target / name)) == sorted(os.listdir(os.path.join(dataset, name)))


def test_data_is_downloaded_and_unpacked_when_nothing_is_at_hand(dataset, tmp_path, server, monkeypatch):
    isbi_archives(tmp_path / "www", dataset)
    monkeypatch.setenv("ISBI_BASE_URL", server)
    target = tmp_path / "project"
    target.mkdir()
    assert ensure_isbi_data(str(target)) == (str(target), "download")
    assert all(has_images(target / name) for name in FOLDERS)
    assert not any(name.endswith(".tar.gz") for name in os.listdir(target))


def test_offline_with_all_three_folders_empty_explains_and_falls_back_to_synthetic_data_in_its_own_folder(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ISBI_BASE_URL", "http://127.0.0.1:9/")
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / ".gitkeep").write_text("")
    synthetic = str(tmp_path / SYNTHETIC_DIR)
    assert ensure_isbi_data(str(tmp_path)) == (synthetic, "synthetic")
    err = capsys.readouterr().err
    assert "could not download http://127.0.0.1:9/train_image.tar.gz" in err
    assert "ISBI_DATA_DIR" in err and "SYNTHETIC" in err
    assert (tmp_path / SYNTHETIC_DIR / SYNTHETIC_MARK).exists()
    assert len(os.listdir(tmp_path / SYNTHETIC_DIR / "train_image")) == 30
    assert all(os.listdir(tmp_path / name) == [".gitkeep"] for name in FOLDERS)
    assert ensure_isbi_data(str(tmp_path)) == (synthetic, "synthetic")  # and it keeps saying so on later runs
    assert "SYNTHETIC" in capsys.readouterr().err


def test_offline_a_users_own_images_are_never_written_over_and_the_gap_is_named(dataset, monkeypatch):
    monkeypatch.setenv("ISBI_BASE_URL", "http://127.0.0.1:9/")
    for name in os.listdir(f"{dataset}/test_image"):
        os.remove(f"{dataset}/test_image/{name}")
    before = {name: sorted(os.listdir(f"{dataset}/{name}")) for name in FOLDERS}
    content = open(f"{dataset}/train_image/0.png", "rb").read()
    with pytest.raises(FetchError, match=r"test_image/ holds no images and could not download"):
        ensure_isbi_data(dataset)
    assert {name: sorted(os.listdir(f"{dataset}/{name}")) for name in FOLDERS} == before
    assert open(f"{dataset}/train_image/0.png", "rb").read() == content
    assert not os.path.exists(f"{dataset}/{SYNTHETIC_DIR}")
    # What a folder holds is enough for the run that needs only it: training needs no test images.
    assert ensure_isbi_data(dataset, needed=("train_image", "train_label")) == (dataset, "present")


def test_a_partial_download_keeps_what_arrived_and_refills_only_the_empty_folder(dataset, tmp_path, server,
                                                                                  monkeypatch):
    isbi_archives(tmp_path / "www", dataset)
    os.remove(tmp_path / "www" / "train_label.tar.gz")
    monkeypatch.setenv("ISBI_BASE_URL", server)
    target = tmp_path / "project"
    target.mkdir()
    with pytest.raises(FetchError, match=r"train_label/ holds no images and could not download .*HTTP 404"):
        ensure_isbi_data(str(target))
    assert has_images(target / "train_image") and not has_images(target / "train_label")
    assert sorted(os.listdir(target)) == ["train_image"]  # no archive, no staging folder left
    kept = {name: os.path.getmtime(target / "train_image" / name) for name in os.listdir(target / "train_image")}
    isbi_archives(tmp_path / "www", dataset)
    assert ensure_isbi_data(str(target)) == (str(target), "download")
    assert {name: os.path.getmtime(target / "train_image" / name) for name in kept} == kept


def test_an_archive_that_would_unpack_to_more_than_it_should_is_refused_and_removed(tmp_path, server, monkeypatch):
    make_tar(tmp_path / "www" / "train_image.tar.gz", {"train_image/0.png": bytes(129 << 20)})
    monkeypatch.setenv("ISBI_BASE_URL", server)
    target = tmp_path / "project"
    target.mkdir()
    with pytest.raises(FetchError, match=r"refusing to unpack 129 MiB, more than the 128 MiB"):
        download_isbi(str(target), server, ["train_image"])
    assert os.listdir(target) == []


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/absolute-escape.txt", "a/../../escaped.txt"])
def test_an_archive_member_that_would_escape_the_target_is_refused(tmp_path, member):
    archive = tmp_path / "evil.tar.gz"
    make_tar(archive, {"ok/fine.txt": b"x", member: b"escaped"})
    (tmp_path / "target").mkdir()
    with pytest.raises(FetchError, match="would be written outside"):
        safe_extract(str(archive), str(tmp_path / "target"))
    assert os.listdir(tmp_path / "target") == []
    assert not (tmp_path / "escaped.txt").exists()


def test_an_archive_holding_a_link_is_refused(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("train_image/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(FetchError, match="not a plain file or folder"):
        safe_extract(str(archive), str(tmp_path))


def test_the_pretrained_checkpoint_is_downloaded_once_and_unpacked(tmp_path, server, monkeypatch):
    make_tar(tmp_path / "www" / "checkpoints.tar.gz",
             {"checkpoints/pickled_data": b"...", "checkpoints/tensor_1/meta": b"", "checkpoints/tensor_1/out": b""})
    monkeypatch.setenv("ISBI_BASE_URL", server)
    folder = fetch_pretrained(str(tmp_path / "pretrained"))
    assert folder == str(tmp_path / "pretrained" / "checkpoints")
    os.remove(tmp_path / "www" / "checkpoints.tar.gz")
    assert fetch_pretrained(str(tmp_path / "pretrained")) == folder


def test_a_missing_file_on_the_server_is_reported_with_its_address(tmp_path, server, monkeypatch):
    monkeypatch.setenv("ISBI_BASE_URL", server)
    with pytest.raises(FetchError, match=r"could not download .*/checkpoints\.tar\.gz: HTTP 404"):
        fetch_pretrained(str(tmp_path / "pretrained"))


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"only the first bytes")

    def log_message(self, *args):
        pass


def test_a_download_cut_off_midway_leaves_no_partial_file(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TruncatingHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FetchError, match="could not download"):
            download(f"http://127.0.0.1:{httpd.server_address[1]}/x.tar.gz", str(tmp_path / "x.tar.gz"))
    finally:
        httpd.shutdown()
    assert os.listdir(tmp_path) == []
