"""The pieces `retnet train` and `retnet compare` share (retnet.train.step), checked against
computations that do not use them, and proof that both features train through the one step."""

import json
import math

import numpy as np
import pytest
import torch
from tqdm import tqdm

from helpers import tiny_model, tokens
from retnet.compare import CompareConfig, build_models
from retnet.data import PackedWindows
from retnet.model import RetNetLM
from retnet.ops import CHUNKWISE, Form
from retnet.train import (
    Diverged,
    Schedule,
    TrainConfig,
    micro_batches,
    train,
    train_step,
    validation_loss,
)
from retnet.train import distributed as dist
from retnet.train import step as step_module
from retnet.train.distributed import Context

CPU = Context(rank=0, world=1, device=torch.device("cpu"))


def loss_of(model):
    return lambda ids, targets: model(ids, targets=targets).loss


def test_schedule_warms_up_then_decays_to_the_floor():
    s = Schedule(lr=2.0, steps=20, warmup=4, min_lr_ratio=0.25)
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert s.lr_at(4) == pytest.approx(2.0) and s.lr_at(20) == pytest.approx(0.5)
    # cosine at a quarter of the decay: floor + (peak − floor)·(1 + cos(π/4))/2
    assert s.lr_at(8) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2)
    assert Schedule(2.0, 20, 4, 0.25, "linear").lr_at(12) == pytest.approx(0.5 + 1.5 * 0.5)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def batch(self, seed, step, rows, rank=0, world=1):
        self.calls.append((seed, step, rows, rank, world))
        return torch.full((rows, 3), step)


def test_micro_batches_are_the_steps_windows_on_this_rank():
    windows = Recorder()
    batches = micro_batches(windows, 7, 2, 4, 3, Context(rank=1, world=2, device=CPU.device))
    assert windows.calls == [(7, 6, 4, 1, 2), (7, 7, 4, 1, 2), (7, 8, 4, 1, 2)]
    assert [int(b[0, 0]) for b in batches] == [6, 7, 8]
    micro_batches(windows, 7, 5, 4)  # one process, no accumulation: window `step` itself
    assert windows.calls[-1] == (7, 5, 4, 0, 1)


