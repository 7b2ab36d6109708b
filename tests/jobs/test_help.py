"""Every job's --help names every flag it accepts, those it reads before argparse included."""

import pytest

OWN_FLAGS = {"meta_train": ["--resume"], "tune": ["--space"], "pretrain": [], "metaicl_train": [], "make_corpus": []}


@pytest.mark.parametrize("name", sorted(OWN_FLAGS))
def test_help_lists_every_flag_and_the_presets(load_job, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_job(name).main(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for flag in ["--config", "--preset", "--out", "--print-config", *OWN_FLAGS[name]]:
        assert flag in shown, (name, flag)
    assert "smoke" in shown and "default" in shown  # the preset files of configs/<job>/
