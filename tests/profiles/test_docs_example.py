"""The Python example that opens docs/use.md runs as written: against `models:/distmeta-listener/1` of a
store where a meta-trained model is registered, in a folder holding the clips it names."""

import re
import shutil
from pathlib import Path

USE = Path(__file__).parents[2] / "docs" / "use.md"


def test_the_python_example_in_the_docs_runs_as_written(registered, trained, small_corpus, tmp_path, monkeypatch, capsys):
    import mlflow

    _, uri = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DISTMETA_HOME", str(tmp_path / "home"))  # its profile store
    mlflow.set_tracking_uri(uri)
    example = re.search(r"## From Python\n.*?```python\n(.*?)```", USE.read_text(), re.S).group(1)
    paths = list(small_corpus.utterances["path"][:4])
    (tmp_path / "alice").mkdir()
    for i, path in enumerate(paths[:3], start=1):
        shutil.copy(path, tmp_path / "alice" / f"{i}.wav")
    shutil.copy(paths[3], tmp_path / "clip.wav")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example, str(USE), "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("[{'label': ")
    assert (tmp_path / "home" / "profiles" / "alice.safetensors").is_file()
    batch, record = scope["batch"], scope["record"]
    assert len(batch) == 2 and [s["label"] for s in batch[1]] == [s["label"] for s in record["scores"]]
    assert set(record["labels"]) <= {s["label"] for s in record["scores"]}
    # the profile finds its base model again from the registry URI it was enrolled from
    from distmeta import Personalizer

    found = Personalizer.for_profile("alice")
    assert found.source == "models:/distmeta-listener/1" and found.digest == scope["p"].digest
