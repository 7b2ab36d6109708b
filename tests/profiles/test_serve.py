"""`distmeta serve`: real HTTP requests on loopback to the Ray Serve application, three profiles, LRU eviction
at two per replica, and the 404 / 400 / 413 answers each followed by a request that still succeeds."""

import socket
from pathlib import Path

import numpy as np
import pytest
import requests

from distmeta.labels import CLASSES
from distmeta.profiles.listener import ListenerBase, predict
from distmeta.profiles.serve import enrollment_archive
from distmeta.profiles.store import ProfileStore

HEADER = "serve_multiplexed_model_id"


@pytest.fixture(scope="module")
def served(trained, small_corpus, tmp_path_factory, ray_local):
    from ray import serve

    from distmeta.profiles.serve import start

    _, path, _, episode = trained
    store = tmp_path_factory.mktemp("store")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        url = start(str(path), store, host="127.0.0.1", port=port, max_profiles=2, max_body_mb=1.0)
        yield url, path, store, episode
    finally:
        serve.shutdown()


def clips_of(corpus, ids, targets) -> list[tuple[str, str]]:
    return [(corpus.utterances.loc[u, "path"], ";".join(c for c, v in zip(CLASSES, t) if v > 0.5)) for u, t in zip(ids, targets)]


@pytest.mark.slow
def test_served_profiles_answer_like_the_command_and_the_server_survives_bad_requests(served, small_corpus):
    url, path, store, episode = served
    base = ListenerBase.load(path)
    health = requests.get(f"{url}/health", timeout=60).json()
    assert health["base"] == base.digest and health["loaded"] == []

    # three listeners enrolled over HTTP, from archives of their labelled clips
    support = clips_of(small_corpus, episode.support, episode.support_targets)
    people = {"alice": support, "bob": support[:6], "carol": support[2:]}
    for person, clips in people.items():
        answer = requests.post(f"{url}/enroll", params={"person": person}, data=enrollment_archive(clips), timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["shots"] == len(clips) and answer.json()["base"] == base.digest
    listed = requests.get(f"{url}/profiles", timeout=60).json()["profiles"]
    assert sorted(p["person"] for p in listed) == sorted(people) and all(p["usable"] for p in listed)

    # each served prediction equals the in-process one (what `distmeta predict` computes)
    clip = Path(small_corpus.utterances.loc[episode.query[0], "path"])
    audio = clip.read_bytes()
    for person in ["", *people]:
        answer = requests.post(f"{url}/predict", data=audio, headers={HEADER: person} if person else {}, timeout=60)
        assert answer.status_code == 200, answer.text
        adapted = ProfileStore(store).load(person)[0] if person else None
        expected = predict(base, [clip], adapted)[0]
        served_probs = answer.json()["probabilities"]
        assert np.allclose([served_probs[c] for c in CLASSES], [expected[c] for c in CLASSES], atol=1e-6)
        assert answer.json()["labels"] == [c for c in expected["labels"].split(";") if c] and answer.json()["profile"] == person
    # two profiles per replica: alice, the least recently used, was evicted; asking for her loads her again
    health = requests.get(f"{url}/health", timeout=60).json()
    assert health["loaded"] == ["bob", "carol"] and health["loads"] == {"alice": 1, "bob": 1, "carol": 1}
    assert requests.post(f"{url}/predict", data=audio, headers={HEADER: "alice"}, timeout=60).status_code == 200
    health = requests.get(f"{url}/health", timeout=60).json()
    assert health["loaded"] == ["alice", "carol"] and health["loads"]["alice"] == 2

    def still_serving():
        answer = requests.post(f"{url}/predict", data=audio, headers={HEADER: "bob"}, timeout=60)
        assert answer.status_code == 200 and set(answer.json()["probabilities"]) == set(CLASSES)

    # an unknown profile: 404
    answer = requests.post(f"{url}/predict", data=audio, headers={HEADER: "zed"}, timeout=60)
    assert answer.status_code == 404 and "no profile 'zed'" in answer.json()["error"]
    still_serving()
    # unreadable audio: 400 with the reason, naming the request body and not a temporary file
    answer = requests.post(f"{url}/predict", data=b"RIFF\x00\x00 not audio at all", headers={HEADER: "bob"}, timeout=60)
    assert answer.status_code == 400 and "request body" in answer.json()["error"] and "/tmp" not in answer.json()["error"]
    still_serving()
    # a body over the limit (1 MB here): 413
    answer = requests.post(f"{url}/predict", data=b"\x00" * (1024 * 1024 + 1), headers={HEADER: "bob"}, timeout=60)
    assert answer.status_code == 413
    still_serving()
    # bad enrollments: 400, nothing written
    answer = requests.post(f"{url}/enroll", params={"person": "dave"}, data=b"not a tar", timeout=60)
    assert answer.status_code == 400 and "tar" in answer.json()["error"]
    answer = requests.post(f"{url}/enroll", params={"person": "dave"}, data=enrollment_archive([(support[0][0], "boredom")]), timeout=60)
    assert answer.status_code == 400 and answer.json()["error"].startswith("labels.csv, line 2: ")  # named as in the archive
    answer = requests.post(f"{url}/enroll", params={"person": "../evil"}, data=enrollment_archive(support), timeout=60)
    assert answer.status_code == 400 and "profile id" in answer.json()["error"]
    assert sorted(p["person"] for p in ProfileStore(store).list()) == sorted(people)
    assert requests.get(f"{url}/nowhere", timeout=60).status_code == 404
    still_serving()

    # re-enrolling a loaded profile: the next prediction uses the new one
    before = requests.post(f"{url}/predict", data=audio, headers={HEADER: "carol"}, timeout=60).json()["probabilities"]
    assert requests.post(f"{url}/enroll", params={"person": "carol"}, data=enrollment_archive(support[:3]), timeout=120).status_code == 200
    after = requests.post(f"{url}/predict", data=audio, headers={HEADER: "carol"}, timeout=60).json()["probabilities"]
    expected = predict(base, [clip], ProfileStore(store).load("carol")[0])[0]
    assert not np.allclose(list(before.values()), list(after.values()), atol=1e-6)
    assert np.allclose([after[c] for c in CLASSES], [expected[c] for c in CLASSES], atol=1e-6)


def test_the_server_binds_loopback_unless_told(tmp_path):
    from distmeta import cli

    args = cli.parser().parse_args(["serve", "--model", "m.safetensors"])
    assert args.host == "127.0.0.1" and args.max_profiles_per_replica == 8
