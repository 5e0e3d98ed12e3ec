"""``model.base.max_memory_gib``: bad values are one line before anything loads; a cap is applied to the process's
allocator on its own device (CUDA faked here: CI has no GPU; docs/benchmarks.md has the GPU runs)."""

from types import SimpleNamespace

import pytest
import torch

from fff_lightning import memory
from fff_lightning.errors import ConfigError
from fff_lightning.spec import BaseModelConfig

GIB = 1 << 30


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "big"])
def test_bad_limits_are_refused_by_the_config(value):
    with pytest.raises(ConfigError, match="model.base.max_memory_gib"):
        BaseModelConfig(max_memory_gib=value)


@pytest.fixture
def fake_gpu(monkeypatch):
    """An 8 GiB GPU with 6 GiB free; records the fraction the allocator is capped at."""
    capped = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * GIB, 8 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=8 * GIB))
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: capped.append((f, device))
    )
    return capped


def test_a_cap_is_applied_on_the_process_device(fake_gpu):
    gpu = torch.device("cuda", 1)
    memory.apply(memory.resolve(7.5, gpu), gpu)
    assert fake_gpu == [(7.5 / 8, gpu)]
    assert memory.resolve("auto", gpu) == pytest.approx(6 - memory.MARGIN_GIB)
    assert memory.resolve(None, gpu) is None
    memory.apply(None, gpu)
    assert len(fake_gpu) == 1  # no cap: the allocator is left alone


def test_more_than_the_device_has_is_refused(fake_gpu):
    with pytest.raises(ConfigError, match=r"9 GiB is more than cuda:0 has \(8.0 GiB\)"):
        memory.resolve(9, torch.device("cuda", 0))
    assert fake_gpu == []


def test_on_a_cpu_auto_is_no_cap_and_a_number_is_one_line_before_the_work(tmp_path, capsys):
    assert memory.resolve("auto", torch.device("cpu")) is None
    from fff_lightning.cli import main

    argv = ["fit", "--config", "tiny", "--logs_dir", str(tmp_path), "--model.base.max_memory_gib", "7.5"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: model.base.max_memory_gib: caps GPU memory"), err
    assert not (tmp_path / "tiny").exists()  # no run folder left, nor the experiment folder it made
