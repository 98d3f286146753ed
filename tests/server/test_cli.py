"""`steerserve serve` refuses, before any engine starts, what cannot work, and says why."""

from __future__ import annotations

import subprocess

from core.local import serve_command
from tests.saes import make_sae


def test_serve_refuses_sae_that_does_not_fit_the_model(tmp_path, model_dir):
    sae = make_sae(tmp_path, "jumprelu", "none")  # d_in 12, the model's hidden size is 576
    result = subprocess.run(
        serve_command("--model", str(model_dir), "--sae", f"small={sae.path}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "cfg.json: d_in 12 does not match the model's hidden size 576" in result.stderr
