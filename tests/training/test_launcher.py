"""The launcher's sharing of requests among Ray Train runs side by side."""

from distmeta.training.launcher import share_out


def request(name: str, init: str = "") -> dict:
    return {"out_path": name, "init": init, "settings": {}}


def test_requests_are_dealt_in_turn_and_a_model_joins_the_run_of_the_model_it_starts_from():
    todo = [request("a"), request("b", init="a"), request("c"), request("d", init="c"), request("e"), request("f", init="saved")]
    shares = share_out(todo, 2)
    assert [[r["out_path"] for r in share] for share in shares] == [["a", "b", "e"], ["c", "d", "f"]]
    assert share_out(todo, 1) == [todo]
    assert [len(share) for share in share_out(todo[:1], 3)] == [1]  # never an empty run
