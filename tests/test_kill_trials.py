"""One kill trial through experiments.kill_trials: a SIGKILL inside an asynchronous checkpoint
save, a restart that resumes from the newest committed step, and final adapters equal to an
uninterrupted run's within 1e-6. The full campaign (10 trials) is in docs/results/kill_trials/."""
from experiments.kill_trials import run_campaign


def test_a_kill_inside_a_save_resumes_and_matches_the_reference(tmp_path):
    s = run_campaign(trials=1, steps=8, ckpt_every=2, seed=1, workdir=str(tmp_path / "kt"),
                     out=str(tmp_path / "report"), kinds=[["save"]], log=lambda *_: None)
    t = s["trials"][0]
    assert t["pass"], t["problems"]
    assert t["kills"] == 1 and t["max_param_diff"] <= 1e-6
    assert t["resumed_from"][0] in (0, 2, 4, 6)  # a committed step (or a fresh start)
    if t["kill_hit_save"][0]:  # never the step whose save was cut
        assert t["resumed_from"][0] < t["cut_save_steps"][0][0]
    assert (tmp_path / "report" / "kill_trials.md").exists()
