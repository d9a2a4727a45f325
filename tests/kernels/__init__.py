"""Tests of splitserve.kernels."""
