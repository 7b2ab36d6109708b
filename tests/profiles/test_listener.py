"""Listener profiles against the meta-test protocol, and the `distmeta` command round trip on generated audio."""

import io
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from distmeta import cli
from distmeta.labels import CLASSES
from distmeta.listener.adapters import meta_adapter
from distmeta.meta.learner import query_probs
from distmeta.models import UpstreamConfig
from distmeta.profiles.listener import ListenerBase, enroll, read_labelled
from distmeta.profiles.store import ProfileStore

@pytest.mark.parametrize("test_adapt", ["finetune", "rates"])
def test_enrolling_the_support_of_an_episode_gives_the_protocols_predictions(small_corpus, trained, tmp_path, labels_csv,
                                                                             test_adapt):
    split, path, state, episode = trained
    base = ListenerBase.load(path)  # the meta settings come from the model's sidecar; each adaptation rule in turn
    base.config = replace(base.config, test_adapt=test_adapt)
    protocol = meta_adapter("Meta-PerSER", small_corpus, split, UpstreamConfig(), state, base.config, None).predict(episode)
    labels_csv(tmp_path / "labels.csv", small_corpus, episode.support, episode.support_targets)
    adapted, meta = enroll(base, read_labelled(tmp_path / "labels.csv"))
    paths = [small_corpus.utterances.loc[u, "path"] for u in episode.query]
    from distmeta.data.audio import load_audio

    bank = base.bank({p: load_audio(p) for p in paths})
    # features are batch-invariant (features.PooledBank; padded conv features, models/upstream.py), so the
    # pool's and a lone clip's are the same
    assert np.allclose(query_probs(base.meta, bank, paths, adapted).numpy(), protocol, atol=1e-5)
    assert meta["shots"] == 8 and meta["base"] == base.digest and meta["classes"] == list(CLASSES)
    assert meta["adapt"] == test_adapt
    head = {name for name in adapted if name.startswith("head.")}
    assert (head == set(adapted)) == (test_adapt == "rates")  # finetune moves the upstream too
    unpersonalized = query_probs(base.meta, bank, paths).numpy()
    assert not np.allclose(unpersonalized, protocol, atol=1e-3)  # the profile is what moved them


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
    code = cli.main(["predict", *store, "--profile", "alice", str(tmp_path / "files.csv"), "--output", str(tmp_path / "out.csv")])
    assert code == 1  # some files failed; the others were predicted
    rows = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(rows["path"]) == [*good, str(tmp_path / "corrupt.wav"), str(tmp_path / "missing.wav")]
    assert (rows["error"][:4] == "").all() and rows["error"][4] and rows["error"][5]
    assert np.allclose(rows.loc[:3, list(CLASSES)].astype(float).sum(axis=1), 1, atol=1e-5) and (rows["profile"] == "alice").all()
    # the same files in process, with the same profile
    adapted, _ = ProfileStore(tmp_path / "store").load("alice")
    base = ListenerBase.load(path)
    from distmeta.data.audio import load_audio

    expected = query_probs(base.meta, base.bank({p: load_audio(p) for p in good}), good, adapted).numpy()
    assert np.allclose(rows.loc[:3, list(CLASSES)].astype(float).to_numpy(), expected, atol=1e-5)
    assert cli.main(["predict", *store, "--profile", "alice", str(tmp_path / "missing.wav")]) == 1  # every file failed
    failed = pd.read_csv(io.StringIO(capsys.readouterr().out), keep_default_na=False)
    assert list(failed["path"]) == [str(tmp_path / "missing.wav")] and failed["error"][0] and list(failed.columns)[-1] == "error"
    assert cli.main(["predict", *store, "--model", str(path), *good[:2], "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["path"] for row in lines] == good[:2] and all(row["profile"] == "" for row in lines)

    assert cli.main(["profiles", *store, "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "bob" in listed and "K=3" in listed
    assert cli.main(["profiles", *store, "delete", "bob"]) == 0
    assert cli.main(["profiles", *store, "show", "bob"]) == 2  # gone, said by name
    assert "no profile 'bob'" in capsys.readouterr().err
    assert cli.main(["enroll", *store, "--model", str(path), "--person", "../x", str(tmp_path / "alice.csv")]) == 2


def test_bad_labels_name_the_line(tmp_path):
    (tmp_path / "labels.csv").write_text("path,labels\na.wav,angry\nb.wav,grumpy\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 3: unknown emotion label 'grumpy'"):
        read_labelled(tmp_path / "labels.csv")


def test_the_console_script_is_installed(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "distmeta"  # pyproject's [project.scripts], installed by ./setup.sh
    done = subprocess.run([str(script), "profiles", "list", "--store", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == ""
