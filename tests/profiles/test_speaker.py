"""Speaker profiles: the speech LM reads a profile's pairs exactly as the tables' evaluation reads enrollment
pairs; the `distmeta` command round trip with --kind speaker; bad pair files and kinds named."""

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from distmeta import cli, tracking
from distmeta.data.audio import load_audio
from distmeta.data.speakers import speaker_view
from distmeta.data.synthetic import SpeakerCorpusConfig, make_speaker_corpus
from distmeta.features import FrameBank
from distmeta.models.speech_lm import SpeechLM, SpeechLMConfig
from distmeta.models.upstream import UpstreamConfig
from distmeta.profiles.mlflow_model import log_model
from distmeta.profiles.personalizer import Personalizer, load_base
from distmeta.profiles.speaker import read_pairs
from distmeta.speaker import metaicl
from distmeta.speaker.episodes import Episode, episode_batch


@pytest.fixture(scope="module")
def speech_lm(tmp_path_factory):
    """A small speaker corpus and a speech LM saved as jobs/metaicl_train.py saves one (weights: its seed's)."""
    folder = tmp_path_factory.mktemp("speaker")
    corpus = make_speaker_corpus(folder / "corpus", SpeakerCorpusConfig(n_speakers=4, per_emotion=2, workers=1), progress=False)
    data = speaker_view(corpus)
    upstream = UpstreamConfig(name="fbank")
    frames = FrameBank.load(metaicl.frame_bank(corpus, upstream, -1, folder / "models"))  # what the job computes
    config = SpeechLMConfig()
    torch.manual_seed(1)
    model = SpeechLM(config, frames.dim, data.words)
    path = folder / "speech_lm-test-TU_LU.safetensors"
    save_file(metaicl.trainable_state(model), str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "settings": {"upstream": asdict(upstream), "encoder_layer": -1, "model": asdict(config)},
        "encoder_dim": frames.dim, "words": list(data.words), "best_step": 1}))
    return corpus, data, frames, path


def pairs_csv(path, corpus, task, indices, words):
    rows = [f"{corpus.utterances.loc[task.utterances[i], 'path']},{words[task.labels[i]]}" for i in indices]
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return path


def test_a_profile_is_read_like_the_tables_enrollment_pairs(speech_lm, tmp_path):
    corpus, data, frames, path = speech_lm
    p = Personalizer.from_pretrained(path)
    task = data.splits["train"][0]
    shots, targets = [3, 0, 9], [1, 5, 12]
    pairs = read_pairs(pairs_csv(tmp_path / "pairs.csv", corpus, task, shots, data.words), p.labels)
    profile = p.enroll([clip for clip, _ in pairs], [word for _, word in pairs])
    meta = profile.meta
    assert meta["kind"] == "speaker" and meta["shots"] == 3 and meta["labels"] == [data.words[task.labels[i]] for i in shots]
    for i, shot in enumerate(shots):  # encoded once, as the job's frames
        assert torch.allclose(profile.tensors[f"pair/{i}"], frames.items[task.utterances[shot]], atol=1e-6)
    rows = p.classify([corpus.utterances.loc[task.utterances[t], "path"] for t in targets], profile)

    model = metaicl.load_speech_lm(path).eval()  # the evaluation's way: episode_batch + closed-set scores
    episodes = [Episode(task, t, shots) for t in targets]
    with torch.no_grad():
        expected = torch.softmax(model.score(*episode_batch(model, frames, episodes, data.words)), -1).numpy()
    assert np.allclose([[{s["label"]: s["score"] for s in row["scores"]}[w] for w in data.words] for row in rows], expected, atol=1e-5)
    assert [row["scores"][0]["label"] for row in rows] == [data.words[i] for i in expected.argmax(1)]
    assert "labels" not in rows[0]  # one label a clip: no multi-label decision
    # without a profile the speech LM reads no pairs
    alone = p.predict(corpus.utterances.loc[task.utterances[1], "path"])
    with torch.no_grad():
        zero = torch.softmax(model.score(*episode_batch(model, frames, [Episode(task, 1, [])], data.words)), -1).numpy()[0]
    assert np.allclose([{s["label"]: s["score"] for s in alone}[w] for w in data.words], zero, atol=1e-5)


