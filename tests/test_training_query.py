"""DINO and Mask2Former (instance, panoptic, semantic) train on the tiny data set through tools/train.py, save a
checkpoint, and tools/test.py evaluates it and prints the metrics.

Each tiny config inherits the shipped DAT-T++ config and shrinks what a CPU test cannot afford: the mini DAT++
(configs/_base_/dat_mini.py), few queries and layers, 128-pixel images, three classes of shapes."""
import importlib.util
import json
import math
import os
import re

import pytest
import torch

import dat_mm  # noqa: F401  (makes MMEngine checkpoints loadable under weights_only)
from commands import ROOT, run_tool

CONFIGS = ROOT / 'configs'
SHAPES = "('square', 'circle', 'triangle')"
# What every tiny config shares: the mini backbone, and the backbone-LR rule rebuilt for its names.
COMMON = f'''
from dat_mm.optim import dat_custom_keys  # noqa: E402
classes = {SHAPES}
custom_imports = dict(imports=['mmdet.models', 'dat_mm'], allow_failed_imports=False)
mini = dict(type='dat_mm.DAT', arch=_base_.dat_mini, init_cfg=None)
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dat_custom_keys(_base_.dat_mini, backbone_lr_mult=0.1)))
'''
SMALL_M2F_HEAD = '''feat_channels=64, out_channels=64, num_queries=10,
        pixel_decoder=dict(encoder=dict(num_layers=1, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=64, num_heads=4), ffn_cfg=dict(embed_dims=64, feedforward_channels=128))),
            positional_encoding=dict(num_feats=32)),
        positional_encoding=dict(num_feats=32),
        transformer_decoder=dict(num_layers=3, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=64, num_heads=4), cross_attn_cfg=dict(embed_dims=64, num_heads=4),
            ffn_cfg=dict(embed_dims=64, feedforward_channels=128)))'''
DET_LOADERS = '''
def loader(split, pipeline, **dataset):
    return dict(batch_size=2, num_workers=0, persistent_workers=False, batch_sampler=None,
                sampler=dict(type='DefaultSampler', shuffle=split == 'train'),
                dataset=dict(data_root='data/tiny/coco/', pipeline=pipeline, **dataset))
'''
TEST_PIPELINE = '''[dict(type='LoadImageFromFile'), dict(type='Resize', scale=(128, 128), keep_ratio=True),
                 {annotations},
                 dict(type='PackDetInputs',
                      meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]'''

