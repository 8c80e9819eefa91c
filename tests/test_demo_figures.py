"""The demo's detector picture draws one box per object: the picture's own overlap filter (tools/demo_figures.py)."""
import importlib.util

import torch

from commands import ROOT

_spec = importlib.util.spec_from_file_location('dat_mm_demo_figures', ROOT / 'tools' / 'demo_figures.py')
demo_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_figures)


def test_overlapping_boxes_of_any_class_leave_the_best_one():
    boxes = torch.tensor([[10., 10., 50., 50.],    # the object, best score
                          [12., 11., 52., 49.],    # the same object, another class
                          [20., 20., 35., 35.],    # a part inside it
                          [60., 60., 90., 90.]])   # another object
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert demo_figures.one_box_per_object(boxes, scores, 0.5).tolist() == [0, 3]
    assert demo_figures.one_box_per_object(boxes, scores, 1.0).tolist() == [0, 1, 2, 3]


def test_no_box_gives_no_index():
    assert demo_figures.one_box_per_object(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
