"""Calibration statistics for Palu: input Gram matrices and Fisher scores."""