def test_speaker_command_round_trip_and_bad_input(speech_lm, tmp_path, capsys):
    corpus, data, _, path = speech_lm
    task = data.splits["train"][1]
    store = ["--store", str(tmp_path / "store")]
    pairs = pairs_csv(tmp_path / "sam.csv", corpus, task, [0, 2, 4, 6], data.words)
    assert cli.main(["enroll", *store, "--kind", "speaker", "--model", str(path), "--person", "sam", str(pairs)]) == 0
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in (1, 3):
        (clips / f"{i}.wav").write_bytes(open(corpus.utterances.loc[task.utterances[i], "path"], "rb").read())
    (clips / "broken.wav").write_bytes(b"RIFF broken")
    assert cli.main(["predict", *store, "--profile", "sam", str(clips), "--output", str(tmp_path / "out.csv")]) == 1
    rows = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(rows["path"].map(lambda p: p.split("/")[-1])) == ["1.wav", "3.wav", "broken.wav"]
    assert set(rows["label"][:2]) <= set(data.words) and rows["error"][2] and (rows["profile"] == "sam").all()
    scores = [c for c in rows.columns if c.startswith("score")]
    assert len(scores) == len(data.words) and "labels" not in rows  # every word, sorted; no multi-label decision
    assert np.allclose(rows.loc[:1, scores].astype(float).sum(axis=1), 1, atol=1e-5)
    capsys.readouterr()
    # more pairs than the speech LM reads, a label it does not know, the wrong kind: refused by name
    eight = pairs_csv(tmp_path / "eight.csv", corpus, task, range(8), data.words)
    assert cli.main(["enroll", *store, "--model", str(path), "--person", "eve", str(eight)]) == 2
    assert "8 enrollment pairs" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("path,label\nx.wav,Boredom\n")
    assert cli.main(["enroll", *store, "--model", str(path), "--person", "eve", str(tmp_path / "bad.csv")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli.main(["enroll", *store, "--kind", "listener", "--model", str(path), "--person", "eve", str(pairs)]) == 2
    assert "is a speaker model" in capsys.readouterr().err


def test_a_speech_lm_on_the_speech_encoder_reads_the_encoder_registered_beside_it(speech_lm, tmp_path, monkeypatch):
    """`models:/distmeta-speaker/N` holds the speech LM and its pretrained encoder in one folder: the encoder
    is found there even when the path in the LM's settings (the training machine's models_dir) is not."""
    import shutil

    from distmeta.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig
    from distmeta.training.artifacts import save_model

    corpus, data, _, _ = speech_lm
    torch.manual_seed(2)
    encoder = SpeechEncoder(SpeechEncoderConfig(dim=32, heads=2, ffn_dim=64)).eval()
    registered = tmp_path / "registered"
    save_model(registered / "speech_encoder-abc.safetensors", encoder.state_dict(), {"encoder": asdict(encoder.config)})
    config = SpeechLMConfig()
    model = SpeechLM(config, 32, data.words)
    save_file(metaicl.trainable_state(model), str(registered / "speech_lm-x-TU_LU.safetensors"))
    upstream = UpstreamConfig(name="speech_encoder", path="/elsewhere/models/speech_encoder-abc.safetensors")
    (registered / "speech_lm-x-TU_LU.json").write_text(json.dumps({
        "settings": {"upstream": asdict(upstream), "encoder_layer": -1, "model": asdict(config)},
        "encoder_dim": 32, "words": list(data.words), "best_step": 1}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    files = [registered / "speech_lm-x-TU_LU.safetensors", registered / "speech_lm-x-TU_LU.json",
             *sorted(registered.glob("speech_encoder-*"))]
    with tracking.run("speaker-registry-test", "run", {}):  # as jobs/metaicl_train.py registers its model
        version = log_model(files, "distmeta-speaker")
    wav = load_audio(corpus.utterances["path"].iloc[0])
    for where in (registered / "speech_lm-x-TU_LU.safetensors", f"models:/distmeta-speaker/{version}"):
        base = load_base(where)
        assert torch.allclose(base.frames({"a": wav}).items["a"], encoder([wav])["hidden_states"][-1][0], atol=1e-5)
    shutil.move(str(registered / "speech_encoder-abc.safetensors"), str(tmp_path / "gone.safetensors"))
    with pytest.raises(FileNotFoundError, match="/elsewhere/models/speech_encoder-abc"):
        load_base(registered / "speech_lm-x-TU_LU.safetensors")


def test_a_speaker_enrollment_archive_is_what_a_replica_enrolls(speech_lm, tmp_path):
    """POST /profiles/ID/enroll to a speech LM's server: the archive's labels.csv has a `label` column, one word
    a clip, read in order; the replica enrolls what `archive_enrollment` reads, as the API enrolls the files."""
    from distmeta.profiles.uploads import archive_enrollment, enrollment_archive

    corpus, data, _, path = speech_lm
    task = data.splits["train"][2]
    pairs = [(corpus.utterances.loc[task.utterances[i], "path"], data.words[task.labels[i]]) for i in (0, 3, 5)]
    clips, labels, names = archive_enrollment(enrollment_archive(pairs, column="label"))
    assert labels == [w for _, w in pairs] and names[0].startswith("labels.csv, line 2 (clips/0")
    p = Personalizer.from_pretrained(path)
    served = p.enroll(clips, labels, names=names)
    direct = p.enroll([c for c, _ in pairs], [w for _, w in pairs])
    assert served.meta["labels"] == direct.meta["labels"]
    assert all(torch.equal(served.tensors[k], direct.tensors[k]) for k in direct.tensors)
    with pytest.raises(ValueError, match=r"labels.csv, line 2 \(clips/0.wav\): label 'Boredom' is not one of"):
        p.enroll(*archive_enrollment(enrollment_archive([(pairs[0][0], "Boredom")], column="label"))[:2],
                 names=archive_enrollment(enrollment_archive([(pairs[0][0], "Boredom")], column="label"))[2])