TINY = {
    'dino': f'''
_base_ = ['{CONFIGS}/det/dino-5scale_dat-t++_8xb2-12e_coco.py', '{CONFIGS}/_base_/dat_mini.py']
{COMMON}
model = dict(
    num_queries=30, backbone=dict(_delete_=True, **mini), neck=dict(in_channels=[24, 48, 96, 192]),
    encoder=dict(num_layers=1, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
    decoder=dict(num_layers=2, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=256))),
    bbox_head=dict(num_classes=3), dn_cfg=dict(group_cfg=dict(num_dn_queries=10)), test_cfg=dict(max_per_img=30))
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                  dict(type='RandomResize', scale=(128, 128), ratio_range=(0.8, 1.25), keep_ratio=True),
                  dict(type='RandomFlip', prob=0.5), dict(type='PackDetInputs')]
test_pipeline = {TEST_PIPELINE.format(annotations="dict(type='LoadAnnotations', with_bbox=True)")}
{DET_LOADERS}
train_dataloader = loader('train', train_pipeline, ann_file='train.json', data_prefix=dict(img='train/'),
                          metainfo=dict(classes=classes))
val_dataloader = loader('val', test_pipeline, ann_file='val.json', data_prefix=dict(img='val/'), test_mode=True,
                        metainfo=dict(classes=classes))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file='data/tiny/coco/val.json', metric='bbox')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=100)
''',
    'mask2former-instance': f'''
_base_ = ['{CONFIGS}/det/mask2former_dat-t++_8xb2-lsj-50e_coco.py', '{CONFIGS}/_base_/dat_mini.py']
{COMMON}
model = dict(
    data_preprocessor=dict(batch_augments=[dict(type='BatchFixedSizePad', size=(128, 128), pad_mask=True)]),
    backbone=dict(_delete_=True, **mini),
    panoptic_head=dict(
        in_channels=[24, 48, 96, 192], num_things_classes=3, num_stuff_classes=0,
        loss_cls=dict(class_weight=[1.0] * 3 + [0.1]), {SMALL_M2F_HEAD}),
    panoptic_fusion_head=dict(num_things_classes=3, num_stuff_classes=0),
    train_cfg=dict(num_points=1024), test_cfg=dict(max_per_image=20))
train_pipeline = [dict(type='LoadImageFromFile', to_float32=True),
                  dict(type='LoadAnnotations', with_bbox=True, with_mask=True), dict(type='RandomFlip', prob=0.5),
                  dict(type='RandomResize', scale=(128, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
                  dict(type='RandomCrop', crop_size=(128, 128), crop_type='absolute', recompute_bbox=True,
                       allow_negative_crop=True),
                  dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-5, 1e-5), by_mask=True),
                  dict(type='PackDetInputs')]
test_pipeline = {TEST_PIPELINE.format(annotations="dict(type='LoadAnnotations', with_bbox=True, with_mask=True)")}
{DET_LOADERS}
train_dataloader = loader('train', train_pipeline, ann_file='train.json', data_prefix=dict(img='train/'),
                          metainfo=dict(classes=classes))
val_dataloader = loader('val', test_pipeline, ann_file='val.json', data_prefix=dict(img='val/'), test_mode=True,
                        metainfo=dict(classes=classes))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file='data/tiny/coco/val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_iters=3, val_interval=1000, dynamic_intervals=None)
default_hooks = dict(checkpoint=dict(interval=3))
''',
    'mask2former-panoptic': f'''
_base_ = ['{CONFIGS}/det/mask2former_dat-t++_8xb2-lsj-50e_coco-panoptic.py', '{CONFIGS}/_base_/dat_mini.py']
{COMMON}
metainfo = dict(classes=classes + ('background',), thing_classes=classes, stuff_classes=('background',))
model = dict(
    data_preprocessor=dict(batch_augments=[dict(type='BatchFixedSizePad', size=(128, 128), pad_mask=True,
                                                pad_seg=True, seg_pad_value=255)]),
    backbone=dict(_delete_=True, **mini),
    panoptic_head=dict(
        in_channels=[24, 48, 96, 192], num_things_classes=3, num_stuff_classes=1,
        loss_cls=dict(class_weight=[1.0] * 4 + [0.1]), {SMALL_M2F_HEAD}),
    panoptic_fusion_head=dict(num_things_classes=3, num_stuff_classes=1),
    train_cfg=dict(num_points=1024), test_cfg=dict(max_per_image=20))
train_pipeline = [dict(type='LoadImageFromFile', to_float32=True),
                  dict(type='LoadPanopticAnnotations', with_bbox=True, with_mask=True, with_seg=True),
                  dict(type='RandomFlip', prob=0.5),
                  dict(type='RandomResize', scale=(128, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
                  dict(type='RandomCrop', crop_size=(128, 128), crop_type='absolute', recompute_bbox=True,
                       allow_negative_crop=True),
                  dict(type='PackDetInputs')]
test_pipeline = {TEST_PIPELINE.format(annotations="dict(type='LoadPanopticAnnotations')")}
{DET_LOADERS}
train_dataloader = loader('train', train_pipeline, ann_file='panoptic_train.json', metainfo=metainfo,
                          data_prefix=dict(img='train/', seg='panoptic_train/'))
val_dataloader = loader('val', test_pipeline, ann_file='panoptic_val.json', metainfo=metainfo, test_mode=True,
                        data_prefix=dict(img='val/', seg='panoptic_val/'))
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type='CocoPanopticMetric', ann_file='data/tiny/coco/panoptic_val.json',
                     seg_prefix='data/tiny/coco/panoptic_val/')
test_evaluator = val_evaluator
train_cfg = dict(max_iters=3, val_interval=1000, dynamic_intervals=None)
default_hooks = dict(checkpoint=dict(interval=3))
''',
    'mask2former-semantic': f'''
_base_ = ['{CONFIGS}/seg/mask2former_dat-t++_8xb2-160k_ade20k-512x512.py', '{CONFIGS}/_base_/dat_mini.py']
{COMMON}
crop_size = (128, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(_delete_=True, **mini),
    decode_head=dict(
        in_channels=[24, 48, 96, 192], num_classes=4, loss_cls=dict(class_weight=[1.0] * 4 + [0.1]),
        train_cfg=dict(num_points=1024), {SMALL_M2F_HEAD}))
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
                  dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
                  dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
                  dict(type='RandomFlip', prob=0.5), dict(type='PackSegInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=crop_size, keep_ratio=True),
                 dict(type='LoadAnnotations', reduce_zero_label=True), dict(type='PackSegInputs')]
dataset = dict(type='BaseSegDataset', data_root='data/tiny/ade', img_suffix='.jpg', seg_map_suffix='.png',
               reduce_zero_label=True, metainfo=dict(classes=('background',) + classes))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    _delete_=True, **dataset, pipeline=train_pipeline,
    data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    _delete_=True, **dataset, pipeline=test_pipeline,
    data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation')))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=3, val_interval=1000)
default_hooks = dict(checkpoint=dict(interval=3, save_best=None))
''',
}
CHECKPOINT = {'dino': 'epoch_1.pth'}
METRIC = {'dino': 'coco/bbox_mAP', 'mask2former-instance': 'coco/segm_mAP', 'mask2former-panoptic': 'coco_panoptic/PQ',
          'mask2former-semantic': 'mIoU'}


