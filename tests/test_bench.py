"""The bench and the memory accounting, on a tiny model: exact figures, not timings."""
import json

import pytest
import torch
from conftest import tiny_batch, tiny_model
from torch import nn

from fedfar.bench import run_bench
from fedfar.devices.flops import count_flops
from fedfar.models import load_model, random_batch
from fedfar.cli import main
from fedfar.methods import get_policy
from fedfar.methods.far import ffn_sizes, random_learners, reconfigure
from fedfar.devices.memory import account, adamw_state_bytes, optimizer_state_bytes, saved_tensor_bytes


def test_saved_tensors_count_shared_storage_once_and_parameters_never():
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):  # both matmuls save x (one storage) and the weight (a parameter)
            return self.lin(x) + self.lin(x)

    assert saved_tensor_bytes(Twice(), {"x": x}) == 5 * 4 * 4


def test_adamw_state_formula_matches_a_real_optimizer():
    model = tiny_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable)
    model(**tiny_batch()).loss.backward()
    opt.step()
    assert optimizer_state_bytes(opt) == adamw_state_bytes(trainable)


def test_bfloat16_preactivation_saves_exactly_half_of_the_frozen_branch():
    batch = tiny_batch(batch_size=3, seq_len=7)
    figures = {}
    for storage in ("float32", "bfloat16", "recompute"):
        model = tiny_model()
        reconfigure(model, random_learners(ffn_sizes(model), 0.25, seed=0), get_policy("paper"), storage)
        figures[storage] = account(model, batch)
    tokens, frozen_nodes, blocks = 3 * 7, 64 - 16, 2
    assert figures["float32"].saved_tensor_bytes - figures["bfloat16"].saved_tensor_bytes == tokens * frozen_nodes * 2 * blocks
    assert figures["bfloat16"].saved_tensor_bytes - figures["recompute"].saved_tensor_bytes == tokens * frozen_nodes * 2 * blocks
    assert figures["float32"].weights_bytes == figures["recompute"].weights_bytes


def test_bench_rows_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    main(["bench", "--model", "random:bert-tiny", "--methods", "full,far10-emb,bitfit", "--repeats", "2",
          "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [r["method"] for r in rows] == ["full", "far10-emb", "bitfit"]
    for r in rows:
        assert {"method", "step_time_s", "peak_training_bytes", "saved_tensor_bytes", "trainable_params"} <= set(r)
        assert r["peak_training_bytes"] == r["weights_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"] + r["saved_tensor_bytes"]
        assert len(r["step_times_s"]) == 2
    full, far, bitfit = rows
    assert full["time_ratio"] == 1.0 and full["trainable_params"] == full["total_params"]
    assert far["peak_training_bytes"] < full["peak_training_bytes"]
    assert bitfit["trainable_params"] < far["trainable_params"] < full["trainable_params"]
    assert "far10-emb" in capsys.readouterr().out
    # FLOPs are exact: full fine-tuning's backward is twice its forward for every matmul; FAR does the same
    # forward and skips the frozen weights' gradients.
    model = load_model("random:bert-tiny", 2, seed=0)
    with count_flops() as counter, torch.no_grad():
        model(**random_batch(model, 4, 16))
    forward = counter.get_total_flops()
    assert full["step_flops"] == 3 * forward and full["flops_ratio"] == 1.0
    assert 2 * forward < far["step_flops"] < full["step_flops"]


def test_bench_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="far<retention"):
        run_bench("random:bert-tiny", ["full", "lora"], repeats=1, warmup=0)
