"""Test stand-in for the COCO panoptic API (see tests/stand_ins/README.md)."""
