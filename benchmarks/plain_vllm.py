"""Plain `vllm serve`: the same engine with no steerserve plugin loaded (the baseline)."""

import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_PLUGINS"] = ""  # an allowlist naming nothing: neither steerserve plugin loads
    from server.cli import cpu_binding, run_vllm_serve

    os.environ.update(cpu_binding(sys.argv[1:]))  # the cores steerserve's engine gets
    run_vllm_serve(sys.argv[1:])
