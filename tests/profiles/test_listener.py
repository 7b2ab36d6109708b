"""Listener profiles against the meta-test protocol, the Python API's inputs and output shape, profiles that
travel, and the `distmeta` command round trip on generated audio."""

import json
import shutil
import threading

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from distmeta import cli
from distmeta.data.audio import load_audio
from distmeta.labels import CLASSES
from distmeta.listener.adapters import meta_adapter
from distmeta.meta.learner import query_probs
from distmeta.models import UpstreamConfig
from distmeta.profiles.listener import ListenerBase, read_labelled
from distmeta.profiles.personalizer import Personalizer
from distmeta.profiles.store import ProfileConflict, ProfileStore


def label_text(targets) -> list[str]:
    return [";".join(c for c, v in zip(CLASSES, t) if v > 0.5) for t in targets]


@pytest.mark.parametrize("test_adapt", ["finetune", "rates"])
def test_enrolling_the_support_of_an_episode_gives_the_protocols_predictions(small_corpus, trained, tmp_path, test_adapt):
    from dataclasses import replace

    split, path, state, episode = trained
    p = Personalizer.from_pretrained(path, store=tmp_path / "store")  # meta settings from the sidecar; each rule in turn
    p.base.config = replace(p.base.config, test_adapt=test_adapt)
    protocol = meta_adapter("Meta-PerSER", small_corpus, split, UpstreamConfig(), state, p.base.config, None).predict(episode)
    support = [small_corpus.utterances.loc[u, "path"] for u in episode.support]
    profile = p.enroll(support, label_text(episode.support_targets), person="alice")
    paths = [small_corpus.utterances.loc[u, "path"] for u in episode.query]
    # features are batch-invariant (features.PooledBank; padded conv features, models/upstream.py), so the
    # pool's and a lone clip's are the same
    assert np.allclose(p.probabilities(p.read(paths), profile), protocol, atol=1e-5)
    assert np.allclose(p.probabilities(p.read(paths), "alice"), protocol, atol=1e-5)  # as saved in the store
    meta = profile.meta
    assert meta["shots"] == 8 and meta["base"] == p.digest and meta["classes"] == list(CLASSES) and meta["adapt"] == test_adapt
    head = {name for name in profile.tensors if name.startswith("head.")}
    assert (head == set(profile.tensors)) == (test_adapt == "rates")  # finetune moves the upstream too
    bank = p.base.bank({u: load_audio(u) for u in paths})
    assert not np.allclose(query_probs(p.base.meta, bank, paths).numpy(), protocol, atol=1e-3)  # the profile moved them

    # the output shape: Hugging Face's sorted [{label, score}], top_k of them; a list of clips gives a list
    one = p.predict(paths[0], profile=profile, top_k=3)
    order = np.argsort(-protocol[0])[:3]
    assert [r["label"] for r in one] == [CLASSES[i] for i in order]
    assert np.allclose([r["score"] for r in one], protocol[0][order], atol=1e-5)
    many = p.predict(paths[:2], profile=profile)
    assert len(many) == 2 and len(many[1]) == len(CLASSES)
    record = p.classify(paths[0], profile=profile)
    assert record["labels"] == [c for c, v in zip(CLASSES, protocol[0]) if v > 1 / len(CLASSES)]


def test_clips_as_paths_bytes_or_samples_give_the_same_profile(small_corpus, trained, tmp_path):
    _, path, _, episode = trained
    p = Personalizer.from_pretrained(path)
    files = [small_corpus.utterances.loc[u, "path"] for u in episode.support]
    labels = label_text(episode.support_targets)
    samples = [sf.read(f, dtype="float32")[0] for f in files]
    by_path = p.enroll(files, labels)
    by_bytes = p.enroll([open(f, "rb").read() for f in files], [lab.split(";") for lab in labels])  # labels as lists
    by_samples = p.enroll(samples, labels, sample_rate=16_000)
    for other in (by_bytes, by_samples):
        assert all(np.allclose(by_path.tensors[k].numpy(), other.tensors[k].numpy(), atol=1e-6) for k in by_path.tensors)
    # 8 kHz samples are resampled to 16 kHz, as a file at 8 kHz would be
    low = p.predict(samples[0][::2], sample_rate=8_000)
    sf.write(tmp_path / "low.wav", samples[0][::2], 8_000, subtype="FLOAT")
    assert np.allclose([r["score"] for r in low], [r["score"] for r in p.predict(str(tmp_path / "low.wav"))], atol=1e-6)
    with pytest.raises(ValueError, match="need their sample_rate"):
        p.predict(samples[0])
    with pytest.raises(ValueError, match="clip 1: unknown emotion label 'grumpy'"):
        p.enroll(samples[:2], ["angry", "grumpy"], sample_rate=16_000)


