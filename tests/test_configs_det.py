"""Every detection config builds; one per detector type and family trains and predicts on CPU."""
import pytest
import torch

from configs import assert_dat_backbone, build_model, config_files, count_params, load_config, loss_and_predict

# The FPN-neck detectors; DINO and Mask2Former: test_configs_query.py.
DET_CONFIGS = [name for name in config_files('det') if not name.startswith(('dino', 'mask2former'))]
SMOKE = ['retinanet_dat-t++_fpn_ms-crop-1x_coco.py', 'mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.py',
         'cascade-mask-rcnn_dat-t++_fpn_ms-crop-1x_coco.py', 'retinanet_dat-t_fpn_1x_coco.py',
         'mask-rcnn_dat-t_fpn_1x_coco.py', 'cascade-mask-rcnn_dat-t_fpn_ms-crop-3x_coco.py']


def test_the_model_zoo_is_complete():
    assert len(DET_CONFIGS) == 27
    assert set(SMOKE) <= set(DET_CONFIGS)


@pytest.mark.parametrize('name', DET_CONFIGS)
def test_config_builds_with_its_recipe(name):
    cfg = load_config('det', name)
    model = build_model(cfg, 'mmdet')
    assert_dat_backbone(model, name)
    assert cfg.custom_imports.imports == ['dat_mm']
    arch = model.backbone.arch
    assert model.neck.in_channels == [arch['dims'][i] for i in model.backbone.out_indices]
    # Precision, checkpointing, drop path, lr, schedule length and warm-up: test_recipes.py.
    assert cfg.param_scheduler[1].milestones == ([27, 33] if '3x' in name else [8, 11])
    paramwise = cfg.optim_wrapper.paramwise_cfg
    assert paramwise.custom_keys['rpe_table'].decay_mult == 0 and paramwise.norm_decay_mult == 0
    if '++' in name:   # the DAT++ authors' total batch
        assert cfg.auto_scale_lr.base_batch_size == 64
    if 'ms-crop' in name:
        assert any(t.type == 'RandomChoice' for t in cfg.train_dataloader.dataset.pipeline)


# The DAT paper's sizes (docs/recipes.md), millions of parameters.
@pytest.mark.parametrize('name,published', [('mask-rcnn_dat-t_fpn_1x_coco.py', 48),
                                            ('mask-rcnn_dat-s_fpn_1x_coco.py', 69),
                                            ('cascade-mask-rcnn_dat-s_fpn_ms-crop-3x_coco.py', 107)])
def test_parameter_counts_match_the_paper(name, published):
    params = count_params(build_model(load_config('det', name), 'mmdet'))
    assert abs(params - published) / published < 0.02, params


@pytest.mark.parametrize('name', SMOKE)
def test_loss_and_predict_on_a_random_batch(name):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build_model(load_config('det', name), 'mmdet')
    batch = demo_mm_inputs(batch_size=2, image_shapes=[(3, 128, 160), (3, 96, 128)], num_items=[3, 2],
                           num_classes=80, with_mask='mask' in name)
    _, total, results = loss_and_predict(model, batch)
    assert torch.isfinite(total) and total > 0
    assert model.backbone.patch_proj[0].weight.grad.abs().sum() > 0
    assert len(results) == 2
    for res in results:
        inst = res.pred_instances
        assert inst.bboxes.shape[1] == 4 and torch.isfinite(inst.bboxes).all()
        assert ((inst.labels >= 0) & (inst.labels < 80)).all()
        if 'mask' in name:
            assert inst.masks.shape[0] == len(inst.bboxes)
