"""train.profile_steps / train.profile_ranks: a torch.profiler trace of a window of steps, on chosen ranks."""
import json

from train_fixtures import base_overrides, build_dataset, train


def test_profile_window_on_one_rank_of_tp2_labels_each_step_and_closes_when_the_run_stops_inside(tmp_path):
    """TP=2 over 2 gloo ranks, 3 steps, window [2,5] on rank 1 only: rank 1 writes a Chrome trace with
    one range per profiled step (2 and 3: the run stops inside the window) and its TP collectives, and
    an operator table; rank 0 writes nothing."""
    data = build_dataset(tmp_path / "data")
    run = tmp_path / "run"
    res = train(base_overrides(data, run, **{"parallel.tensor": 2, "train.max_steps": 3,
                                             "train.profile_steps": "[2,5]", "train.profile_ranks": "[1]"}), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "profile of steps 2-5 (rank 1)" in res.stdout, res.stdout[-2000:]
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["rank_1.json", "rank_1_ops.txt"]
    events = json.loads((run / "profile" / "rank_1.json").read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"train_step_2", "train_step_3"} <= names and not {"train_step_1", "train_step_4"} & names
    assert any("allreduce" in n or "all_reduce" in n for n in names), sorted(names)[:50]
    assert "aten::" in (run / "profile" / "rank_1_ops.txt").read_text()
