"""`medformer pretrain` end to end (2D + 3D collections, four tasks, resume), the hand-over to
`medformer finetune --init`, and the pretext config: registry, clear errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _files import MEDMNIST_DIR
from _pretext_helpers import single_thread
from medformer.cli import main
from medformer.config import ModelConfig, load_config
from medformer.errors import ConfigError
from medformer.models import Medformer
from medformer.pretext import PretextTask, build_tasks, register_task
from medformer.pretrain import PretrainConfig

TINY = [
    "--set", "model.dim=32", "--set", "model.depth=1", "--set", "model.heads=2",
    "--set", "model.patch_size_2d=7", "--set", "model.patch_size_3d=7",
    "--set", "train.batch_size=4", "--set", "train.log_every=2", "--set", "train.progress=false",
    "--set", "pretrain.visual_samples=2",
]  # fmt: skip
TASKS = "pretext=[{task: mae}, {task: contrastive, weight: 0.5}, {task: source, weight: 0.1}, " \
    "{task: crossdim, start_step: 2}]"  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.mark.skipif(not MEDMNIST_DIR.exists(), reason="shared MedMNIST files not present")
def test_pretrain_resume_then_finetune_from_the_run(tmp_path, capsys):
    """Real BreastMNIST (2D ultrasound) and AdrenalMNIST3D (3D CT masks), a few steps each."""
    breast, adrenal = MEDMNIST_DIR / "breastmnist.npz", MEDMNIST_DIR / "adrenalmnist3d.npz"
    run = tmp_path / "pretrain"
    data = f"data=[{{path: {breast}}}, {{path: {adrenal}}}]"
    argv = ["pretrain", "--output", str(run), "--device", "cpu", "--set", data, "--set", TASKS, *TINY]
    assert main([*argv, "--set", "train.steps=4", "--set", "train.ema_decay=0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"pre-trained model: {run / 'model'}" in printed and "loss/mae" in printed

    # the kept model: every collection and modality, no pretext heads
    saved = json.loads((run / "model" / "config.json").read_text())
    assert set(saved["collections"]) == {"breastmnist", "adrenalmnist3d"} and saved["tasks"] == {}
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert not any(k.startswith("tasks.") for k in weights)
    ema = Medformer.from_pretrained(run / "model_ema")  # the EMA weights, as a Medformer too
    assert not torch.equal(ema.body.norm.weight, Medformer.from_pretrained(run / "model").body.norm.weight)
    # the checkpoint holds the heads too (for --resume)
    ckpt = load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert any(k.startswith("tasks.mae.decoder.") for k in ckpt)

    # per-task losses; crossdim only from step 2 on (and only for 3D batches)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all("loss/mae" in r and "loss/contrastive" in r for r in records)
    assert "loss/crossdim" not in records[0]
    for name in ("loss_curves.png", "visuals/mae_breastmnist.png", "visuals/mae_adrenalmnist3d.png",
                 "visuals/contrastive_breastmnist.png", "visuals/crossdim_adrenalmnist3d.png",
                 "visuals/source_adrenalmnist3d.png"):  # fmt: skip
        assert (run / name).stat().st_size > 1000, name
    assert not (run / "visuals" / "crossdim_breastmnist.png").exists()  # a 2D set has no volume

    # resume to 6 steps: the optimizer, heads and data position come back from the checkpoint
    resume = [
        "--resume",
        "--set",
        "train.steps=6",
        "--set",
        "train.ema_decay=0.5",
        "--set",
        "pretrain.visualise=false",
    ]
    assert main([*argv, *resume]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert "resumed from" in (run / "train.log").read_text()

    # fine-tune from the run folder (its model/), the same body weights
    from medformer.data.manifest import open_collection
    from medformer.finetune import build_model

    pretrained = load_file(str(run / "model" / "model.safetensors"))
    model = build_model(ModelConfig(init=str(run), dim=32, depth=1, heads=2), [open_collection(breast)])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    assert "breastmnist/label" in model.tasks  # the fine-tuning head, added on top
    ft = tmp_path / "finetune"
    ft_argv = ["finetune", "--init", str(run), "--set", f"data=[{{path: {breast}}}]", "--output", str(ft)]
    ft_argv += ["--device", "cpu", "--set", "train.steps=2", "--set", "train.progress=false"]
    assert main(ft_argv) == 0
    assert "breastmnist/label/auc" in json.loads((ft / "results.json").read_text())["results"]["test"]
    assert main(["finetune", "--init", str(tmp_path / "nowhere"), *ft_argv[3:]]) == 2
    assert "model.init" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pretext", "message"),
    [
        ("[{task: maee}]", "pretext.0.task: unknown pretext task 'maee'; did you mean 'mae'?"),
        ("[{task: mae, mask_ratoi: 0.5}]",
         "pretext.0 (mae): unknown key 'mask_ratoi'; did you mean 'mask_ratio'?"),
        ("[{task: mae, mask_ratio: 1.5}]", "pretext.0 (mae): mask_ratio must be in (0, 1), got 1.5"),
        ("[{task: mae}, {task: contrastive, temperature: hot}]",
         "pretext.1 (contrastive): key 'temperature'"),
        ("[{task: mae, masking: blocks}]", "key 'masking'"),
        ("[{weight: 1}]", "pretext.0: missing key 'task'"),
        ("[{task: mae}, {task: mae, mask_ratio: 0.5}]", "task names repeat (['mae'])"),
        ("[{task: mae, weight: -1}]", "key 'weight'"),
        ("[{task: mae, name: mae.v2}]", "pretext.0.name: 'mae.v2' is not a valid task name"),
        ("[]", "pretext: no pretext tasks given"),
        ("[{task: contrastive, augment: {flipp: 0.5}}]",
         "unknown key 'augment.flipp'; did you mean 'augment.flip'?"),
    ],
)  # fmt: skip
def test_bad_pretext_entries_name_the_key(pretext, message, capsys, tmp_path):
    assert main(["pretrain", "--set", f"pretext={pretext}", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_entries_become_tasks_with_names_weights_and_options():
    tasks, weights = build_tasks(
        [
            {"task": "mae", "mask_ratio": 0.6},
            {"task": "mae", "name": "mae_blocks", "masking": "block", "block_size": 8, "weight": 0.5},
            {"task": "contrastive", "start_step": 100, "augment": {"flip": 0.5, "noise": 0.1}},
        ]
    )
    assert [t.name for t in tasks] == ["mae", "mae_blocks", "contrastive"]
    assert weights == {"mae": 1.0, "mae_blocks": 0.5, "contrastive": 1.0}
    assert tasks[0].mask_ratio == 0.6 and tasks[1].masking == "block"
    assert tasks[2].start_step == 100 and not tasks[2].active(99) and tasks[2].active(100)
    assert tasks[2].augment.config.flip == 0.5 and tasks[2].augment.config.noise == 0.1


def test_registering_a_task_is_one_line():
    @register_task("constant_test_task")
    class Constant(PretextTask):
        def __init__(self, value: float = 1.0, start_step: int = 0):
            super().__init__(start_step)
            self.value = value

        def loss(self, model, views):
            return torch.tensor(self.value), {}

    tasks, _ = build_tasks([{"task": "constant_test_task", "value": 2.0}])
    assert isinstance(tasks[0], Constant) and tasks[0].value == 2.0 and tasks[0].name == "constant_test_task"
    with pytest.raises(ConfigError, match="unknown key 'vlaue'"):
        build_tasks([{"task": "constant_test_task", "vlaue": 2.0}])
    with pytest.raises(ValueError, match="is taken"):
        register_task("mae")(Constant)


def test_config_defaults_and_other_model_errors():
    config = load_config(PretrainConfig)
    assert config.pretext == [{"task": "mae"}] and config.pretrain.splits == ["train"]
    assert config.output == "runs/pretrain"
    with pytest.raises(ConfigError, match=r"model\.arch"):
        load_config(PretrainConfig, overrides=["model.arch=resnet18"])
    with pytest.raises(ConfigError, match=r"pretrain\.splits"):
        load_config(PretrainConfig, overrides=["pretrain.splits=[training]"])


def test_shipped_config_is_valid():
    config = load_config(PretrainConfig, Path(__file__).parents[1] / "configs" / "pretrain_medmnist.yaml")
    tasks, weights = build_tasks(config.pretext)
    assert {t.name for t in tasks} >= {"mae", "contrastive"} and all(w > 0 for w in weights.values())