def test_validation_loss_is_the_token_mean_over_all_windows():
    model = tiny_model(torch.float64).train()
    batches = [tokens(3, 17, seed=1), tokens(1, 17, seed=2)]  # unequal rows: weighted by rows
    got = validation_loss(model, batches, loss_of=loss_of(model))
    rows = torch.cat(batches)
    with torch.no_grad():
        logits = model.eval()(rows[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    assert got == pytest.approx(expected.item(), rel=1e-12)
    model.train()
    validation_loss(model, batches, loss_of=loss_of(model))
    assert model.training  # put back in training mode


def test_a_non_finite_gradient_stops_before_the_optimiser_step():
    model = tiny_model(torch.float64).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.embed.weight.register_hook(lambda grad: torch.full_like(grad, math.nan))
    with pytest.raises(Diverged, match="gradient norm became nan") as stop:
        train_step(model, optimizer, [tokens(2, 9)], 0.25, loss_of=loss_of(model), ctx=CPU)
    assert stop.value.what == "gradient norm" and isinstance(stop.value, ValueError)
    assert optimizer.param_groups[0]["lr"] == 0.25  # the step's rate was set
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rank0_outcome_in_one_process_is_the_error_itself():
    assert dist.rank0_outcome(CPU, None) is None
    assert dist.rank0_outcome(CPU, "disk full") == "disk full"


def test_train_config_form_and_checks():
    assert TrainConfig().form == Form("parallel")
    chunked = TrainConfig(**TrainConfig.form_fields(Form("chunkwise", 16)))
    assert chunked.form == Form("chunkwise", 16)
    assert TrainConfig(**TrainConfig.form_fields(CHUNKWISE)).form == CHUNKWISE
    with pytest.raises(ValueError, match="invalid device 'gpu0'; use cpu, cuda"):
        TrainConfig(device="gpu0")
    with pytest.raises(ValueError, match="--chunk-size must be an integer ≥ 1; got 0"):
        TrainConfig(mode="chunkwise", chunk_size=0)
    with pytest.raises(ValueError, match="invalid --mode 'recurrent'; use one of parallel"):
        TrainConfig(mode="recurrent")
    with pytest.raises(ValueError, match="TrainConfig.from_file"):
        TrainConfig(config="run.toml")


def fake_run(folder, options):
    """A folder that resolve_checkpoint takes for a checkpoint, with stored options."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "meta.json").write_text(json.dumps({"train_config": options}))
    return folder


def test_from_cli_layers_stored_options_file_and_flags(tmp_path):
    run = fake_run(tmp_path / "run", {"preset": "tiny", "steps": 50, "lr": 0.5, "seq_len": 64,
                                      "stop_at": 10, "overwrite": True})
    (tmp_path / "a.toml").write_text('steps = 70\nlr = 0.25\n')
    cfg = TrainConfig.from_cli({"config": str(tmp_path / "a.toml"), "out": str(run),
                                "resume": True, "lr": 0.125})
    # flags over the file over the stored run; one invocation's options never come back
    assert (cfg.lr, cfg.steps, cfg.seq_len, cfg.preset) == (0.125, 70, 64, "tiny")
    assert cfg.stop_at is None and cfg.overwrite is False and cfg.config is None
    assert "config" not in cfg.stored_options() and cfg.stored_options()["steps"] == 70
    without = TrainConfig.from_cli({"config": str(tmp_path / "a.toml"), "out": str(run)})
    assert (without.steps, without.seq_len) == (70, 256)  # no --resume: nothing stored read


def test_a_config_file_may_not_name_another(tmp_path):
    (tmp_path / "a.yaml").write_text("config: b.yaml\nsteps: 3\n")
    with pytest.raises(ValueError, match=r"unknown key.s. config in"):
        TrainConfig.from_cli({"config": str(tmp_path / "a.yaml")})


def planted_step(calls):
    """train_step with a planted change: no learning (lr 0) and a loss 1000 too high."""
    real = step_module.train_step

    def planted(model, optimizer, batches, lr, **kwargs):
        calls.append(lr)
        return real(model, optimizer, batches, 0.0, **kwargs) + 1000.0

    return planted


def test_both_features_import_the_one_step():
    import retnet.compare.experiment as experiment
    import retnet.train.loop as loop

    assert loop.train_step is experiment.train_step is step_module.train_step
    assert loop.validation_loss is experiment.validation_loss is step_module.validation_loss


def test_compare_trains_through_the_shared_step(monkeypatch):
    import retnet.compare.experiment as experiment

    cfg = CompareConfig(quick=True)
    g = np.random.default_rng(0)
    train_windows = PackedWindows(g.integers(0, 256, 4000), cfg.seq_len)
    val = PackedWindows(g.integers(0, 256, 1000), cfg.seq_len).evaluation_batches(4, 2)
    model = build_models(cfg, 256, seed=0)["retnet"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    monkeypatch.setattr(experiment, "train_step", planted_step(calls))
    with tqdm(disable=True) as bar:
        result = experiment.train_one("retnet", model, train_windows, val, cfg, 0, bar)
    assert calls == [Schedule(cfg.lr, cfg.steps, cfg.warmup).lr_at(i) for i in range(cfg.steps)]
    assert all(p["train_loss"] > 1000 for p in result["curve"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_trains_through_the_shared_step(corpus, tmp_path, monkeypatch):
    import retnet.train.loop as loop
    from retnet.checkpoint import load_checkpoint

    cfg = TrainConfig(preset="tiny", data=str(corpus), out=str(tmp_path / "run"), steps=3,
                      batch_size=2, seq_len=16, warmup=1, eval_every=3, save_every=3)
    calls = []
    monkeypatch.setattr(loop, "train_step", planted_step(calls))
    train(cfg)
    assert calls == [cfg.lr_schedule.lr_at(i) for i in range(3)]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["loss"] > 1000 for line in lines)
    ckpt = load_checkpoint(tmp_path / "run")
    torch.manual_seed(cfg.seed)
    initial = RetNetLM(ckpt.config).state_dict()
    assert all(torch.equal(initial[k], v) for k, v in ckpt.weights.items())
