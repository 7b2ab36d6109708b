"""`distmeta serve`: real HTTP requests on loopback to the Ray Serve application (FastAPI ingress), three
profiles, LRU eviction at two per replica, bad requests answered as {"detail"} each followed by a request that
still succeeds, and the token."""

import io
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import requests

from distmeta.labels import CLASSES
from distmeta.profiles.personalizer import Personalizer
from distmeta.profiles.serve import ServeArgs
from distmeta.profiles.store import ProfileStore
from distmeta.profiles.uploads import enrollment_archive

HEADER = "serve_multiplexed_model_id"
TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained, small_corpus, tmp_path_factory, ray_local):
    from ray import serve

    from distmeta.profiles.serve import start

    _, path, _, episode = trained
    store = tmp_path_factory.mktemp("store")
    try:
        url = start(ServeArgs(model=str(path), store=str(store), max_profiles=2, max_body_mb=1.0, max_clip_seconds=20,
                              max_clips=40, token=TOKEN), host="127.0.0.1", port=free_port())
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield url, path, store, episode, session
    finally:
        serve.shutdown()


def clips_of(corpus, ids, targets) -> list[tuple[str, str]]:
    return [(corpus.utterances.loc[u, "path"], ";".join(c for c, v in zip(CLASSES, t) if v > 0.5)) for u, t in zip(ids, targets)]


