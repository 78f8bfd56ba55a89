"""Reconstructed fusion baselines (TransFuse, MMTM, HRFNet); filled in below."""

from __future__ import annotations
