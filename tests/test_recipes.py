"""Every config against the training recipe it claims: docs/recipes.md for DAT++ (the
authors' dense-prediction configs), the Swin / PVT recipes for DAT v1."""
import pytest

from configs import config_files, load_config

# amp: fp16 mixed precision with a dynamic loss scale; cp: backbone activation checkpointing; dp: drop path;
# batch: images per GPU; schedule: epochs (COCO) or iterations (ADE20K); warmup: linear warm-up iterations.
FIELDS = ('amp', 'cp', 'dp', 'lr', 'wd', 'batch', 'schedule', 'warmup')


def _det_pp(detector, size, sched, dp, amp=True, batch=2):
    lr = 2e-4 if detector == 'retinanet' else 4e-4
    return (f'{detector}_dat-{size}++_fpn_ms-crop-{sched}_coco.py',
            (amp, True, dp, lr, 0.05, batch, 12 if sched == '1x' else 36, 500))


def _det_v1(detector, size, sched):
    # mmdet's Swin recipes: fp32, lr 1e-4, 1000-iteration warm-up; drop path 0.2 (T) / 0.3 (S, B). The
    # backbone checkpointing is ours (memory only; it does not change the numbers).
    return (f'{detector}_dat-{size}_fpn_{sched}_coco.py',
            (False, True, 0.2 if size == 't' else 0.3, 1e-4, 0.05, 2, 12 if sched == '1x' else 36, 1000))


RECIPES = dict([
    _det_pp('retinanet', 't', '1x', 0.0), _det_pp('retinanet', 't', '3x', 0.2),
    _det_pp('retinanet', 's', '1x', 0.1), _det_pp('retinanet', 's', '3x', 0.5),
    _det_pp('mask-rcnn', 't', '1x', 0.0), _det_pp('mask-rcnn', 't', '3x', 0.3),
    _det_pp('mask-rcnn', 's', '1x', 0.1), _det_pp('mask-rcnn', 's', '3x', 0.5),
    _det_pp('cascade-mask-rcnn', 't', '1x', 0.0), _det_pp('cascade-mask-rcnn', 't', '3x', 0.1),
    _det_pp('cascade-mask-rcnn', 's', '3x', 0.5, amp=False),
    _det_pp('cascade-mask-rcnn', 'b', '3x', 0.8, amp=False, batch=1),
    *[_det_v1(det, size, sched) for det in ('retinanet', 'mask-rcnn') for size in 'tsb'
      for sched in ('1x', 'ms-crop-3x')],
    *[_det_v1('cascade-mask-rcnn', size, 'ms-crop-3x') for size in 'tsb'],
    # UperNet 160k at batch 16: T++/S++ in fp16, B++ in fp32, all checkpointed; v1 as Swin's, fp32.
    ('upernet_dat-t++_8xb2-160k_ade20k-512x512.py', (True, True, 0.3, 6e-5, 0.01, 2, 160000, 1500)),
    ('upernet_dat-s++_8xb2-160k_ade20k-512x512.py', (True, True, 0.5, 6e-5, 0.01, 2, 160000, 1500)),
    ('upernet_dat-b++_8xb2-160k_ade20k-512x512.py', (False, True, 0.7, 6e-5, 0.01, 2, 160000, 1500)),
    ('upernet_dat-t_8xb2-160k_ade20k-512x512.py', (False, False, 0.3, 6e-5, 0.01, 2, 160000, 1500)),
    ('upernet_dat-s_8xb2-160k_ade20k-512x512.py', (False, False, 0.3, 6e-5, 0.01, 2, 160000, 1500)),
    ('upernet_dat-b_8xb2-160k_ade20k-512x512.py', (False, False, 0.3, 6e-5, 0.01, 2, 160000, 1500)),
    # Semantic FPN 40k at batch 32, fp32, no checkpointing, no warm-up; v1 at the PVT lr.
    ('fpn_dat-t++_8xb4-40k_ade20k-512x512.py', (False, False, 0.4, 2e-4, 1e-4, 4, 40000, 0)),
    ('fpn_dat-s++_8xb4-40k_ade20k-512x512.py', (False, False, 0.4, 2e-4, 1e-4, 4, 40000, 0)),
    ('fpn_dat-b++_8xb4-40k_ade20k-512x512.py', (False, False, 0.7, 2e-4, 1e-4, 4, 40000, 0)),
    ('fpn_dat-t_8xb4-40k_ade20k-512x512.py', (False, False, 0.2, 1e-4, 1e-4, 4, 40000, 0)),
    ('fpn_dat-s_8xb4-40k_ade20k-512x512.py', (False, False, 0.3, 1e-4, 1e-4, 4, 40000, 0)),
    ('fpn_dat-b_8xb4-40k_ade20k-512x512.py', (False, False, 0.3, 1e-4, 1e-4, 4, 40000, 0)),
    # Query-based models, which neither DAT paper trained: the recipe of the mmdet / mmseg Swin config each one
    # mirrors (fp32, lr 1e-4, no warm-up), drop path as the DAT++ authors scale it, backbone checkpointing.
    *[(f'dino-5scale_dat-{size}++_8xb2-12e_coco.py', (False, True, dp, 1e-4, 1e-4, 2, 12, 0))
      for size, dp in (('t', 0.0), ('s', 0.1), ('b', 0.2))],
    *[(f'dino-5scale_dat-{size}++_8xb2-36e_coco.py', (False, True, dp, 1e-4, 1e-4, 2, 36, 0))
      for size, dp in (('t', 0.3), ('s', 0.5), ('b', 0.7))],
    *[(f'mask2former_dat-{size}++_8xb2-lsj-50e_coco{kind}.py', (False, True, dp, 1e-4, 0.05, 2, 368750, 0))
      for size, dp in (('t', 0.3), ('s', 0.5), ('b', 0.7)) for kind in ('', '-panoptic')],
    *[(f'mask2former_dat-{size}++_8xb2-160k_ade20k-512x512.py', (False, True, dp, 1e-4, 0.05, 2, 160000, 0))
      for size, dp in (('t', 0.3), ('s', 0.5), ('b', 0.7))],
])
CONFIGS = [('det', name) for name in config_files('det')] + [('seg', name) for name in config_files('seg')]


