"""The query-based configs (DINO, Mask2Former): each builds, reads the backbone's stages where its neck or pixel
decoder expects them, trains DAT's norms and bias tables without weight decay at the backbone's LR, and has the
size of the R50 / Swin-T models it mirrors. DINO and Mask2Former (instance) with DAT-T++ take a training step."""
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from dat_mm.models.backbones.dat import resolve_arch

from configs import build_model, config_files, count_params, load_config

QUERY = ('dino', 'mask2former')
DET = [n for n in config_files('det') if n.startswith(QUERY)]
SEG = [n for n in config_files('seg') if n.startswith(QUERY)]
CONFIGS = [('det', n) for n in DET] + [('seg', n) for n in SEG]
SIZES = {'t': 'tiny++', 's': 'small++', 'b': 'base++'}


def test_every_query_config_is_there():
    assert DET == sorted(f'{m}_dat-{s}++_8xb2-{v}.py' for s in 'tsb' for m, v in (
        ('dino-5scale', '12e_coco'), ('dino-5scale', '36e_coco'), ('mask2former', 'lsj-50e_coco'),
        ('mask2former', 'lsj-50e_coco-panoptic')))
    assert SEG == sorted(f'mask2former_dat-{s}++_8xb2-160k_ade20k-512x512.py' for s in 'tsb')


def _no_decay(name: str) -> bool:
    return any(key in name for key in ('norm', 'rpe_table'))


@pytest.mark.parametrize('task,name', CONFIGS, ids=[n for _, n in CONFIGS])
def test_config_builds_and_feeds_its_heads_the_backbone_stages(task, name):
    cfg = load_config(task, name)
    model = build_model(cfg, 'mmdet' if task == 'det' else 'mmseg')
    backbone = model.backbone
    assert type(backbone).__name__ == 'DAT' and backbone.arch == resolve_arch(SIZES[name.split('_dat-')[1][0]])
    dims = [backbone.arch['dims'][i] for i in backbone.out_indices]
    assert backbone.out_indices == (0, 1, 2, 3)
    if name.startswith('dino'):
        # ChannelMapper maps the four stages and adds one stride-2 level: five, as the encoder and decoder read.
        assert [conv.conv.in_channels for conv in model.neck.convs] == dims
        levels = len(model.neck.convs) + len(model.neck.extra_convs)
        assert levels == 5 == model.num_feature_levels == cfg.model.neck.num_outs
        assert model.encoder.layers[0].self_attn.num_levels == levels
        assert model.decoder.layers[0].cross_attn.num_levels == levels
        assert model.level_embed.shape[0] == levels
    else:
        head = model.panoptic_head if task == 'det' else model.decode_head
        assert [conv.conv.in_channels for conv in head.pixel_decoder.input_convs] == dims[:0:-1]
        assert head.pixel_decoder.lateral_convs[0].conv.in_channels == dims[0]
    assert all(stage.with_cp for stage in backbone.stages)   # checkpointing, as every DAT detection config


@pytest.mark.parametrize('task,name', [CONFIGS[0], ('det', 'mask2former_dat-s++_8xb2-lsj-50e_coco.py'),
                                       ('seg', 'mask2former_dat-b++_8xb2-160k_ade20k-512x512.py')],
                         ids=['dino-t++', 'mask2former-s++', 'mask2former-seg-b++'])
def test_backbone_trains_at_a_tenth_of_the_lr_without_decay_on_norms_and_tables(task, name):
    cfg = load_config(task, name)
    model = build_model(cfg, 'mmdet' if task == 'det' else 'mmseg')
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr = cfg.optim_wrapper.optimizer.lr
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    seen = 0
    for param_name, param in model.named_parameters():
        group = group_of[id(param)]
        if param_name.startswith('backbone.'):
            seen += 1
            assert group['lr'] == pytest.approx(0.1 * base_lr), param_name
            expected = 0.0 if _no_decay(param_name) else base_wd
            assert group['weight_decay'] == pytest.approx(expected), param_name
        elif name.startswith('mask2former') and any(k in param_name for k in ('query_embed', 'query_feat',
                                                                              'level_embed')):
            # The mirrored Mask2Former configs' own keys stay.
            assert group['lr'] == pytest.approx(base_lr) and group['weight_decay'] == 0.0, param_name
    assert seen == sum(1 for n, _ in model.named_parameters() if n.startswith('backbone.'))


def _mirrored(base: str, tmp_path, **override) -> float:
    """Millions of parameters of an mmdet / mmseg config, built without its checkpoint."""
    path = tmp_path / f'{abs(hash(base))}.py'
    path.write_text(f"_base_ = '{base}'\n")
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.init_cfg = None
    for key, value in override.items():
        cfg.merge_from_dict({key: value})
    return count_params(build_model(cfg, base.split('::')[0]))


# DAT-T++ against the R50 (and, where mmdet ships one, Swin-T) versions of the same model.
MDET, MSEG = 'mmdet::mask2former/mask2former_', 'mmseg::mask2former/mask2former_'
MIRRORS = {
    'dino-5scale_dat-t++_8xb2-12e_coco.py': ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'],
    'mask2former_dat-t++_8xb2-lsj-50e_coco.py': [f'{MDET}r50_8xb2-lsj-50e_coco.py',
                                                 f'{MDET}swin-t-p4-w7-224_8xb2-lsj-50e_coco.py'],
    'mask2former_dat-t++_8xb2-lsj-50e_coco-panoptic.py': [f'{MDET}r50_8xb2-lsj-50e_coco-panoptic.py',
                                                          f'{MDET}swin-t-p4-w7-224_8xb2-lsj-50e_coco-panoptic.py'],
    'mask2former_dat-t++_8xb2-160k_ade20k-512x512.py': [f'{MSEG}r50_8xb2-160k_ade20k-512x512.py',
                                                        f'{MSEG}swin-t_8xb2-160k_ade20k-512x512.py'],
}


@pytest.mark.parametrize('name', MIRRORS)
def test_dat_tiny_pp_has_the_size_of_the_r50_and_swin_t_versions(name, tmp_path):
    ours = count_params(build_model(load_config('seg' if 'ade20k' in name else 'det', name),
                                    'mmseg' if 'ade20k' in name else 'mmdet'))
    for base in MIRRORS[name]:
        theirs = _mirrored(base, tmp_path)
        assert abs(ours - theirs) / theirs < 0.25, (base, ours, theirs)


# Panoptic and semantic Mask2Former train in test_training_query.py (and the semantic one, over mmseg's R50
# config, in test_own_config.py).
@pytest.mark.parametrize('task,name', [('det', 'dino-5scale_dat-t++_8xb2-12e_coco.py'),
                                       ('det', 'mask2former_dat-t++_8xb2-lsj-50e_coco.py')],
                         ids=['dino', 'mask2former-instance'])
def test_a_training_step_on_a_random_batch(task, name):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    cfg = load_config(task, name)
    mask2former = name.startswith('mask2former')
    if mask2former:
        cfg.model.data_preprocessor.batch_augments = None   # no padding to 1024x1024 on a CPU
        cfg.model.train_cfg.num_points = 1024                # mask points per query, down from 12544
    batch = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 160), (3, 96, 128)], num_items=[3, 2],
                           num_classes=80, with_mask=mask2former)
    model = build_model(cfg, 'mmdet')
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    before = model.backbone.patch_proj[0].weight.detach().clone()
    model.train()
    losses = model.train_step(batch, wrapper)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    assert not torch.equal(model.backbone.patch_proj[0].weight, before), 'the backbone took no step'
