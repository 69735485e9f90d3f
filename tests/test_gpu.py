"""Training on a CUDA GPU with a device's budget enforced by the allocator (fedfar.devices.gpu).

This machine has no GPU: the tests marked `cuda` are skipped here and run where torch sees one. What runs here
is everything that must hold without a GPU: the fraction, the errors, and the CPU path being left untouched.
"""
import os
import re

import pytest
import torch

from conftest import ListLoader, tiny_batch, tiny_model
from fedfar.federation.config import RunConfig
from fedfar.methods import parse_method
from fedfar.devices.gpu import BudgetExceeded, memory_fraction, on_device, resolve_device
from fedfar.train import TrainConfig, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
MIB = 2**20


def test_memory_fraction_is_the_budget_share_of_the_gpu_capped_at_one():
    assert memory_fraction(1 << 30, 4 << 30) == 0.25
    assert memory_fraction(8 << 30, 4 << 30) == 1.0  # a device bigger than the GPU: the GPU is the limit
    with pytest.raises(ValueError, match="must be positive"):
        memory_fraction(0, 4 << 30)


def test_device_names_are_validated_with_the_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'tpu': choose one of cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device 'gpu': choose cpu or cuda"):
        RunConfig.from_flower({"device": "gpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error_before_anything_starts(capsys):
    from fedfar.cli import main
    from fedfar.federation.processes import process_tree

    with pytest.raises(RuntimeError, match="sees no CUDA GPU.*Set device='cpu'"):
        resolve_device("cuda")
    for argv, message in (
        (["--set", "device=cuda", "--gpus-per-client", "0.5"], "device 'cuda': torch .* sees no CUDA GPU"),
        (["--set", "device=cuda"], "device 'cuda' with --gpus-per-client 0: clients train on a GPU only with both"),
        (["--gpus-per-client", "0.5"], "device 'cpu' with --gpus-per-client 0.5"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "configs/tiny.toml", "--supernodes", "2", *argv])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert not process_tree(os.getpid()) - {os.getpid()}  # no SuperLink, no Ray


def test_on_the_cpu_training_is_untouched_and_reports_no_gpu_figures():
    torch.manual_seed(0)
    a, b = tiny_model(), tiny_model()
    batch = tiny_batch()
    cfg = TrainConfig(lr=1e-3)
    with on_device(a, torch.device("cpu"), budget_bytes=1) as usage:  # no allocator to cap on the CPU
        train(a, ListLoader([batch] * 2), parse_method("full"), 1.0, cfg)
    train(b, ListLoader([batch] * 2), parse_method("full"), 1.0, cfg)
    assert usage.figures() == {}
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@cuda
def test_a_gpu_budget_below_the_step_raises_budget_exceeded_and_frees_the_gpu():
    model = tiny_model(hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    batch = tiny_batch(batch_size=32, seq_len=128)
    try:
        with on_device(model, torch.device("cuda"), budget_bytes=4 * MIB):
            train(model, ListLoader([batch]), parse_method("full"), 1.0, TrainConfig(lr=1e-3))
    except BudgetExceeded as err:
        usage = err.usage
    else:
        pytest.fail("a full training step of this model fitted under a 4 MiB cap")
    assert usage.budget_bytes == 4 * MIB
    assert usage.peak_bytes <= 4 * MIB
    assert next(model.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated() == 0  # once handled, the failed step's tensors are gone


@cuda
def test_a_gpu_budget_above_the_step_trains_like_the_cpu_and_measures_its_peak():
    torch.manual_seed(0)
    gpu, cpu = tiny_model(), tiny_model()
    batch = tiny_batch()
    usage = {}
    for model, device in ((gpu, "cuda"), (cpu, "cpu")):
        with on_device(model, torch.device(device), budget_bytes=512 * MIB) as usage[device]:
            train(model, ListLoader([batch] * 2), parse_method("far25-emb"), 1.0, TrainConfig(lr=1e-3),
                  learners=[torch.arange(16)] * 2)
    assert 0 < usage["cuda"].peak_bytes <= 512 * MIB
    assert usage["cuda"].figures() == {"enforced-budget-bytes": 512 * MIB,
                                       "measured-peak-bytes": usage["cuda"].peak_bytes}
    assert next(gpu.parameters()).device.type == "cpu"
    for (name, pg), pc in zip(gpu.state_dict().items(), cpu.state_dict().values()):
        torch.testing.assert_close(pg, pc, rtol=1e-4, atol=1e-5, msg=name)
