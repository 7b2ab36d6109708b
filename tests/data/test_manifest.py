import numpy as np
import pytest
import soundfile as sf

from distmeta.data import Corpus, CorpusError, read_manifest


@pytest.fixture
def audio_dir(tmp_path):
    wav = tmp_path / "wav"
    wav.mkdir()
    for name in ("a", "b", "c"):
        sf.write(str(wav / f"{name}.wav"), np.full(8000, 0.1), 16000)
    return tmp_path


def test_reads_rows_and_labels(audio_dir):
    (audio_dir / "m.csv").write_text(
        "utterance,path,speaker,session,annotator,labels,gender\n"
        "a,wav/a.wav,spk1,1,r1,Neutral,F\n"
        "a,wav/a.wav,spk1,1,r2,angry; Frustration,F\n"
        "b,wav/b.wav,spk2,2,r1,hap; Other,M\n"
    )
    corpus = read_manifest(audio_dir / "m.csv")
    assert corpus.utterances.loc["a", "duration"] == pytest.approx(0.5)
    assert corpus.utterances.loc["b", "gender"] == "M"
    assert corpus.utterances.loc["a", "path"] == str((audio_dir / "wav/a.wav").resolve())
    row = corpus.annotations.query("utterance == 'a' and annotator == 'r2'").iloc[0]
    assert (row["angry"], row["frustrated"], row["neutral"]) == (1, 1, 0)
    assert corpus.labels("r1").loc["b", "happy"] == 1


def test_every_problem_named_with_its_line(audio_dir):
    (audio_dir / "bad.csv").write_text(
        "utterance,path,speaker,session,annotator,labels\n"
        "a,wav/a.wav,spk1,1,r1,Neutral\n"
        "a,wav/a.wav,spk1,1,r1,Anger\n"           # line 3: same annotator twice
        "b,wav/b.wav,spk2,two,r1,sad\n"           # line 4: session not an integer
        "c,wav/c.wav,spk2,2,r2,bored\n"           # line 5: unknown label
        "d,wav/missing.wav,spk2,2,r1,fear\n"      # line 6: missing audio
        "a,wav/a.wav,spk9,1,r3,sad\n"             # line 7: disagrees on speaker
        "c,wav/c.wav,spk2,2,r4,\n"                # line 8: no label
    )
    with pytest.raises(CorpusError) as err:
        read_manifest(audio_dir / "bad.csv")
    text = "\n".join(err.value.problems)
    for expected in ("bad.csv:3: utterance 'a' annotated by 'r1' again (first on line 2)",
                     "bad.csv:4: session 'two' is not an integer",
                     "bad.csv:5: unknown emotion label 'bored'",
                     "bad.csv:7: utterance 'a' disagrees with its earlier row on speaker",
                     "bad.csv:8: no emotion label",
                     "annotator 'r2' has no labels",
                     "utterance 'd':", "missing.wav: audio file not found"):
        assert expected in text


def test_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("utterance,path,labels\n")
    with pytest.raises(CorpusError, match="missing column.*speaker, session, annotator"):
        read_manifest(tmp_path / "m.csv")


def test_saved_corpus_loads_identically(audio_dir, tmp_path):
    (audio_dir / "m.csv").write_text(
        "utterance,path,speaker,session,annotator,labels\n"
        "a,wav/a.wav,spk1,1,r1,Neutral\n"
        "b,wav/b.wav,spk1,1,r1,sad; fear\n"
    )
    corpus = read_manifest(audio_dir / "m.csv")
    corpus.save(tmp_path / "saved")
    loaded = Corpus.load(tmp_path / "saved", check_audio=True)
    assert loaded.utterances.equals(corpus.utterances)
    assert loaded.annotations.equals(corpus.annotations)
    assert not list((tmp_path / "saved").glob("*.tmp"))
