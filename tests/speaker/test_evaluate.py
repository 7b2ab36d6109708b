"""k-shot evaluation: the conditions Tables II-IV need."""


from distmeta.speaker import evaluate


def test_conditions_cover_the_papers_tables():
    config = evaluate.EvaluationConfig(max_lo_shots=4)
    main = evaluate.conditions("TU+LU", 7, 7, config)
    assert ("", "", 0) in main and ("TO+LD", "", 7) in main and ("TU+LD", "", 6) in main and ("TU+LD", "", 7) not in main
    for setting in ("TU+LU", "TE+LD", "TE+LU"):
        assert {k for s, _, k in main if s == setting} == set(range(1, 7))
    assert {k for s, e, k in main if s == "TU+LO" and e == "*"} == {1, 2, 3, 4}
    ablation = evaluate.conditions("Neutral", 7, 7, config)
    assert {(s, e) for s, e, _ in ablation} == {("TU+LD", ""), ("TO+LD", ""), ("TU+LO", "neutral")}
    assert evaluate.conditions("stage1", 7, 7, config) == [("", "", 0)]
