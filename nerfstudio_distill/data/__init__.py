"""Datasets for nerfstudio-distill (see :mod:`nerfstudio_distill.data.scene`)."""
