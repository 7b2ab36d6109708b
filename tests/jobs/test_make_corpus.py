import pandas as pd


def test_smoke_preset_writes_tables_and_prints_them(load_job, tmp_path, capsys):
    job = load_job("make_corpus")
    assert job.main(["--preset", "smoke", "--out", str(tmp_path / "out"), f"data.path={tmp_path / 'corpus'}"]) == 0
    printed = capsys.readouterr().out
    assert "Table A1" in printed and "Oracle gap" in printed
    out = tmp_path / "out"
    for name in ("config.yaml", "table_a1.csv", "table_a1.md", "table_a1.png", "oracle_gap.csv"):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "table_a1.csv", index_col=0)
    assert list(table.columns[:5]) == ["E1", "E2", "E3", "E4", "E5"]
    assert table.iloc[:9].sum().round(6).eq(100).all()
    assert "n_utterances: 300" in (out / "config.yaml").read_text()
