"""Tests of splitserve.worker."""