def test_every_config_has_a_recipe_row():
    assert sorted(RECIPES) == sorted(name for _, name in CONFIGS)


def recipe_of(task: str, name: str) -> dict:
    """The FIELDS of a config as it will train."""
    cfg = load_config(task, name)
    optim = cfg.optim_wrapper
    amp = optim.type == 'AmpOptimWrapper'
    if amp:   # AmpOptimWrapper's default loss scale is dynamic
        assert optim.get('loss_scale', 'dynamic') == 'dynamic'
    schedulers = cfg.param_scheduler if isinstance(cfg.param_scheduler, list) else [cfg.param_scheduler]
    warmups = [s for s in schedulers if s.type == 'LinearLR']
    assert all(not s.by_epoch and s.begin == 0 for s in warmups)
    loop = cfg.train_cfg
    return dict(amp=amp, cp=cfg.model.backbone.get('with_cp', False), dp=cfg.model.backbone.drop_path_rate,
                lr=optim.optimizer.lr, wd=optim.optimizer.weight_decay, batch=cfg.train_dataloader.batch_size,
                schedule=loop.max_epochs if 'max_epochs' in loop else loop.max_iters,
                warmup=warmups[0].end if warmups else 0)


@pytest.mark.parametrize('task,name', CONFIGS, ids=[name for _, name in CONFIGS])
def test_config_trains_with_its_recipe(task, name):
    assert recipe_of(task, name) == dict(zip(FIELDS, RECIPES[name]))


# What else the query-based configs keep from the Swin configs they mirror: gradient clipping, the backbone's LR
# factor, and the decay steps (epochs for DINO, iterations for Mask2Former on COCO) or poly power (ADE20K).
QUERY_EXTRAS = {'dino-5scale': (0.1, [11]), 'dino-5scale-36e': (0.1, [27, 33]),
                'mask2former': (0.01, [327778, 355092]), 'mask2former-ade20k': (0.01, 0.9)}


@pytest.mark.parametrize('task,name', [c for c in CONFIGS if c[1].startswith(('dino', 'mask2former'))],
                         ids=[n for _, n in CONFIGS if n.startswith(('dino', 'mask2former'))])
def test_query_configs_keep_the_mirrored_clipping_backbone_lr_and_decay(task, name):
    cfg = load_config(task, name)
    kind = name.split('_')[0] + ('-36e' if '36e' in name else '-ade20k' if 'ade20k' in name else '')
    clip, decay = QUERY_EXTRAS[kind]
    assert cfg.optim_wrapper.clip_grad.max_norm == clip
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys['backbone'].lr_mult == 0.1
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys['rpe_table'].decay_mult == 0.0
    scheduler = cfg.param_scheduler[0] if isinstance(cfg.param_scheduler, list) else cfg.param_scheduler
    assert (scheduler.power if kind.endswith('ade20k') else scheduler.milestones) == decay
    assert cfg.auto_scale_lr.base_batch_size == 16
