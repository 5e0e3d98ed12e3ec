"""The memory plan (``fff_lightning.backends.memory_plan``): the plan chosen for each card, more memory never gives
a slower plan, the model of the peak against the GPU cells it was fitted to, ``budget --memory``, and a capped
``fit`` running the plan it printed (CUDA faked: CI has no GPU; docs/benchmarks.md has the GPU runs)."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from fff_lightning import memory
from fff_lightning.adapters import count_adapters
from fff_lightning.backends import memory_plan as mp
from fff_lightning.errors import ConfigError
from fff_lightning.run_config import describe_run

STEP = 3 * 2048  # the research's batch: 3 rows of up to 2048 tokens
RUNS = {
    "step2": ("step2", []),
    "step2_lora": ("step2_lora", []),
    "lora_r16": ("step2_lora", ["--model.lora.preset", "lora"]),
    "fff_only": ("step2", ["--model.lora", "null", "--model.fff.width", "81"]),  # the bench's case d
}


def layout(name: str) -> mp.Layout:
    config, overrides = RUNS[name]
    run = describe_run(config, overrides=overrides).model
    shape = run.base_shape()
    trainable = count_adapters(run.adapters, shape).trainable
    return mp.layout_of(shape, run.adapters, trainable, run.optim["name"], run.base.load_in_4bit)


@pytest.fixture(scope="module")
def layouts():
    return {name: layout(name) for name in RUNS}


# (run, usable GiB) -> (checkpointed layers of 32, FFF recomputed), or None: nothing fits.
EXPECTED = [
    ("step2", 5.5, None),
    ("step2", 7.5, (31, True)),
    ("step2", 11.5, (25, False)),
    ("step2", 15.5, (20, False)),
    ("step2", 23.0, (13, True)),
    ("step2", 138.0, (0, False)),
    ("step2_lora", 5.5, None),
    ("step2_lora", 7.5, (31, False)),
    ("step2_lora", 23.0, (9, False)),
    ("step2_lora", 138.0, (0, False)),
    ("lora_r16", 5.5, None),
    ("lora_r16", 7.5, (30, False)),
    ("lora_r16", 138.0, (0, False)),
]


@pytest.mark.parametrize("run, cap, expected", EXPECTED)
def test_the_plan_chosen_for_each_card(layouts, run, cap, expected):
    if expected is None:
        with pytest.raises(mp.NoPlanFits) as e:
            mp.choose(layouts[run], STEP, cap)
        assert e.value.smallest.needs_gib() > cap
        return
    plan = mp.choose(layouts[run], STEP, cap)
    assert (plan.checkpointed, plan.recompute_fff) == expected, plan.describe()
    assert plan.needs_gib() <= cap


@pytest.mark.parametrize("run", list(RUNS))
def test_more_memory_never_gives_a_slower_plan(layouts, run):
    times, caps = [], [x / 4 for x in range(16, 4 * 140)]
    for cap in caps:
        try:
            times.append(mp.choose(layouts[run], STEP, cap).time)
        except mp.NoPlanFits:
            assert not times, f"{cap} GiB fits nothing although less did"
    assert times and all(b <= a for a, b in zip(times, times[1:], strict=False))
    assert times[-1] == 1.0  # a whole H200: no checkpointing at all


# GPU cells: (run, checkpointed layers, FFF recomputed, measured peak GiB): one H200, random-weight Mistral-7B nf4
# through Unsloth, 3 rows of ~2,000 tokens (6,015 tokens a step); docs/benchmarks.md, "The memory plan".
MEASURED = [
    ("step2", 32, False, 7.47),
    ("step2", 32, True, 6.69),
    ("step2", 31, True, 6.69),
    ("step2", 25, False, 10.41),
    ("step2", 24, False, 11.06),
    ("step2", 16, True, 17.87),
    ("step2", 12, True, 21.69),
    ("step2", 0, True, 29.60),
    ("step2", 0, False, 35.02),
    ("step2", 16, False, 21.02),
    ("step2_lora", 32, False, 6.52),
    ("step2_lora", 31, False, 6.53),
    ("lora_r16", 32, False, 5.80),
    ("lora_r16", 0, False, 26.24),
    ("fff_only", 32, False, 6.45),
]


@pytest.mark.parametrize("run, k, recompute, measured", MEASURED)
def test_the_predicted_peak_is_within_10_percent_of_the_gpu_cells(layouts, run, k, recompute, measured):
    predicted = mp.peak_bytes(layouts[run], 6015, k, recompute, mp.UNSLOTH) / mp.GIB
    assert predicted == pytest.approx(measured, rel=0.10)


def test_a_bigger_step_or_more_layers_kept_never_needs_less(layouts):
    lay = layouts["step2"]
    peaks = [mp.peak_bytes(lay, STEP, k, False, mp.UNSLOTH) for k in range(0, 32)]
    assert all(b <= a for a, b in zip(peaks, peaks[1:], strict=False))  # checkpointing more layers saves memory
    assert mp.peak_bytes(lay, 2 * STEP, 16, True, mp.UNSLOTH) > mp.peak_bytes(lay, STEP, 16, True, mp.UNSLOTH)


def test_the_largest_step_that_fits(layouts):
    lay = layouts["lora_r16"]
    fit = mp.largest_fitting_tokens(lay, 5.5, STEP)
    assert 0 < fit < STEP and fit % 64 == 0
    mp.choose(lay, fit, 5.5)  # fits
    with pytest.raises(mp.NoPlanFits):
        mp.choose(lay, fit + 64, 5.5)
    assert mp.largest_fitting_tokens(lay, 3.0, STEP) == 0  # the weights alone are more


def test_planned_base_sets_the_run_checkpointing():
    base = describe_run("step2").model.base
    plan = lambda k, r: mp.Plan(k, r, 1.0, 1.0, layers=32)  # noqa: E731
    none = memory.planned_base(base, plan(0, False))
    assert (none.gradient_checkpointing, none.checkpoint_layers, none.recompute_fff) == (False, None, False)
    some = memory.planned_base(base, plan(20, True))
    assert (some.gradient_checkpointing, some.checkpoint_layers, some.recompute_fff) == (True, 20, True)
    every = memory.planned_base(base, plan(32, False))
    assert (every.gradient_checkpointing, every.checkpoint_layers) == (True, None)


def test_budget_memory_dry_run(capsys):
    from fff_lightning.cli import main

    main(["budget", "--config", "step2", "--memory", "8"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(
        "memory plan on a card of 8 GB (7.5 GiB usable), steps of up to 6,144 tokens: first 31 of 32"
    )
    assert "FFF stacks recomputed, predicted peak" in line
    main(["budget", "--config", "step2", "--memory", "6,8,141", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["fits"] for r in rows] == [False, True, True]
    assert rows[0]["needs_gib"] > 5.5 and rows[2]["plan"] == "no checkpointing"


def test_budget_memory_that_nothing_fits_is_one_line_with_what_would(capsys):
    from fff_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main(["budget", "--config", "step2_lora", "--model.lora.preset", "lora", "--memory", "6"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert e.value.code == 2 and len(err) == 1, err
    assert "no memory plan fits 5.50 GiB with steps of 6,144 tokens" in err[0]
    assert "a card of 7 GB" in err[0] and "steps of up to 2," in err[0]
    for bad in ("0", "x", "-3"):
        with pytest.raises(SystemExit):
            main(["budget", "--config", "step2", "--memory", bad])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(err) == 1 and err[0].startswith("error: --memory: card sizes in GB"), err


def test_a_capped_fit_runs_the_plan_it_prints(monkeypatch, capsys):
    """``setup`` plans from the prepared data's largest step and loads with the plan's checkpointing."""
    described = describe_run("step2")
    module = described.model
    lengths = [2000, 1990, 2048, 100, 50]

    class Rows:
        def lengths(self):
            return lengths

    dm = described.datamodule  # as its setup leaves it: two batches of rows of these lengths
    dm.prepared, dm.train_set, dm.train_batches, dm.val_names = ["ready"], Rows(), [[0, 1, 2], [3, 4]], ["d"]
    data = dm.plan()
    assert (data.largest_step_tokens, data.steps_per_epoch, data.val_names) == (3 * 2048, 2, ("d",))
    assert data.worst_step_tokens == dm.batch_size * dm.opts.max_seq_length and not data.packing
    module._trainer = None
    monkeypatch.setattr(type(module), "trainer", property(lambda self: SimpleNamespace(is_global_zero=True)))
    monkeypatch.setattr("fff_lightning.backends.resolve", lambda name: "unsloth")
    module._plan_memory(7.5, data)
    out = capsys.readouterr().out
    assert out.startswith("memory plan: 7.50 GiB -> first 31 of 32 layers checkpointed") and "6,144 tokens" in out
    assert (module.loaded_base.checkpoint_layers, module.loaded_base.recompute_fff) == (31, True)
    assert module.base == described.model.plan.base  # the run's config is not rewritten
    assert module.memory_plan.checkpointed == 31
    with pytest.raises(ConfigError, match="no memory plan fits 4.00 GiB"):
        module._plan_memory(4.0, data)


def test_other_backends_get_no_plan():
    run = describe_run("step2").model
    shape = run.base_shape()
    assert memory.plan(run.base, run.adapters, shape, 1, "adamw_8bit", STEP, 7.5, "hf") is None


def test_packed_rows_attended_per_document_need_more_and_one_call_rows_none(layouts):
    """Packed rows that attend one SDPA call per document keep the documents' joined outputs and expanded K/V in
    every layer that keeps its activations; one varlen call per row keeps what full rows keep."""
    lay = layouts["step2"]
    per_doc = replace(lay, packed_segments=True)
    for k in (0, 12, 31):
        full = mp.peak_bytes(lay, STEP, k, True, mp.UNSLOTH)
        extra = mp.peak_bytes(per_doc, STEP, k, True, mp.UNSLOTH) - full
        kept = 32 - k  # layers that keep their activations hold the term; the checkpointed one rebuilding holds it
        assert extra == pytest.approx(mp.UNSLOTH.segments * 2 * 4096 * STEP * max(kept, 1), rel=0.01)
    assert mp.choose(per_doc, STEP, 23.0).checkpointed > mp.choose(lay, STEP, 23.0).checkpointed
    # The one GPU cell of it (issue 31, an H100): step 2 packed in rows of 6,144, no checkpointing, per document
    assert mp.peak_bytes(lay, STEP, 0, False, mp.UNSLOTH) / mp.GIB == pytest.approx(35.40, abs=0.01)
    assert mp.peak_bytes(per_doc, STEP, 0, False, mp.UNSLOTH) / mp.GIB == pytest.approx(38.66, rel=0.01)


def test_a_packed_fit_plans_for_the_attention_it_will_run(monkeypatch, capsys):
    """With packing, the plan counts the per-document attention's memory unless packed rows take one call."""
    from fff_lightning.backends import packed_attention

    described = describe_run("step2", overrides=["--data.packing", "true", "--data.tokens_per_batch", "6144"])
    module = described.model
    data = SimpleNamespace(step_tokens=6144, packing=True)
    module._trainer = None
    monkeypatch.setattr(type(module), "trainer", property(lambda self: SimpleNamespace(is_global_zero=True)))
    monkeypatch.setattr("fff_lightning.backends.resolve", lambda name: "unsloth")
    chosen = {}
    for flash in (True, False):
        monkeypatch.setattr(packed_attention, "flash_kernel_available", lambda device=None, ok=flash: ok)
        module._plan_memory(23.0, data)
        out = capsys.readouterr().out
        assert ("packed rows attended one call per document" in out) is not flash
        chosen[flash] = module.memory_plan
    assert chosen[False].checkpointed > chosen[True].checkpointed  # per-document attention needs more room
    module.base.packed_attention = "segments"  # asked for: planned for, whatever the GPU has
    monkeypatch.setattr(packed_attention, "flash_kernel_available", lambda device=None: True)
    module._plan_memory(23.0, data)
    assert module.memory_plan == chosen[False]
