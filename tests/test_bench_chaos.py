"""A short chaos run against a real server: every fault kind once, and nothing good is lost."""

from __future__ import annotations

from qwen_image_trt.bench.chaos import FAULTS, ChaosConfig, render_markdown, run_chaos


def test_short_chaos_run_loses_no_good_request_and_no_accepted_job(tiny_checkpoint, tmp_path):
    lines = []
    cfg = ChaosConfig(str(tiny_checkpoint), fault_s=42, calm_s=5, fault_every_s=6, clients=4, out=str(tmp_path),
                      on_progress=lines.append)
    r = run_chaos(cfg)
    assert {kind for _, kind, _ in r["faults"]} == set(FAULTS), r["faults"]
    assert r["lost_good_requests"] == 0 and r["jobs"]["lost"] == 0, r
    assert r["phases"]["calm"]["answered"] > 0 and r["phases"]["faults"]["answered"] > 0
    assert r["bad_inputs"]["surrogate"] == {"400": 3} and r["bad_inputs"]["nested"] == {"400": 1}
    assert r["bad_inputs"]["poison"] == {"500": 3} and r["bad_inputs"]["wedge"] == {"500": 1}
    assert any('qitrt_jobs_restored_total' in line and not line.endswith(" 0.0")
               for line in r["server_metrics_after_restart"]), r["server_metrics_after_restart"]
    text = render_markdown(r, "qitrt bench chaos ...", "test machine")
    assert "Good requests lost: 0" in text and "lost 0" in text