@pytest.mark.slow
def test_served_profiles_answer_like_the_api_and_the_server_survives_bad_requests(served, small_corpus):
    url, path, store, episode, http = served
    p = Personalizer.from_pretrained(path, store=store)
    health = http.get(f"{url}/health", timeout=60).json()
    assert health["base"] == p.digest and health["loaded"] == []

    # three listeners enrolled over HTTP: two from archives of their labelled clips, one as a multipart form
    support = clips_of(small_corpus, episode.support, episode.support_targets)
    people = {"alice": support, "bob": support[:6], "carol": support[2:]}
    for person, clips in people.items():
        if person == "bob":
            files = [("clips", (Path(c).name, open(c, "rb").read(), "audio/wav")) for c, _ in clips]
            answer = http.post(f"{url}/profiles/bob/enroll", files=files, data={"labels": [lab for _, lab in clips]}, timeout=120)
        else:
            answer = http.post(f"{url}/enroll", params={"person": person}, data=enrollment_archive(clips), timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["shots"] == len(clips) and answer.json()["base"] == p.digest
    listed = http.get(f"{url}/profiles", timeout=60).json()["profiles"]
    assert sorted(q["person"] for q in listed) == sorted(people) and all(q["usable"] for q in listed)
    in_process = p.enroll([c for c, _ in support[:6]], [lab for _, lab in support[:6]])  # bob's form = the API's enroll
    served_bob = p.profile("bob").tensors
    # the replica's torch runs on one thread (its one CPU), this process on two: sums in another order
    assert all(np.allclose(in_process.tensors[k].numpy(), served_bob[k].numpy(), atol=1e-4) for k in served_bob)

    # each served prediction is the in-process record (what `distmeta predict` writes), by header or by path
    clip = Path(small_corpus.utterances.loc[episode.query[0], "path"])
    audio = clip.read_bytes()
    for person in ["", *people]:
        if person:
            answer = http.post(f"{url}/profiles/{person}/predict", data=audio, params={"top_k": 4}, timeout=60)
        else:
            answer = http.post(f"{url}/predict", data=audio, params={"top_k": 4}, timeout=60)
        assert answer.status_code == 200, answer.text
        expected = p.classify(str(clip), profile=person or None, top_k=4)
        served_ = answer.json()
        assert [s["label"] for s in served_["scores"]] == [s["label"] for s in expected["scores"]]
        assert np.allclose([s["score"] for s in served_["scores"]], [s["score"] for s in expected["scores"]], atol=1e-6)
        assert served_["labels"] == expected["labels"] and served_["profile"] == person and served_["kind"] == "listener"
    by_header = http.post(f"{url}/predict", data=audio, headers={HEADER: "bob"}, timeout=60).json()
    assert by_header["profile"] == "bob" and len(by_header["scores"]) == len(CLASSES)
    # two profiles per replica: the least recently used was evicted; asking for it loads it again
    health = http.get(f"{url}/health", timeout=60).json()
    assert health["loaded"] == ["bob", "carol"] and health["loads"] == {"alice": 1, "bob": 1, "carol": 1}
    assert http.post(f"{url}/profiles/alice/predict", data=audio, timeout=60).status_code == 200
    health = http.get(f"{url}/health", timeout=60).json()
    assert health["loaded"] == ["alice", "bob"] and health["loads"]["alice"] == 2

    def still_serving():
        answer = http.post(f"{url}/profiles/bob/predict", data=audio, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["scores"]) == len(CLASSES)

    def refused(answer, status, text):
        assert answer.status_code == status and text in answer.json()["detail"], answer.text
        assert "/tmp" not in answer.text and str(store) not in answer.text
        still_serving()

    # an unknown profile: 404, and it evicts nothing
    refused(http.post(f"{url}/profiles/zed/predict", data=audio, timeout=60), 404, "no profile 'zed'")
    assert http.get(f"{url}/health", timeout=60).json()["loaded"] == ["alice", "bob"]
    # unreadable audio: 400 naming the request body
    refused(http.post(f"{url}/profiles/bob/predict", data=b"RIFF\x00\x00 not audio at all", timeout=60), 400, "request body")
    # a body over the limit (1 MB here), declared or chunked: 413
    refused(http.post(f"{url}/predict", data=b"\x00" * (1024 * 1024 + 1), timeout=60), 413, "over the limit")
    refused(http.post(f"{url}/predict", data=iter([b"\x00" * 65536] * 17), timeout=60), 413, "over the limit")
    # bad enrollments: 400 naming the item as it is in the archive, nothing written
    refused(http.post(f"{url}/enroll", params={"person": "dave"}, data=b"not a tar", timeout=60), 400, "tar")
    refused(http.post(f"{url}/enroll", params={"person": "dave"}, data=enrollment_archive([(support[0][0], "boredom")]),
                      timeout=60), 400, "labels.csv, line 2 (clips/0.wav): unknown emotion label 'boredom'")
    refused(http.post(f"{url}/profiles/..%2Fevil/enroll", data=enrollment_archive(support), timeout=60), 404, "")
    refused(http.post(f"{url}/enroll", params={"person": "alice\n"}, data=enrollment_archive(support), timeout=60), 400, "profile id")
    assert sorted(q.stem for q in Path(store).glob("*.safetensors")) == sorted(people)
    assert http.get(f"{url}/nowhere", timeout=60).status_code == 404
    # without the token: 401 on every route but the docs
    assert requests.get(f"{url}/profiles", timeout=60).status_code == 401
    assert requests.post(f"{url}/profiles/bob/predict", data=audio, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
    assert requests.get(f"{url}/openapi.json", timeout=60).json()["paths"].keys() >= {"/profiles/{person}/predict", "/predict", "/enroll"}
    still_serving()
    # enrolling over a profile of another kind or base model: 409 unless told to; a corrupt profile hides nothing
    tensors, meta = ProfileStore(store).load("alice")
    ProfileStore(store).save("sam", tensors, {**meta, "kind": "speaker"})
    refused(http.post(f"{url}/profiles/sam/enroll", data=enrollment_archive(support), timeout=120), 409, "needs overwrite")
    assert http.post(f"{url}/profiles/sam/enroll", params={"overwrite": "true"}, data=enrollment_archive(support),
                     timeout=120).status_code == 200
    (Path(store) / "broken.safetensors").write_bytes(b"not a profile")
    listed = {q["person"]: q for q in http.get(f"{url}/profiles", timeout=60).json()["profiles"]}
    assert "unreadable" in listed["broken"]["error"] and listed["sam"]["kind"] == "listener" and not listed["broken"]["usable"]
    refused(http.post(f"{url}/profiles/broken/predict", data=audio, timeout=60), 400, "profile 'broken': unreadable")

    # re-enrolling a loaded profile: the next prediction uses the new one
    before = http.post(f"{url}/profiles/carol/predict", data=audio, timeout=60).json()["scores"]
    assert http.post(f"{url}/profiles/carol/enroll", data=enrollment_archive(support[:3]), timeout=120).status_code == 200
    after = http.post(f"{url}/profiles/carol/predict", data=audio, timeout=60).json()
    expected = p.classify(str(clip), profile="carol")
    assert before != after["scores"]
    assert np.allclose([s["score"] for s in after["scores"]], [s["score"] for s in expected["scores"]], atol=1e-6)


def test_the_server_binds_loopback_and_needs_a_token_to_be_exposed(monkeypatch):
    from distmeta import cli
    from distmeta.profiles.serve import start

    args = cli.parser().parse_args(["serve", "--model", "m.safetensors"])
    assert args.host == "127.0.0.1" and args.max_profiles_per_replica == 8 and args.token is None
    monkeypatch.delenv("DISTMETA_TOKEN", raising=False)
    with pytest.raises(ValueError, match="exposes the server beyond this machine: give --token"):
        start(ServeArgs(model="m.safetensors"), host="0.0.0.0", port=8000)


def test_the_builder_takes_serve_run_arguments():
    """`serve run distmeta.profiles.serve:build model=PATH max_profiles=4` hands the builder strings."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from distmeta.profiles import serve as module

    app = call_user_app_builder_with_args_if_necessary(module.build, {"model": "m.safetensors", "max_profiles": "4",
                                                                      "num_gpus": "0.5"})
    ingress = app._bound_deployment
    settings = ingress.init_args[1]
    assert settings.max_profiles == 4 and settings.num_gpus == 0.5
    replica = ingress.init_args[0]
    assert replica._bound_deployment.ray_actor_options["num_gpus"] == 0.5


def test_an_archive_cannot_name_files_outside_it_or_declare_members_without_bound():
    from distmeta.profiles.uploads import UploadLimits, archive_enrollment, tar_members

    def tar(*members, table: str | None = None, gz=False) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as t:
            for info, data in members:
                t.addfile(info, io.BytesIO(data) if data is not None else None)
            if table is not None:
                info = tarfile.TarInfo("labels.csv")
                info.size = len(table.encode())
                t.addfile(info, io.BytesIO(table.encode()))
        return out.getvalue()

    def member(name, data=b"x", kind=tarfile.REGTYPE, size=None):
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, len(data) if size is None else size
        return info, data if kind == tarfile.REGTYPE else None

    for path in ("/etc/hosts", "../secret.wav", "clips/../../secret.wav"):
        with pytest.raises(ValueError, match=r"labels.csv, line 2 .*: the path leaves the archive"):
            archive_enrollment(tar(member("a.wav"), table=f"path,labels\n{path},angry\n"))
    with pytest.raises(ValueError, match=r"line 2 \(b.wav\): no such file in the archive"):
        archive_enrollment(tar(member("a.wav"), table="path,labels\nb.wav,angry\n"))
    with pytest.raises(ValueError, match="only regular files and folders"):
        tar_members(tar(member("link", kind=tarfile.SYMTYPE)))
    with pytest.raises(ValueError, match="only regular files and folders"):
        tar_members(tar(member("dev", kind=tarfile.CHRTYPE)))
    limits = UploadLimits(max_members=5, max_member_bytes=1000, max_total_bytes=1500)
    with pytest.raises(ValueError, match="more than 5 members"):
        tar_members(tar(*[member(f"m{i}") for i in range(6)]), limits)
    with pytest.raises(ValueError, match="2000 bytes; at most 1000"):
        tar_members(tar(member("big", b"0" * 2000)), limits)
    with pytest.raises(ValueError, match="more than 1500 bytes"):
        tar_members(tar(member("a", b"0" * 900), member("b", b"0" * 900)), limits)
    # a gzip body of a header declaring far more than it holds, or of zeros, is refused within the cap
    zeros = tar(member("z", b"\x00" * 4_000_000), gz=True)
    assert len(zeros) < 20_000
    with pytest.raises(ValueError, match="4000000 bytes; at most 1000"):
        tar_members(zeros, limits)
    # a header tarfile reads whole (a pax record of 8 MB) is cut off at the cap on what a gzip body may unpack to
    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w:gz", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("a")
        info.pax_headers = {"comment": "z" * 8_000_000}
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="unpacks to more than the limit"):
        tar_members(pax.getvalue(), limits)
    # odd names are only names: x then x/y, '.', a long one
    found = tar_members(tar(member("x"), member("x/y"), member("n" * 300)))
    assert set(found) == {"x", "x/y", "n" * 300}
    with pytest.raises(ValueError, match="not a relative path"):
        tar_members(tar(member(".")))


def hostile_requests(support, audio: bytes) -> list[tuple[str, dict, int]]:
    """(path, requests kwargs, expected status) of every class of malformed request the server must refuse."""
    import gzip
    import struct

    def tar(*members) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as t:
            for name, data, kind, size in members:
                info = tarfile.TarInfo(name)
                info.type, info.size = kind, len(data) if size is None else size
                t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return out.getvalue()

    def csv_tar(table: str, *extra) -> bytes:
        return tar(("labels.csv", table.encode(), tarfile.REGTYPE, None), ("a.wav", audio, tarfile.REGTYPE, None), *extra)

    header = (b"RIFF" + struct.pack("<I", 56) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 47_999, 95_998, 2, 16)
              + b"data" + struct.pack("<I", 20) + b"\x01\x00" * 10)
    silence = io.BytesIO()
    import soundfile as sf

    sf.write(silence, np.zeros(16_000 * 600, dtype=np.float32), 16_000, format="FLAC")
    zeros = io.BytesIO()
    with gzip.GzipFile(fileobj=zeros, mode="wb") as g:
        g.write(tar(("z.wav", b"\x00" * (40 << 20), tarfile.REGTYPE, None)))
    many = tar(*[(f"e{i}", b"", tarfile.REGTYPE, None) for i in range(200)])
    return [
        ("/profiles/bob/predict", {"data": header}, 400),                                 # a rate the resampler cannot bound
        ("/profiles/bob/predict", {"data": silence.getvalue()}, 400),                     # 600 s from a 28 KB body
        ("/profiles/bob/predict", {"data": b"\x00" * (1 << 20 | 1)}, 413),                # over the body limit
        ("/profiles/bob/predict", {"data": iter([b"\x00" * 65536] * 17)}, 413),           # chunked, over the limit
        ("/profiles/bob/predict", {"data": b"RIFF garbage"}, 400),                        # not audio
        ("/profiles/zed/predict", {"data": audio}, 404),                                  # an unknown person
        ("/profiles/bad%0A/predict", {"data": audio}, 400),                               # an id with a newline
        ("/predict", {"data": audio, "headers": {HEADER: "../../etc"}}, 400),             # a path as an id
        ("/profiles/bob/predict", {"data": audio, "params": {"top_k": 0}}, 400),
        ("/profiles/eve/enroll", {"data": zeros.getvalue()}, 400),                        # gzip of zeros: 40 MB member > 32 MB
        ("/profiles/eve/enroll", {"data": many}, 400),                                    # more members than allowed
        ("/profiles/eve/enroll", {"data": csv_tar("path,labels\n/etc/hosts,angry\n")}, 400),
        ("/profiles/eve/enroll", {"data": csv_tar("path,labels\n../secret.wav,angry\n")}, 400),
        ("/profiles/eve/enroll", {"data": csv_tar("path,labels\na.wav\n")}, 400),         # a short row
        ("/profiles/eve/enroll", {"data": csv_tar("path,labels\na.wav,angry\n", ("s", b"", tarfile.GNUTYPE_SPARSE, 64 << 20))}, 400),
        ("/profiles/eve/enroll", {"data": csv_tar("path,labels\na.wav,angry\n", ("l", b"", tarfile.SYMTYPE, 0))}, 400),
        ("/profiles/eve/enroll", {"data": tar(("x", b"1", tarfile.REGTYPE, None), ("x/y", b"2", tarfile.REGTYPE, None),
                                              ("n" * 300, b"3", tarfile.REGTYPE, None))}, 400),  # odd names: no labels.csv
        ("/profiles/eve/enroll", {"files": [("clips", ("a.wav", audio))] * 2, "data": {"labels": ["angry"]}}, 400),
        ("/profiles/eve/enroll", {"data": b"--x\r\nnot a form", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400),
        ("/profiles/eve/enroll", {"data": csv_tar("path,labels\n" + "a.wav,angry\n" * 41)}, 400),  # more clips than allowed
        ("/profiles/bob/predict", {"data": audio, "headers": {"Authorization": "Bearer wrong"}}, 401),
    ]


@pytest.mark.slow
def test_hostile_requests_interleaved_with_good_ones_leave_the_server_serving_in_bounded_memory(served, small_corpus):
    """Every class of malformed request, many times over, between good predictions: each good one answered
    as the API answers, each bad one refused with its status, never a 500, and the replica's and the ingress's
    peak memory grow by less than 100 MB (the largest member an archive may hold is 32 MB)."""
    url, path, store, episode, http = served
    support = clips_of(small_corpus, episode.support, episode.support_targets)
    assert http.post(f"{url}/profiles/bob/enroll", data=enrollment_archive(support), timeout=120).status_code == 200
    p = Personalizer.from_pretrained(path, store=store)
    clip = Path(small_corpus.utterances.loc[episode.query[1], "path"])
    audio = clip.read_bytes()
    expected = p.classify(str(clip), profile="bob")
    start = http.get(f"{url}/health", timeout=60).json()
    bad = hostile_requests(support, audio)
    for round_ in range(10):
        for i, (route, kwargs, status) in enumerate(bad):
            if "headers" not in kwargs or "Authorization" not in kwargs["headers"]:
                kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), "Authorization": f"Bearer {TOKEN}"}}
            if isinstance(kwargs.get("data"), type(iter([]))):
                kwargs = {**kwargs, "data": iter([b"\x00" * 65536] * 17)}  # a fresh generator each time
            answer = requests.post(f"{url}{route}", timeout=120, **kwargs)
            assert answer.status_code == status, f"{route} #{i}: {answer.status_code} {answer.text[:300]}"
            assert "detail" in answer.json() and "/tmp" not in answer.text and " at 0x" not in answer.text
            if i % 3 == 0:
                good = http.post(f"{url}/profiles/bob/predict", data=audio, timeout=60)
                assert good.status_code == 200
                assert [s["label"] for s in good.json()["scores"]] == [s["label"] for s in expected["scores"]]
    assert not (Path(store) / "eve.safetensors").exists()
    end = http.get(f"{url}/health", timeout=60).json()
    assert end["peak_rss_mb"] - start["peak_rss_mb"] < 100 and end["ingress_peak_rss_mb"] - start["ingress_peak_rss_mb"] < 100, (start, end)
    assert http.post(f"{url}/profiles/bob/predict", data=audio, timeout=60).status_code == 200
