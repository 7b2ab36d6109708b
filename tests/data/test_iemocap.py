import numpy as np
import pytest
import soundfile as sf

from distmeta.data import CorpusError, read_iemocap
from distmeta.labels import CLASSES

IMPRO = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral state;\t()
C-E3:\tFrustration; Anger;\t(a bit annoyed, not really angry)
C-F1:\tNeutral state;\t(curious)
A-E3:\tval 3; act 2; dom  2;\t()

[10.0100 - 11.3925]\tSes01F_impro01_M001\tfru\t[2.0000, 3.0000, 3.5000]
C-E2:\tOther;\t(sarcastic)
C-E4:\tFrustration; Other;\t()
C-M1:\tExcited;\t()
C-E3:\tHappiness;\t()
"""
SCRIPT = """[1.0000 - 3.5000]\tSes01F_script01_1_F000\texc\t[4.0, 4.0, 3.0]
C-E1:\tExcited; Happiness;\t(joy in her voice)
C-E2:\tSurprise;\t()
C-E3:\tFear; Sadness; Disgust;\t()
"""


def write_fixture(root, impro=IMPRO, script=SCRIPT):
    evaluation = root / "Session1" / "dialog" / "EmoEvaluation"
    evaluation.mkdir(parents=True)
    (evaluation / "Ses01F_impro01.txt").write_text(impro)
    (evaluation / "Ses01F_script01_1.txt").write_text(script)
    for utt in ("Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses01F_script01_1_F000"):
        dialog = utt.rsplit("_", 1)[0]
        wav = root / "Session1" / "sentences" / "wav" / dialog / f"{utt}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(wav), np.full(1600, 0.1), 16000)
    return root


def labels_of(corpus, utt, annotator):
    row = corpus.annotations.query("utterance == @utt and annotator == @annotator")
    assert len(row) == 1, (utt, annotator)
    return {c for c in CLASSES if row.iloc[0][c] == 1}


def test_reads_categorical_evaluations(tmp_path):
    corpus = read_iemocap(write_fixture(tmp_path / "IEMOCAP_full_release"))
    utts = corpus.utterances
    assert list(utts.index) == ["Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses01F_script01_1_F000"]
    assert utts.loc["Ses01F_impro01_M001", "speaker"] == "Ses01M"
    assert utts.loc["Ses01F_impro01_F000", "duration"] == pytest.approx(8.2357 - 6.2901)
    assert utts.loc["Ses01F_script01_1_F000", "path"].endswith(
        "Session1/sentences/wav/Ses01F_script01_1/Ses01F_script01_1_F000.wav")
    assert labels_of(corpus, "Ses01F_impro01_F000", "C-E2") == {"neutral"}
    assert labels_of(corpus, "Ses01F_impro01_F000", "C-E3") == {"frustrated", "angry"}
    assert labels_of(corpus, "Ses01F_impro01_F000", "Ses01F") == {"neutral"}  # C-F1: the female actor
    assert labels_of(corpus, "Ses01F_impro01_M001", "Ses01M") == {"excited"}  # C-M1: the male actor
    assert labels_of(corpus, "Ses01F_impro01_M001", "C-E4") == {"frustrated"}  # Other dropped
    assert labels_of(corpus, "Ses01F_script01_1_F000", "C-E3") == {"fear", "sad", "disgust"}
    # "Other" alone leaves no class: that annotation is dropped, not kept empty
    assert corpus.annotations.query("utterance == 'Ses01F_impro01_M001' and annotator == 'C-E2'").empty
    assert corpus.info["dropped_other_only"] == 1
    assert sorted(corpus.annotators) == ["C-E1", "C-E2", "C-E3", "C-E4", "Ses01F", "Ses01M"]


def test_all_problems_reported_together(tmp_path):
    bad = IMPRO.replace("Excited;", "Elated;").replace("C-E3:\tHappiness;", "C-E9:\tOther;")
    root = write_fixture(tmp_path / "IEMOCAP_full_release", impro=bad)
    (root / "Session1/sentences/wav/Ses01F_script01_1/Ses01F_script01_1_F000.wav").unlink()
    with pytest.raises(CorpusError) as err:
        read_iemocap(root)
    problems = err.value.problems
    assert any("Ses01F_impro01.txt:12" in p and "Elated" in p for p in problems)
    assert any("'C-E9' has no labels" in p for p in problems)
    assert any("'Ses01M' has no labels" in p for p in problems)  # its only label was the unknown one
    assert any("Ses01F_script01_1_F000" in p and "not found" in p for p in problems)
    assert len(problems) == 4


def test_not_an_iemocap_root(tmp_path):
    with pytest.raises(CorpusError, match="IEMOCAP_full_release"):
        read_iemocap(tmp_path)
