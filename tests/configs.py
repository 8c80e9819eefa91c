"""Building the shipped configs without their ImageNet checkpoints."""
from pathlib import Path

from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DefaultScope

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'


def config_files(task: str) -> list:
    return sorted(p.name for p in (CONFIG_DIR / task).glob('*.py'))


def load_config(task: str, name: str) -> Config:
    cfg = Config.fromfile(str(CONFIG_DIR / task / name))
    cfg.model.backbone.init_cfg = None   # no pretrained weights here
    return cfg


def build_model(cfg: Config, scope: str):
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model)
    model.init_weights()
    return revert_sync_batchnorm(model)   # SyncBN needs a process group; plain BN computes the same here


def assert_dat_backbone(model, name: str) -> None:
    assert type(model.backbone).__name__ == 'DAT'
    # DAT v1 samples stage-3 keys at stride 2 in dense prediction (README); DAT++ keeps its 8/4/2/1.
    assert model.backbone.arch['strides'] == ((8, 4, 2, 1) if '++' in name else (1, 1, 2, 1))


def count_params(model) -> float:
    """Millions of parameters."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def loss_and_predict(model, batch: dict):
    """One loss + backward in train mode and one prediction in eval mode on a raw (inputs, data_samples)
    batch. Returns (losses, total loss, predictions)."""
    import torch
    data = model.data_preprocessor(batch, training=True)
    model.train()
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    total.backward()
    model.eval()
    with torch.no_grad():
        return losses, total, model(**data, mode='predict')
