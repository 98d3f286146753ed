"""What the steering tables take is known before they are allocated: logged at start-up, and a
worker refuses to start, naming the flags to change, when they would not fit."""

from __future__ import annotations

import logging

import psutil
import pytest
import torch

from steering.hook import SAESteering, TokenIndex, table_bytes
from steering.worker import Steerer
from tests.helpers import Model
from tests.saes import make_sae


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", ["jumprelu", "topk", "standard"])
def test_table_bytes_is_what_the_hook_allocates(tmp_path, architecture, dtype):
    sae = make_sae(tmp_path, architecture, "none")
    hook = SAESteering(sae, TokenIndex.zeros(8), rows=5, width=3, dtype=dtype)
    assert table_bytes(sae, 5, 3, dtype) == sum(b.nbytes for b in hook.buffers())


def test_a_worker_logs_its_tables_and_refuses_tables_that_do_not_fit(tmp_path, monkeypatch, caplog):
    sae = make_sae(tmp_path, "jumprelu", "none")
    args = (Model(), [("j", str(sae.path))])
    kwargs = {"rows": 9, "width": 4, "max_num_tokens": 16, "device": torch.device("cpu")}
    with caplog.at_level(logging.INFO, logger="steerserve.worker"):
        Steerer(*args, **kwargs)
    assert f"steering tables: {table_bytes(sae, 9, 4, torch.float32) / 2**20:.1f} MiB" in caplog.text

    class Full:
        available = table_bytes(sae, 9, 4, torch.float32) - 1

    monkeypatch.setattr(psutil, "virtual_memory", Full)
    with pytest.raises(RuntimeError, match="--max-features-per-sae.*--max-steered-requests or --max-num-seqs"):
        Steerer(*args, **kwargs)
