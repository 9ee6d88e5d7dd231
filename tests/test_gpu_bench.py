"""bench/gpu.sh --tiny runs end to end on the CPU (tiny configs), so the GPU bench does not
fail on first contact with a GPU; its summary holds every figure it promises."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_tiny_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh"), "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert "| truncate | compile |" in (tmp_path / "gpu.md").read_text()
    modes = {m["mode"]: m for m in result["modes"]}
    assert set(modes) == {"whole", "truncate"}
    s = result["settings"]
    # whole rollouts run every step of every trajectory; truncated ones k + 1 <= T per trajectory
    assert modes["whole"]["rollout_unet_rows"] == s["batch"] * s["rollout_steps"]
    assert s["batch"] <= modes["truncate"]["rollout_unet_rows"] < modes["whole"]["rollout_unet_rows"]
    for m in modes.values():
        assert m["seconds_per_micro_step"] > 0 and m["rollout_s"] > 0 and m["train_s"] > 0 and m["tflops"] > 0
    assert modes["whole"]["flops"]["unet_row"] > 0 and modes["whole"]["flops"]["dro_micro_step"] > 0
    assert result["inference_images_per_s"] > 0 and result["scorer_images_per_s"] > 0