def test_profiles_travel_and_are_written_whole(small_corpus, trained, tmp_path):
    _, path, _, episode = trained
    files = [small_corpus.utterances.loc[u, "path"] for u in episode.support]
    labels = label_text(episode.support_targets)
    p = Personalizer.from_pretrained(path, store=tmp_path / "store")
    p.enroll(files, labels, person="alice")
    assert sorted(q.name for q in (tmp_path / "store").iterdir()) == ["alice.safetensors", "bases"]  # one file a profile
    clip = files[0]
    expected = p.predict(clip, profile="alice")

    # another machine: the store and the model copied elsewhere, the old paths gone
    shutil.copytree(tmp_path / "store", tmp_path / "moved")
    shutil.copy(path, tmp_path / "model.safetensors")
    shutil.copy(path.with_suffix(".json"), tmp_path / "model.json")
    (tmp_path / "moved" / "bases" / f"{p.digest}.json").write_text(json.dumps({"digest": p.digest, "where": "/gone/model.safetensors"}))
    tensors, meta = ProfileStore(tmp_path / "moved").load("alice")
    ProfileStore(tmp_path / "moved").save("alice", tensors, {**meta, "base_path": "/gone/model.safetensors",
                                                             "base_source": "/gone/model.safetensors"})
    with pytest.raises(FileNotFoundError, match=f"base model {p.digest}, which is not where it was"):
        Personalizer.for_profile("alice", tmp_path / "moved")  # neither the store's record nor the saved path holds it
    moved = Personalizer.for_profile("alice", tmp_path / "moved", model=tmp_path / "model.safetensors")
    assert moved.predict(clip, profile="alice") == expected
    # the store's record of where the base model is now
    ProfileStore(tmp_path / "moved").remember_base(p.digest, "listener", str(tmp_path / "model.safetensors"))
    assert Personalizer.for_profile("alice", tmp_path / "moved").predict(clip, profile="alice") == expected

    # two enrollments of one person at once leave one whole profile, one of the two
    people = {"a": (files[:4], labels[:4]), "b": (files[4:], labels[4:])}
    made = {k: p.enroll(*v) for k, v in people.items()}
    threads = [threading.Thread(target=p.enroll, args=(*v, "carol")) for v in people.values() for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    tensors, _ = ProfileStore(tmp_path / "store").load("carol")
    assert any(all(np.allclose(tensors[k].numpy(), m.tensors[k].numpy()) for k in tensors) for m in made.values())
    assert not [q for q in (tmp_path / "store").iterdir() if q.name.startswith(".")]  # no temporary file left

    # over a profile of another kind or base model only when told to
    store = ProfileStore(tmp_path / "store")
    tensors, meta = store.load("alice")
    store.save("speakerbob", tensors, {**meta, "kind": "speaker"})
    with pytest.raises(ProfileConflict, match="is a speaker profile"):
        p.enroll(files, labels, person="speakerbob")
    p.enroll(files, labels, person="speakerbob", overwrite=True)
    assert store.meta("speakerbob")["kind"] == "listener"


def test_command_round_trip_with_a_corrupt_and_a_missing_file(small_corpus, trained, tmp_path, capsys, labels_csv):
    split, path, _, episode = trained
    store = ["--store", str(tmp_path / "store")]  # each subcommand takes it
    labels_csv(tmp_path / "alice.csv", small_corpus, episode.support, episode.support_targets)
    labels_csv(tmp_path / "bob.csv", small_corpus, episode.support[:3], episode.support_targets[:3])
    assert cli.main(["enroll", *store, "--model", str(path), "--person", "alice", str(tmp_path / "alice.csv")]) == 0
    with pytest.warns(UserWarning, match="3 clips"):
        assert cli.main(["enroll", *store, "--model", str(path), "--person", "bob", str(tmp_path / "bob.csv")]) == 0
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not audio")
    good = [small_corpus.utterances.loc[u, "path"] for u in episode.query[:4]]
    with open(tmp_path / "files.csv", "w") as f:
        f.write("path\n" + "\n".join([*good, str(tmp_path / "corrupt.wav"), str(tmp_path / "missing.wav")]) + "\n")
    capsys.readouterr()
    code = cli.main(["predict", *store, "--profile", "alice", str(tmp_path / "files.csv"), "--output", str(tmp_path / "out.csv"),
                     "--top-k", "3"])
    assert code == 1  # some files failed; the others were predicted
    rows = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(rows.columns) == ["path", "label", "score", "label_2", "score_2", "label_3", "score_3", "labels", "profile",
                                  "base", "error"]
    assert list(rows["path"]) == [*good, str(tmp_path / "corrupt.wav"), str(tmp_path / "missing.wav")]
    assert (rows["error"][:4] == "").all() and rows["error"][4] and rows["error"][5] and (rows["profile"] == "alice").all()
    # the same files in process, with the same profile: the command is the API's records
    p = Personalizer.from_pretrained(path, store=tmp_path / "store")
    expected = [p.classify(f, profile="alice", top_k=3) for f in good]
    assert [list(rows.loc[i, ["label", "label_2", "label_3"]]) for i in range(4)] == [[s["label"] for s in e["scores"]] for e in expected]
    assert np.allclose(rows.loc[:3, ["score", "score_2", "score_3"]].astype(float).to_numpy(),
                       [[s["score"] for s in e["scores"]] for e in expected], atol=1e-6)
    assert list(rows["labels"][:4]) == [";".join(e["labels"]) for e in expected]
    assert cli.main(["predict", *store, "--profile", "alice", str(tmp_path / "missing.wav")]) == 1  # every file failed
    failed = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out), keep_default_na=False)
    assert list(failed["path"]) == [str(tmp_path / "missing.wav")] and failed["error"][0] and list(failed.columns)[-1] == "error"
    # --model with --profile; JSONL records are the API's
    assert cli.main(["predict", *store, "--profile", "alice", "--model", str(path), *good[:2], "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    alone = p.classify(good[0], profile="alice")
    assert [row["path"] for row in lines] == good[:2] and [s["label"] for s in lines[0]["scores"]] == [s["label"] for s in alone["scores"]]
    assert np.allclose([s["score"] for s in lines[0]["scores"]], [s["score"] for s in alone["scores"]], atol=1e-6)
    assert cli.main(["predict", *store, "--model", str(path), good[0], "--format", "jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == ""

    assert cli.main(["profiles", *store, "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "bob" in listed and "K=3" in listed
    assert cli.main(["profiles", *store, "delete", "bob"]) == 0
    assert cli.main(["profiles", *store, "show", "bob"]) == 2  # gone, said by name
    assert "no profile 'bob'" in capsys.readouterr().err
    for bad in ("../x", "alice\n"):  # ids are matched whole
        assert cli.main(["enroll", *store, "--model", str(path), "--person", bad, str(tmp_path / "alice.csv")]) == 2
    # a corrupt profile is listed with its error and hides nothing
    (tmp_path / "store" / "broken.safetensors").write_bytes(b"not a profile")
    assert cli.main(["profiles", *store, "list"]) == 0
    listed = capsys.readouterr().out
    assert "broken\tprofile 'broken': unreadable" in listed and "alice\tlistener" in listed


def test_bad_labels_name_the_line(tmp_path):
    (tmp_path / "labels.csv").write_text("path,labels\na.wav,angry\nb.wav,grumpy\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 3: unknown emotion label 'grumpy'"):
        read_labelled(tmp_path / "labels.csv")
    (tmp_path / "short.csv").write_text("path,labels\na.wav,angry\nb.wav\n")  # a short row
    with pytest.raises(ValueError, match=r"short.csv, line 3: no value for labels"):
        read_labelled(tmp_path / "short.csv")


def test_the_console_script_is_installed(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "distmeta"  # pyproject's [project.scripts], installed by ./setup.sh
    done = subprocess.run([str(script), "profiles", "list", "--store", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == ""


def test_a_listener_base_loads_on_a_named_device(trained):
    base = ListenerBase.load(trained[1], device="cpu")
    assert {p.device.type for p in base.meta.parameters()} == {"cpu"}
    with pytest.raises(RuntimeError):
        ListenerBase.load(trained[1], device="nodevice")