def _panoptic_env() -> dict:
    """mmdet's panoptic loader and metric import panopticapi (not on PyPI): the tests' stand-in where it is
    missing (tests/stand_ins/README.md)."""
    if importlib.util.find_spec('panopticapi') is not None:
        return {}
    paths = [str(ROOT / 'tests' / 'stand_ins'), os.environ.get('PYTHONPATH', '')]
    return dict(PYTHONPATH=os.pathsep.join(p for p in paths if p))


@pytest.mark.parametrize('model', list(TINY))
def test_tiny_training_saves_a_checkpoint_that_tests(model, tiny_workspace, tmp_path):
    config = tmp_path / f'{model}_tiny.py'
    config.write_text(TINY[model])
    env = _panoptic_env() if 'panoptic' in model else {}
    log = run_tool([ROOT / 'tools/train.py', config, '--work-dir', tmp_path / 'work', '--cfg-options',
                    'default_hooks.logger.interval=1', 'randomness.seed=0'], tiny_workspace, **env)
    losses = [float(x) for x in re.findall(r'\(train\) .*? loss: ([-\d.e+na]+)', log)]
    assert losses and all(math.isfinite(x) for x in losses), log[-3000:]
    checkpoint = tmp_path / 'work' / CHECKPOINT.get(model, 'iter_3.pth')
    assert checkpoint.is_file(), sorted(p.name for p in (tmp_path / 'work').iterdir())
    assert torch.load(checkpoint)['state_dict']

    out = run_tool([ROOT / 'tools/test.py', config, checkpoint, '--work-dir', tmp_path / 'test'], tiny_workspace,
                   **env)
    scores = json.loads(out.strip().splitlines()[-1].replace("'", '"'))
    assert math.isfinite(scores[METRIC[model]]) and scores[METRIC[model]] >= 0, scores
