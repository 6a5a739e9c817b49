"""The training loop: learning on 2D + 3D collections, LR schedule, gradient accumulation, clipping,
non-finite losses, uncertainty weighting, EMA, metrics.jsonl and best-model selection."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from _engine_helpers import Linear2D, Supervised, TokenNorm, datasets, flat_state, medformer
from medformer.config import TrainConfig, load_config
from medformer.errors import ConfigError
from medformer.train import NonFiniteLossError, fit
from medformer.train.checkpoint import load_state, read_weights
from medformer.train.ema import EMA
from medformer.train.optim import WarmupCosine, default_param_groups

QUIET = {"progress": False, "checkpoint_every": None}


def records(path, split=None):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def test_loss_falls_on_2d_and_3d_collections(tmp_path):
    model = medformer()
    cfg = TrainConfig(steps=60, batch_size=4, lr=3e-3, warmup_steps=5, log_every=10, **QUIET)
    result = fit(model, [Supervised()], datasets(), cfg, tmp_path)
    train = records(tmp_path)
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert {"acc/c2d/y", "acc/c3d/y"} <= set().union(*train)  # both collections were trained on
    assert result.step == 60 and model.training
    saved = read_weights(tmp_path / "model")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert (tmp_path / "model" / "config.json").is_file()
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg


def test_warmup_then_cosine():
    f = WarmupCosine(total=110, warmup=10, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(total=5)(0) == pytest.approx(1.0)


def test_logged_lr_follows_the_schedule_per_group(tmp_path):
    model = Linear2D()
    groups = default_param_groups(model, 0.01)
    groups[0]["lr_scale"] = 0.5
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=3, min_lr_ratio=0.2, log_every=1, **QUIET)
    seen: list[list[float]] = []
    hook = register_optimizer_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    try:
        fit(model, [Supervised()], datasets(n3d=0), cfg, tmp_path, param_groups=groups)
    finally:
        hook.remove()
    f = WarmupCosine(8, 3, 0.2)
    assert [r["lr"] for r in records(tmp_path)] == pytest.approx([1e-2 * f(s) for s in range(8)])
    assert [lrs[0] for lrs in seen] == pytest.approx([0.5e-2 * f(s) for s in range(8)])  # lr_scale kept
    assert [lrs[1] for lrs in seen] == pytest.approx([1e-2 * f(s) for s in range(8)])


def test_accumulating_two_micro_batches_equals_one_double_batch(tmp_path):
    # one collection of 8 studies: every step sees all 8, as one batch of 8 or as two of 4
    data = datasets(n2d=8, n3d=0)
    base = {"steps": 5, "lr": 1e-2, "clip_norm": None, **QUIET}
    big, small = Linear2D(), Linear2D()
    fit(big, [Supervised()], data, TrainConfig(batch_size=8, **base), tmp_path / "big")
    fit(small, [Supervised()], data, TrainConfig(batch_size=4, grad_accum=2, **base), tmp_path / "accum")
    a, b = big.state_dict(), small.state_dict()
    assert not torch.equal(a["heads.c2d/y.weight"], Linear2D().state_dict()["heads.c2d/y.weight"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_clipping_bounds_the_gradient_norm(tmp_path):
    norms: list[float] = []

    def measure(opt, *_):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.cat([g.reshape(-1) for g in grads]).norm()))

    hook = register_optimizer_step_pre_hook(measure)
    try:
        cfg = TrainConfig(steps=4, batch_size=4, clip_norm=0.05, log_every=1, **QUIET)
        fit(medformer(), [Supervised()], datasets(), cfg, tmp_path)
    finally:
        hook.remove()
    assert len(norms) == 4 and max(norms) <= 0.05 * (1 + 1e-4)
    assert min(r["grad_norm"] for r in records(tmp_path)) > 0.05  # the logged norm is before clipping


class NaNAt:
    """Supervised, but the loss is NaN at one call."""

    name = "sup"

    def __init__(self, call: int):
        self.call, self.calls = call, 0

    def __call__(self, model, batch):
        self.calls += 1
        loss, logs = Supervised()(model, batch)
        return (loss * math.nan if self.calls == self.call else loss), logs


def test_non_finite_loss_stops_with_the_step_and_objective(tmp_path):
    cfg = TrainConfig(steps=5, batch_size=4, **QUIET)
    with pytest.raises(NonFiniteLossError, match=r"step 3 from objective 'sup'"):
        fit(Linear2D(), [NaNAt(3)], datasets(n3d=0), cfg, tmp_path / "stop")

    model = Linear2D()
    cfg = TrainConfig(steps=5, batch_size=4, skip_nonfinite=True, log_every=1, **QUIET)
    result = fit(model, [NaNAt(3)], datasets(n3d=0), cfg, tmp_path / "skip")
    assert result.skipped_steps == 1 and result.step == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["skipped"] for r in records(tmp_path / "skip")] == [0, 0, 1, 1, 1]


def test_uncertainty_weights_learn_and_are_checkpointed(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, loss_weighting="uncertainty", log_every=3,
                      progress=False, checkpoint_every=3)  # fmt: skip
    fit(medformer(), [Supervised(), TokenNorm()], datasets(), cfg, tmp_path)
    log_vars = load_state(tmp_path / "checkpoints" / "step_0000006")["weighting"]["log_vars"]
    first = load_state(tmp_path / "checkpoints" / "step_0000003")["weighting"]["log_vars"]
    assert log_vars.shape == (2,) and (log_vars != 0).all() and not torch.equal(log_vars, first)
    last = records(tmp_path)[-1]
    assert last["weight/sup"] == pytest.approx(math.exp(-log_vars[0].item()), rel=1e-5)
    assert last["weight/aux"] == pytest.approx(math.exp(-log_vars[1].item()), rel=1e-5)
    # L = exp(-s_sup) L_sup + s_sup + exp(-s_aux) L_aux + s_aux was what the step minimised
    assert "loss/sup" in last and "loss/aux" in last


def test_ema_weights_are_evaluated_and_saved(tmp_path):
    evaluated = []

    def evaluate(model):
        assert not model.training and not torch.is_grad_enabled()
        evaluated.append(flat_state(model))
        return {"val/score": float(len(evaluated))}

    model = medformer()
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, ema_decay=0.7, eval_every=3, **QUIET)
    result = fit(model, [Supervised()], datasets(), cfg, tmp_path, evaluate=evaluate)
    assert len(evaluated) == 2 and model.training
    ema = read_weights(tmp_path / "model_ema")
    raw = model.state_dict()
    key = "body.blocks.0.mlp.fc1.weight"
    assert not torch.equal(ema[key], raw[key])  # the average lags the weights
    assert all(torch.equal(evaluated[-1][k], ema[k]) for k in ema)  # evaluation saw the EMA weights
    assert all(torch.equal(v, read_weights(tmp_path / "model")[k]) for k, v in raw.items())
    assert result.ema_dir == tmp_path / "model_ema"


def test_ema_decay_warms_up_so_the_average_forgets_the_initialisation():
    model = torch.nn.Linear(3, 1, bias=False)
    start = model.weight.detach().clone()
    ema = EMA(model, decay=0.99)
    assert [ema.decay_at(t) for t in (0, 10, 1000)] == [0.1, 11 / 20, 0.99]
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)
    with ema.applied(model):
        assert torch.allclose(model.weight, 0.1 * start + 0.9)  # 90% the new weights after step 0
    for t in range(1, 200):
        ema.update(model, step=t)
    with ema.applied(model):  # a fixed 0.99 would still hold 0.99^200 = 13% of the initialisation
        assert torch.allclose(model.weight, torch.ones(1, 3), atol=1e-3)
    assert torch.equal(model.weight, torch.ones(1, 3))  # the training weights are back


def test_metrics_jsonl_and_best_model(tmp_path):
    scores = iter([0.5, 0.9, 0.7])
    snapshots = {}

    def evaluate(model):
        score = next(scores)
        snapshots[score] = flat_state(model)
        return {"val/auc": score, "val/loss": 1 - score}

    # a worker process, and 12 batches at 7 per epoch: the loader restarts mid-run
    cfg = TrainConfig(steps=6, batch_size=4, grad_accum=2, eval_every=2, log_every=2, select_metric="val/auc",
                      num_workers=1, **QUIET)  # fmt: skip
    result = fit(medformer(), [Supervised(), TokenNorm()], datasets(), cfg, tmp_path, evaluate=evaluate)
    train = records(tmp_path)
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        for key in ("step", "epoch", "lr", "loss", "loss/sup", "loss/aux", "aux/token_mean", "grad_norm",
                    "samples_per_s", "data_wait"):  # fmt: skip
            assert key in r and r[key] == r[key], key
        assert 0 <= r["data_wait"] <= 1
    val = records(tmp_path, "val")
    assert [(r["step"], r["val/auc"]) for r in val] == [(2, 0.5), (4, 0.9), (6, 0.7)]
    assert result.best_metric == 0.9 and result.best_step == 4 and result.best_dir == tmp_path / "best"
    best = read_weights(tmp_path / "best")
    assert all(torch.equal(best[k], v) for k, v in snapshots[0.9].items())
    assert result.history == train[:1] + val[:1] + train[1:2] + val[1:2] + train[2:] + val[2:]
    assert "step 4 eval" in (tmp_path / "train.log").read_text()


def test_select_metric_must_exist(tmp_path):
    cfg = TrainConfig(steps=1, batch_size=4, select_metric="val/acc", **QUIET)
    with pytest.raises(ConfigError, match="val/acc"):
        fit(Linear2D(), [Supervised()], datasets(n3d=0), cfg, tmp_path, evaluate=lambda m: {"val/auc": 1.0})


def test_config_needs_a_length():
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(steps=3, epochs=1)
    with pytest.raises(ConfigError, match=r"train.steps or train.epochs"):
        fit(Linear2D(), [Supervised()], datasets(n3d=0), TrainConfig(), "unused")


def test_sampling_shares_name_the_collections(tmp_path):
    cfg = load_config(TrainConfig, None, ["steps=1", "strategy={c2d: 1, c3d: 2}"])  # as --set gives it
    assert cfg.strategy == {"c2d": 1.0, "c3d": 2.0}
    scheduled = load_config(TrainConfig, None, ["steps=1", "strategy={c2d: [1, 0.5], c3d: 2}"])
    assert scheduled.strategy == {"c2d": [1.0, 0.5], "c3d": 2.0}
    with pytest.raises(ConfigError, match=r"train.strategy: .*\['c2d', 'c3d'\]"):
        fit(Linear2D(), [Supervised()], datasets(), cfg.model_copy(update={"strategy": {"c2d": 1}}), tmp_path)


def test_epochs_set_the_number_of_steps(tmp_path):
    # 16 studies, batches of 4 -> 4 batches per epoch; 2 per step -> 2 steps per epoch
    cfg = TrainConfig(epochs=1.5, batch_size=4, grad_accum=2, log_every=1, **QUIET)
    (tmp_path / "config.yaml").write_text("written: by the command\n")
    result = fit(Linear2D(), [Supervised()], datasets(n3d=0), cfg, tmp_path)
    assert (tmp_path / "config.yaml").read_text() == "written: by the command\n"  # the caller's, kept
    assert result.step == 3
    assert [r["epoch"] for r in records(tmp_path)] == [0.5, 1.0, 1.5]
