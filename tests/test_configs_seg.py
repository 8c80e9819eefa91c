"""Every segmentation config builds; one UperNet and one Semantic FPN per family trains and predicts."""
import pytest
import torch

from configs import assert_dat_backbone, build_model, config_files, count_params, load_config, loss_and_predict

# UperNet and Semantic FPN; Mask2Former: test_configs_query.py.
SEG_CONFIGS = [name for name in config_files('seg') if not name.startswith(('dino', 'mask2former'))]
SMOKE = ['upernet_dat-t++_8xb2-160k_ade20k-512x512.py', 'fpn_dat-t++_8xb4-40k_ade20k-512x512.py',
         'upernet_dat-t_8xb2-160k_ade20k-512x512.py', 'fpn_dat-t_8xb4-40k_ade20k-512x512.py']


def test_the_model_zoo_is_complete():
    assert len(SEG_CONFIGS) == 12
    assert set(SMOKE) <= set(SEG_CONFIGS)


@pytest.mark.parametrize('name', SEG_CONFIGS)
def test_config_builds_with_its_recipe(name):
    cfg = load_config('seg', name)
    model = build_model(cfg, 'mmseg')
    assert_dat_backbone(model, name)
    dims = list(model.backbone.arch['dims'])
    optim = cfg.optim_wrapper   # lr, decay, schedule length, precision: test_recipes.py
    assert optim.paramwise_cfg.custom_keys['rpe_table'].decay_mult == 0
    if name.startswith('upernet'):
        assert model.decode_head.in_channels == dims and model.auxiliary_head.in_channels == dims[2]
        warmup, poly = cfg.param_scheduler
        assert (warmup.start_factor, poly.power, poly.eta_min) == (1e-6, 1.0, 0.0)
    else:
        assert model.neck.in_channels == dims
        assert optim.optimizer.type == 'AdamW'
        assert len(cfg.param_scheduler) == 1 and cfg.param_scheduler[0].power == 0.9
    assert cfg.tta_pipeline is not None   # multi-scale + flip testing via tools/test.py --tta


# The DAT paper's sizes (docs/recipes.md), millions of parameters.
@pytest.mark.parametrize('name,published', [
    ('upernet_dat-t_8xb2-160k_ade20k-512x512.py', 60), ('upernet_dat-s_8xb2-160k_ade20k-512x512.py', 81),
    ('upernet_dat-b_8xb2-160k_ade20k-512x512.py', 121), ('fpn_dat-t_8xb4-40k_ade20k-512x512.py', 32),
    ('fpn_dat-s_8xb4-40k_ade20k-512x512.py', 53), ('fpn_dat-b_8xb4-40k_ade20k-512x512.py', 92)])
def test_parameter_counts_match_the_paper(name, published):
    params = count_params(build_model(load_config('seg', name), 'mmseg'))
    assert abs(params - published) / published < 0.02, params


@pytest.mark.parametrize('name', SMOKE)
def test_loss_and_predict_on_a_random_batch(name):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    cfg = load_config('seg', name)
    cfg.model.data_preprocessor.size = (128, 128)
    model = build_model(cfg, 'mmseg')
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 128, 128)))
        samples.append(sample)
    batch = dict(inputs=[torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8) for _ in range(2)],
                 data_samples=samples)
    losses, total, results = loss_and_predict(model, batch)
    # Random weights over 150 classes: the cross-entropy sits near ln(150) = 5.0 (plus 0.4x auxiliary).
    assert torch.isfinite(total) and 3.0 < losses['decode.loss_ce'].item() < 8.0
    assert model.backbone.patch_proj[0].weight.grad.abs().sum() > 0
    for res in results:
        pred = res.pred_sem_seg.data
        assert pred.shape == (1, 128, 128) and pred.min() >= 0 and pred.max() < 150


def test_whole_image_prediction_keeps_every_pixel_at_an_odd_size():
    # mmseg's whole-image test feeds the image unpadded; DAT v1 must not round its stem or merges down.
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    model = build_model(load_config('seg', 'upernet_dat-t_8xb2-160k_ade20k-512x512.py'), 'mmseg').eval()
    assert model.test_cfg.mode == 'whole'
    seen = []
    model.backbone.register_forward_hook(lambda _, args, out: seen.append([f.shape[-2:] for f in out]))
    shape = (512, 683)
    sample = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
    batch = model.data_preprocessor(dict(inputs=[torch.randint(0, 256, (3, *shape), dtype=torch.uint8)],
                                         data_samples=[sample]), training=False)
    assert batch['inputs'].shape[-2:] == shape
    with torch.no_grad():
        result, = model(**batch, mode='predict')
    assert seen == [[(-(-512 // s), -(-683 // s)) for s in (4, 8, 16, 32)]]
    assert result.pred_sem_seg.data.shape == (1, *shape)
